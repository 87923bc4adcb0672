"""clipguard: purify backdoored image classifiers by clipping activations."""

import os

# torch's OpenMP threads otherwise spin at every barrier waiting for their team; on cores another
# process shares, a spinning thread burns the time slice its descheduled teammate needs, and passes
# made of many small operations collapse (see clipguard.threads). OpenMP reads this once, when torch
# is first imported, so it is set here, before any clipguard module imports torch; a value the user
# set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
