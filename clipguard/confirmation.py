"""Confirm a candidate before acting on it: does its suspect group carry a trigger?

Why a separate step: a class whose features split into two groups is not evidence of a
backdoor. Natural classes have modes (airplanes in the sky and on the ground), and a model
with no backdoor at all can hold a class that splits as cleanly as a poisoned one. What a
backdoor has and a mode has not is a *shortcut that transfers*: the trigger sends an image
of any class to the target, whatever the image shows. So the test grafts what distinguishes
the suspects onto images of the other classes and counts how often the model's decision
moves, against the same graft built from the class's genuine group.

The graft (:func:`graft`) matches, per pixel, the mean and spread of the reference images to
those of the group: ``x' = μ_X + min(1, σ_X / σ_R) · (x − μ_R)``. Where the group is no less
varied than the reference it adds ``μ_X − μ_R`` (an additive trigger such as SIG); where the
group is constant it pastes ``μ_X`` (a patch); a blend at opacity α gives ``σ_X = (1 − α) σ_R``
and so the blend itself. A genuine group's graft shifts colour and contrast towards the
class's average look, which moves few decisions. The reference images' content stays, so a
decision that moves en masse moved because of the grafted pattern.

What is counted, per source class of the grafted images (:class:`Transfer`): the share
newly sent to the candidate (an all-to-one or source-specific backdoor), and the share sent
to whichever other class takes most of them (an all-to-all backdoor redirects each source
to its own destination). The verdict for a candidate (:func:`judge`) asks that one of these
stands far above the genuine group's graft, broadly over the sources or, for a
source-specific attack, strongly for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.errors import Cancelled
from clipguard.inference import fast_copy, pieces
from clipguard.models import ModelSpec

REFERENCE_PER_CLASS = 30
"""Images of each class the grafts are stamped on (a seeded draw from what detection read)."""
MIN_GROUP = 10
"""Fewest images a group's per-pixel moments are estimated from."""
BROAD_FLIP = 0.5
"""An all-to-one trigger: the median source's share sent to the candidate by the suspects' graft."""
SPECIFIC_FLIP = 0.7
"""A source-specific trigger: the share of one source's images sent to the candidate."""
MIN_MARGIN = 0.3
"""How far the suspects' graft must move decisions beyond the genuine group's."""


