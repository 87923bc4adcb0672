"""Error types with messages meant for the person at the keyboard.

Every failure that is the user's to fix (a bad checkpoint, an unreadable dataset, an
unknown architecture) is raised as a :class:`ClipguardError` subclass whose message is a
single line. The CLI prints that line on stderr and exits non-zero; the service turns it
into a problem+json ``detail`` or a job's ``error``. Anything else escaping the engine is a bug.

Why options are named as placeholders: the engine does not know whether a person reaches a
setting as a command-line flag or as a field of a request. A message names the setting
``{num_classes}`` (an engine option's name, as :class:`clipguard.purify.PurifyOptions` spells it),
and each front end words it for its users (:meth:`ClipguardError.worded`); plain ``str()``
shows the option's bare name.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping


class ClipguardError(Exception):
    """Base class for errors caused by input the user can correct.

    ``options=True`` marks the message as a template whose ``{name}`` fields are engine options."""

    def __init__(self, message: str = "", *, options: bool = False) -> None:
        super().__init__(message)
        self.template = message if options else None

    def options(self) -> list[str]:
        """The engine options the message names, in order."""
        if self.template is None:
            return []
        return [name for _, name, _, _ in string.Formatter().parse(self.template) if name]

    def worded(self, spell: Callable[[str], str] | Mapping[str, str] | None = None) -> str:
        """The message with each option named as ``spell`` says (a function, or a mapping whose missing names
        stay bare)."""
        if self.template is None:
            return super().__str__()
        if spell is None:
            words: Callable[[str], str] = lambda name: name  # noqa: E731
        elif isinstance(spell, Mapping):
            words = lambda name: spell.get(name, name)  # noqa: E731
        else:
            words = spell
        return self.template.format_map({name: words(name) for name in self.options()})

    def __str__(self) -> str:
        return self.worded()


def literal(text: str) -> str:
    """``text`` (a path, a label: anything a user named) safe inside an option template: its braces doubled."""
    return text.replace("{", "{{").replace("}", "}}")


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
