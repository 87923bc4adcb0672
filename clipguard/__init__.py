"""clipguard: purify backdoored image classifiers by clipping activations."""

__version__ = "0.1.0"