def graft(group: torch.Tensor, reference: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """``onto`` (uint8 ``(N, 3, H, W)``) with its per-pixel moments moved from ``reference``'s to ``group``'s."""
    g, r = group.float(), reference.float()
    ratio = (g.std(0) / r.std(0).clamp_min(1.0)).clamp(max=1.0)
    out = g.mean(0) + ratio * (onto.float() - r.mean(0))
    return out.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class Transfer:
    """How one group's graft moved the decisions on the reference images, per source class."""

    to_candidate: list[float | None]
    """Per class: share of its reference images newly predicted as the candidate (None: the candidate itself)."""
    redirected: list[float | None]
    """Per class: share newly predicted as the one class (not its own) that takes most of them."""

    @property
    def broad(self) -> float:
        """Median over the source classes of :attr:`to_candidate`."""
        return _median(self.to_candidate)

    @property
    def strongest(self) -> float:
        """The largest :attr:`to_candidate` of any source class."""
        return max((v for v in self.to_candidate if v is not None), default=0.0)

    @property
    def redirect(self) -> float:
        """Median over the source classes of :attr:`redirected`."""
        return _median(self.redirected)

    def to_dict(self) -> dict:
        return {"to_candidate": [_round(v) for v in self.to_candidate], "broad": round(self.broad, 3),
                "strongest": round(self.strongest, 3), "redirect": round(self.redirect, 3)}


@dataclass
class Evidence:
    """The graft test's outcome for one candidate class."""

    candidate: int
    suspects: int
    genuine: int
    suspect_transfer: Transfer | None
    genuine_transfer: Transfer | None
    confirmed: bool
    kind: str | None = None
    """``all_to_one``, ``source_specific`` or ``all_to_all`` when confirmed."""
    reason: str = ""
    swapped: bool = False
    """The trigger was on the group detection had taken for the genuine one; ``suspects`` counts that group."""

    def to_dict(self) -> dict:
        return {"class": self.candidate, "suspects": self.suspects, "genuine": self.genuine,
                "confirmed": self.confirmed, "kind": self.kind, "reason": self.reason, "swapped": self.swapped,
                "suspects_graft": None if self.suspect_transfer is None else self.suspect_transfer.to_dict(),
                "genuine_graft": None if self.genuine_transfer is None else self.genuine_transfer.to_dict()}


def judge(suspect: Transfer, genuine: Transfer) -> tuple[str | None, str]:
    """Which kind of backdoor the two transfers show, if any, and why (one sentence)."""
    if suspect.broad >= BROAD_FLIP and suspect.broad - genuine.broad >= MIN_MARGIN:
        return "all_to_one", (f"the suspects' pattern sends a median {suspect.broad:.0%} of other classes' images "
                              f"to the class, the genuine group's {genuine.broad:.0%}")
    source_gap = max((s - g for s, g in zip(suspect.to_candidate, genuine.to_candidate, strict=True)
                      if s is not None and g is not None), default=0.0)
    if suspect.strongest >= SPECIFIC_FLIP and source_gap >= MIN_MARGIN + 0.2:
        return "source_specific", (f"the suspects' pattern sends {suspect.strongest:.0%} of one source class's "
                                   f"images to the class (the genuine group's pattern at most "
                                   f"{suspect.strongest - source_gap:.0%} of that source)")
    if suspect.redirect >= BROAD_FLIP and suspect.redirect - genuine.redirect >= MIN_MARGIN:
        return "all_to_all", (f"the suspects' pattern moves a median {suspect.redirect:.0%} of each other class's "
                              f"images to one other class, the genuine group's {genuine.redirect:.0%}")
    return None, (f"the suspects' pattern moves few decisions: a median {suspect.broad:.0%} of other classes' "
                  f"images to the class (genuine group {genuine.broad:.0%}), at most {suspect.strongest:.0%} of "
                  f"one source")


def reference_indices(labels: torch.Tensor, num_classes: int, per_class: int = REFERENCE_PER_CLASS,
                      seed: int = 1) -> list[torch.Tensor]:
    """Per class, a seeded draw of up to ``per_class`` positions in ``labels`` (the images grafts are stamped on)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        out.append(members[torch.randperm(len(members), generator=gen)[:per_class]].sort().values)
    return out


class GraftTest:
    """Runs grafts for any candidate against one fixed set of reference images.

    The reference images and the model's decisions on them are computed once; each graft then
    costs one forward pass over the other classes' reference images.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: ModelSpec, *,
                 device: torch.device | str = "cpu", batch_size: int = 256,
                 should_cancel: Callable[[], bool] | None = None) -> None:
        self.spec, self.device, self.batch_size = spec, device, batch_size
        self.should_cancel = should_cancel
        self.runner = fast_copy(model, device)
        refs = reference_indices(labels, spec.num_classes)
        self.images = torch.cat([images[r] for r in refs])
        self.sources = torch.cat([torch.full((len(r),), c, dtype=torch.int64) for c, r in enumerate(refs)])
        self.before = self._predict(self.images)

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            if self.should_cancel is not None and self.should_cancel():
                raise Cancelled("cancelled while confirming")
            x = normalize(images[start : start + self.batch_size].to(self.device), self.spec.mean, self.spec.std)
            out.extend(self.runner(piece).argmax(1).cpu() for piece in pieces(x, self.device))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)

    def transfer(self, group: torch.Tensor, candidate: int) -> Transfer:
        """Graft ``group`` (uint8 images of the candidate class) onto the other classes' reference images."""
        keep = self.sources != candidate
        reference, sources, before = self.images[keep], self.sources[keep], self.before[keep]
        after = self._predict(graft(group, reference, reference))
        k = self.spec.num_classes
        to_candidate: list[float | None] = [None] * k
        redirected: list[float | None] = [None] * k
        for c in range(k):
            rows = sources == c
            if c == candidate or not rows.any():
                continue
            b, a = before[rows], after[rows]
            to_candidate[c] = max(0.0, float((a == candidate).float().mean() - (b == candidate).float().mean()))
            moved = torch.bincount(a[a != b], minlength=k).float()
            moved[c] = 0
            redirected[c] = float(moved.max() / len(a))
        return Transfer(to_candidate, redirected)

    def confirm(self, data: ImageData, suspects: torch.Tensor, genuine: torch.Tensor, candidate: int) -> Evidence:
        """Whether one of a class's two groups carries a trigger; ``suspects`` is the side detection named.

        Both are positions in ``data``, labelled ``candidate``. Each group's graft is the other's
        control, so a trigger carried by the group detection took for the genuine one (the poisoned
        samples are the larger part of the class) is found too: then the groups swap, and
        :attr:`Evidence.swapped` says so."""
        if len(suspects) < MIN_GROUP or len(genuine) < MIN_GROUP:
            return Evidence(candidate, len(suspects), len(genuine), None, None, False,
                            reason=f"too few images to test (suspects {len(suspects)}, genuine {len(genuine)})")
        s = self.transfer(data.images[suspects], candidate)
        g = self.transfer(data.images[genuine], candidate)
        kind, reason = judge(s, g)
        if kind is None:
            other, other_reason = judge(g, s)
            if other is not None:
                return Evidence(candidate, len(genuine), len(suspects), g, s, True, other,
                                other_reason.replace("the genuine group's", "the other group's"), swapped=True)
        return Evidence(candidate, len(suspects), len(genuine), s, g, kind is not None, kind, reason)

    def unresolved(self, evidence: Evidence) -> bool:
        """An unconfirmed candidate whose suspects still moved decisions clearly more than the control."""
        s, g = evidence.suspect_transfer, evidence.genuine_transfer
        if evidence.confirmed or s is None or g is None:
            return False
        gaps = [s.broad - g.broad, s.redirect - g.redirect]
        gaps += [a - b for a, b in zip(s.to_candidate, g.to_candidate, strict=True) if a is not None and b is not None]
        return max(gaps) >= MIN_MARGIN / 2


def _median(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(torch.tensor(present).median()) if present else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
