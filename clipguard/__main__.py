"""``python -m clipguard``: the same as the ``clipguard`` command."""

import sys

from clipguard.cli import main

sys.exit(main())
