"""The purification methods and clip granularities, and the one set of defaults every entry point uses.

``clipguard purify``'s flags, ``clipguard remote purify``'s flags, the API's job body
(``clipguard.app.schemas.JobCreate``), :class:`clipguard.purify.PurifyOptions` and the docs all read
:data:`DEFAULTS`, so a default changed here changes everywhere at once (``tests/test_methods.py``
fails when one of them spells its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType


class Method(StrEnum):
    """How a suspect model is purified."""

    GUARD = "guard"
    """Confirm a backdoor from the training data, unlearn what was confirmed, then clip (the default)."""
    PAPER = "paper"
    """The paper's recipe as published: the μ+λσ clip alone, weights unchanged (honest comparisons)."""


class Granularity(StrEnum):
    """What one clipping bound covers."""

    CHANNEL = "channel"
    """One bound per channel of an activation (shared over positions): the paper's default."""
    ELEMENT = "element"
    """One bound per activation element (channel and position)."""


METHOD_HELP: Mapping[Method, str] = MappingProxyType(
    {
        Method.GUARD: "confirm a backdoor from the training data, unlearn what was confirmed, then clip at μ+λσ "
        "(the purified weights differ from the upload)",
        Method.PAPER: "the published recipe, the μ+λσ clip alone, with the weights unchanged",
    }
)
"""One line per method for ``--help``, the API's schema and the console."""


@dataclass(frozen=True)
class Defaults:
    """Settings a run takes when none is given."""

    method: Method = Method.GUARD
    granularity: Granularity = Granularity.CHANNEL
    lam: Mapping[Method, float] = field(
        default_factory=lambda: MappingProxyType({Method.PAPER: 4.0, Method.GUARD: 6.0})
    )
    """λ per method. ``paper``: the recipe's λ. ``guard``: the clip follows unlearning and only has to
    catch what is left far out of range, so a looser λ keeps clean accuracy; a guard run that unlearns
    nothing is the paper's recipe and takes the paper's λ (docs/method.md)."""
    batch_size: int = 256
    """Images per forward in every pass; a cache-sized batch beat a larger one on a small CPU
    (docs/lab/benchmarks.md)."""
    bounds_samples: int = 5000
    """With channel granularity, μ and σ come from at most this many training images (a fixed random
    subset); element granularity measures on all of them (``clipguard.purify.default_bounds_samples``)."""

    def lam_for(self, method: Method | str) -> float:
        return self.lam[Method(method)]


DEFAULTS = Defaults()
