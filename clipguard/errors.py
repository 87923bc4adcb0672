"""Error types with messages meant for the person at the keyboard.

Every failure that is the user's to fix (a bad checkpoint, an unreadable dataset, an
unknown architecture) is raised as a :class:`ClipguardError` subclass whose message is a
single line. The CLI prints that line on stderr and exits non-zero; the service turns it
into a problem+json ``detail``. Anything else escaping the engine is a bug.
"""

from __future__ import annotations


class ClipguardError(Exception):
    """Base class for errors caused by input the user can correct."""


class CheckpointError(ClipguardError):
    """A checkpoint is unreadable, unsafe, or does not fit the declared architecture."""


class DataError(ClipguardError):
    """A training or evaluation data reference cannot be read as images and labels."""


class ModelSpecError(ClipguardError):
    """An architecture name or its options (classes, normalisation) are not usable."""


class ExportError(ClipguardError):
    """The purified model could not be exported or failed its equivalence check."""


class Cancelled(ClipguardError):
    """The caller asked for the run to stop; nothing was published."""
