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

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
SPECIFIC_FLIP = 0.8
"""A source-specific trigger: the share of one source's images sent to the candidate. Set high because a
genuine group's look can send many images of one look-alike class (ship on water, deer on grass) along
(docs/method.md)."""
SPECIFIC_MARGIN = 0.6
"""How far that share must exceed what the genuine group's graft sends of the same source."""
MIN_MARGIN = 0.3
"""How far the suspects' graft must move decisions beyond the genuine group's."""
MAX_UNIFORM = 0.1
"""Largest share of the image over which a group's images may all look alike (per-pixel spread under half
the other classes') for its graft to count as a trigger. A trigger leaves most of the image as varied as
any class's (a patch covers a corner, a blend or an additive signal keeps most of the spread); a natural
mode such as a run of near-identical backgrounds does not, and its graft then pastes the class's look
itself, which moves decisions for the wrong reason (docs/method.md)."""
WARP_PIXELS = 1.0
"""Largest displacement, in pixels, of the smooth warp :class:`WarpTest` may find (WaNet's triggers move pixels
by about half a pixel; natural images do not change class under a one-pixel smooth warp)."""
WARP_GRID = 4
"""Control points per side of the warp field (WaNet's k), upsampled bicubically to the image."""
WARP_STEPS = 25
WARP_IMAGES_PER_CLASS = 6
WARP_SUCCESS = 0.5
"""A warp that sends this share of the other classes' images to the candidate is a shortcut ..."""
WARP_MARGIN = 0.4
"""... when it sends this much more than the same search does for ordinary classes."""
WARP_TOWARD = 0.75
"""Share of the warped images that must move towards the suspects rather than the genuine group."""


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
    destinations: list[int | None] = field(default_factory=list)
    """Per class: that class (None where nothing moved, or for the candidate itself)."""

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
        """Median over the source classes of :attr:`redirected`, counting a source only where its destination is
        its own (shared by at most one other source): an all-to-all trigger sends each class to a class of its
        own, while a pattern that sends every class to one class is a look of that class, not such a trigger."""
        if not self.destinations:
            return _median(self.redirected)
        uses = Counter(d for d in self.destinations if d is not None)
        return _median(
            [
                None if r is None else (r if uses[d] <= 2 else 0.0)  # type: ignore[index]
                for r, d in zip(self.redirected, self.destinations, strict=True)
            ]
        )

    def to_dict(self) -> dict:
        return {
            "to_candidate": [_round(v) for v in self.to_candidate],
            "broad": round(self.broad, 3),
            "strongest": round(self.strongest, 3),
            "redirect": round(self.redirect, 3),
            "destinations": self.destinations,
        }


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
    warp: dict | None = None
    """:class:`WarpTest`'s numbers, when the graft could not decide and the warp search ran."""
    swapped: bool = False
    """The trigger was on the group detection had taken for the genuine one; ``suspects`` counts that group."""

    def to_dict(self) -> dict:
        return {
            "class": self.candidate,
            "suspects": self.suspects,
            "genuine": self.genuine,
            "confirmed": self.confirmed,
            "kind": self.kind,
            "reason": self.reason,
            "swapped": self.swapped,
            "suspects_graft": None if self.suspect_transfer is None else self.suspect_transfer.to_dict(),
            "genuine_graft": None if self.genuine_transfer is None else self.genuine_transfer.to_dict(),
            "warp": self.warp,
        }


def judge(suspect: Transfer, genuine: Transfer) -> tuple[str | None, str]:
    """Which kind of backdoor the two transfers show, if any, and why (one sentence)."""
    if suspect.broad >= BROAD_FLIP and suspect.broad - genuine.broad >= MIN_MARGIN:
        return "all_to_one", (
            f"the suspects' pattern sends a median {suspect.broad:.0%} of other classes' images "
            f"to the class, the genuine group's {genuine.broad:.0%}"
        )
    source, gap = _widest_gap(suspect, genuine)
    if source is not None and suspect.to_candidate[source] >= SPECIFIC_FLIP and gap >= SPECIFIC_MARGIN:  # type: ignore[operator]
        return "source_specific", (
            f"the suspects' pattern sends {suspect.to_candidate[source]:.0%} of class "
            f"{source}'s images to the class, the genuine group's "
            f"{genuine.to_candidate[source]:.0%}"
        )
    if suspect.redirect >= BROAD_FLIP and suspect.redirect - genuine.redirect >= MIN_MARGIN:
        return "all_to_all", (
            f"the suspects' pattern moves a median {suspect.redirect:.0%} of each other class's "
            f"images to one other class, the genuine group's {genuine.redirect:.0%}"
        )
    return None, (
        f"the suspects' pattern moves few decisions: a median {suspect.broad:.0%} of other classes' "
        f"images to the class (genuine group {genuine.broad:.0%}), at most {suspect.strongest:.0%} of "
        f"one source"
    )


def reference_indices(
    labels: torch.Tensor, num_classes: int, per_class: int = REFERENCE_PER_CLASS, seed: int = 1
) -> list[torch.Tensor]:
    """Per class, a seeded draw of up to ``per_class`` positions in ``labels`` (the images grafts are stamped on)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        out.append(members[torch.randperm(len(members), generator=gen)[:per_class]].sort().values)
    return out


def _uniform_reason(share: float) -> str:
    return (
        f"the suspects look alike over {100 * share:.0f}% of the image (a natural mode, not a trigger): their "
        "graft pastes the class's look"
    )


class GraftTest:
    """Runs grafts for any candidate against one fixed set of reference images.

    The reference images and the model's decisions on them are computed once; each graft then
    costs one forward pass over the other classes' reference images.
    """

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: ModelSpec,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.spec, self.device, self.batch_size = spec, device, batch_size
        self.should_cancel = should_cancel
        self.runner = fast_copy(model, device)
        refs = reference_indices(labels, spec.num_classes)
        self.images = torch.cat([images[r] for r in refs])
        self.sources = torch.cat([torch.full((len(r),), c, dtype=torch.int64) for c, r in enumerate(refs)])
        self.before = self._predict(self.images)

    @torch.no_grad()
    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        out: list[torch.Tensor] = []
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
        destinations: list[int | None] = [None] * k
        for c in range(k):
            rows = sources == c
            if c == candidate or not rows.any():
                continue
            b, a = before[rows], after[rows]
            to_candidate[c] = max(0.0, float((a == candidate).float().mean() - (b == candidate).float().mean()))
            moved = torch.bincount(a[a != b], minlength=k).float()
            moved[c] = 0
            redirected[c] = float(moved.max() / len(a))
            destinations[c] = int(moved.argmax()) if moved.max() > 0 else None
        return Transfer(to_candidate, redirected, destinations)

    def confirm(self, data: ImageData, suspects: torch.Tensor, genuine: torch.Tensor, candidate: int) -> Evidence:
        """Whether one of a class's two groups carries a trigger; ``suspects`` is the side detection named.

        Both are positions in ``data``, labelled ``candidate``. Each group's graft is the other's
        control, so a trigger carried by the group detection took for the genuine one (the poisoned
        samples are the larger part of the class) is found too: then the groups swap, and
        :attr:`Evidence.swapped` says so."""
        if len(suspects) < MIN_GROUP or len(genuine) < MIN_GROUP:
            return Evidence(
                candidate,
                len(suspects),
                len(genuine),
                None,
                None,
                False,
                reason=f"too few images to test (suspects {len(suspects)}, genuine {len(genuine)})",
            )
        s = self.transfer(data.images[suspects], candidate)
        g = self.transfer(data.images[genuine], candidate)
        kind, reason = judge(s, g)
        if kind is not None and (share := self.uniform_share(data.images[suspects], candidate)) > MAX_UNIFORM:
            kind, reason = None, _uniform_reason(share)
        if kind is None:
            other, other_reason = judge(g, s)
            if other is not None and (share := self.uniform_share(data.images[genuine], candidate)) > MAX_UNIFORM:
                other = None
            if other is not None:
                return Evidence(
                    candidate,
                    len(genuine),
                    len(suspects),
                    g,
                    s,
                    True,
                    other,
                    other_reason.replace("the genuine group's", "the other group's"),
                    swapped=True,
                )
        return Evidence(candidate, len(suspects), len(genuine), s, g, kind is not None, kind, reason)

    def uniform_share(self, group: torch.Tensor, candidate: int) -> float:
        """Share of the pixels where ``group``'s spread is under half that of the reference images (see
        :data:`MAX_UNIFORM`)."""
        reference = self.images[self.sources != candidate].float()
        ratio = group.float().std(0) / reference.std(0).clamp_min(1.0)
        return float((ratio < 0.5).float().mean())

    def unresolved(self, evidence: Evidence) -> bool:
        """An unconfirmed candidate whose suspects still moved decisions clearly more than the control: half
        the margins of :func:`judge`, on a pattern that reached at least half its bars."""
        s, g = evidence.suspect_transfer, evidence.genuine_transfer
        if evidence.confirmed or s is None or g is None:
            return False
        source, gap = _widest_gap(s, g)
        return (
            (s.broad >= BROAD_FLIP / 2 and s.broad - g.broad >= MIN_MARGIN / 2)
            or (s.redirect >= BROAD_FLIP / 2 and s.redirect - g.redirect >= MIN_MARGIN / 2)
            or (
                source is not None
                and gap >= SPECIFIC_MARGIN / 2
                and (s.to_candidate[source] or 0.0) >= (SPECIFIC_FLIP + BROAD_FLIP) / 2
            )
        )


def _widest_gap(suspect: Transfer, genuine: Transfer) -> tuple[int | None, float]:
    """The source class on which the suspects' graft outdoes the genuine group's most, and by how much."""
    gaps = [
        (c, a - b)
        for c, (a, b) in enumerate(zip(suspect.to_candidate, genuine.to_candidate, strict=True))
        if a is not None and b is not None
    ]
    return max(gaps, key=lambda cg: cg[1], default=(None, 0.0))


def _median(values: list[float | None]) -> float:
    present = [v for v in values if v is not None]
    return float(torch.tensor(present).median()) if present else 0.0


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def smooth_warp(images: torch.Tensor, control: torch.Tensor, pixels: float) -> torch.Tensor:
    """Float images ``(N, 3, H, W)`` in [0, 1] resampled along a smooth displacement field.

    ``control`` (``(1, 2, k, k)``, unbounded) is squashed by ``tanh`` and upsampled bicubically, so
    no pixel moves by more than ``pixels``; the same field moves every image, as a warp trigger does."""
    n, _, h, w = images.shape
    field = F.interpolate(torch.tanh(control), size=(h, w), mode="bicubic", align_corners=True)
    field = field.permute(0, 2, 3, 1) * torch.tensor(
        [2 * pixels / max(w - 1, 1), 2 * pixels / max(h - 1, 1)], device=images.device
    )
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=images.device), torch.linspace(-1, 1, w, device=images.device), indexing="ij"
    )
    grid = (torch.stack([xs, ys], -1)[None] + field).clamp(-1, 1)
    return F.grid_sample(images, grid.expand(n, -1, -1, -1), mode="bilinear", align_corners=True)


class WarpTest:
    """For a trigger no per-pixel graft can carry: a warp of the whole image (WaNet).

    A warp leaves every pixel's distribution as it was, so the suspects' per-pixel moments hold
    nothing to graft. What the model does gives it away instead: a smooth warp of at most
    :data:`WARP_PIXELS` that sends the other classes' images to the candidate exists when the
    model has learned one as a trigger, and not for an ordinary class (the same search, run for
    classes that are not candidates, is the control). The suspects are then tied to it: the warp
    moves other classes' images towards the suspects in the model's features, not towards the
    class's genuine images (a warp that made them look like the class itself would do the latter)."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        spec: ModelSpec,
        *,
        device: torch.device | str = "cpu",
        should_cancel: Callable[[], bool] | None = None,
    ) -> None:
        self.model, self.spec, self.device, self.should_cancel = model.eval(), spec, device, should_cancel
        refs = reference_indices(labels, spec.num_classes, WARP_IMAGES_PER_CLASS, seed=2)
        self.images = torch.cat([images[r] for r in refs])
        self.sources = torch.cat([torch.full((len(r),), c, dtype=torch.int64) for c, r in enumerate(refs)])
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        self._found: dict[int, tuple[float, torch.Tensor]] = {}

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)

    def search(self, target: int) -> tuple[float, torch.Tensor]:
        """The share of the other classes' images the best warp found sends to ``target``, and its control points."""
        if target in self._found:
            return self._found[target]
        x = self.images[self.sources != target].to(self.device).float() / 255
        control = torch.zeros(1, 2, WARP_GRID, WARP_GRID, device=self.device, requires_grad=True)
        opt = torch.optim.Adam([control], lr=0.1)
        y = torch.full((len(x),), target, device=self.device)
        requires = [p.requires_grad for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            for _ in range(WARP_STEPS):
                if self.should_cancel is not None and self.should_cancel():
                    raise Cancelled("cancelled while confirming")
                loss = F.cross_entropy(self._logits(smooth_warp(x, control, WARP_PIXELS)), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p, r in zip(self.model.parameters(), requires, strict=True):
                p.requires_grad_(r)
        with torch.no_grad():
            hit = float((self._logits(smooth_warp(x, control, WARP_PIXELS)).argmax(1) == target).float().mean())
        self._found[target] = (hit, control.detach())
        return self._found[target]

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier head's inputs for float images ``x`` in [0, 1] (what detection's split reads)."""
        from clipguard.detection import feature_layer

        kept: list[torch.Tensor] = []
        hook = feature_layer(self.model).register_forward_pre_hook(
            lambda _m, args: kept.append(args[0].detach().flatten(1).float().cpu())
        )
        try:
            for start in range(0, len(x), 256):
                self._logits(x[start : start + 256])
        finally:
            hook.remove()
        return torch.cat(kept)

    def _toward(
        self, data: ImageData, suspects: torch.Tensor, genuine: torch.Tensor, candidate: int, control: torch.Tensor
    ) -> float:
        """Share of the other classes' images that the warp ``control`` moves, in the model's features, closer
        to the suspects' mean than to the genuine group's (by how much each distance shrinks)."""
        cap = 500  # the means need a sample of each group, not all of it
        mean_s = self._features(data.images[suspects[:cap]].to(self.device).float() / 255).mean(0)
        mean_g = self._features(data.images[genuine[:cap]].to(self.device).float() / 255).mean(0)
        x = self.images[self.sources != candidate].to(self.device).float() / 255
        with torch.no_grad():
            warped = smooth_warp(x, control, WARP_PIXELS)
        before, after = self._features(x), self._features(warped)
        closer_s = (before - mean_s).norm(dim=1) - (after - mean_s).norm(dim=1)
        closer_g = (before - mean_g).norm(dim=1) - (after - mean_g).norm(dim=1)
        return float((closer_s > closer_g).float().mean())

    def confirm(
        self, data: ImageData, suspects: torch.Tensor, genuine: torch.Tensor, candidate: int, controls: list[int]
    ) -> tuple[bool, bool, dict, str]:
        """Whether a warp is the candidate's trigger and the suspects carry it.

        Returns (confirmed, partial, numbers, reason); ``partial`` is half the bars met, for the verdict's
        ``inconclusive``. The ordinary classes are searched only when the candidate's own search comes
        close, since on a model without a warp trigger one search already says no."""
        hit, control = self.search(candidate)
        numbers: dict = {"success": round(hit, 3), "pixels": WARP_PIXELS}
        if hit < WARP_SUCCESS / 2:
            return (
                False,
                False,
                numbers,
                (f"no smooth warp of at most {WARP_PIXELS:g} px sends many images to the class ({hit:.0%})"),
            )
        ordinary = {c: self.search(c)[0] for c in controls}
        worst = max(ordinary.values(), default=0.0)
        toward = self._toward(data, suspects, genuine, candidate, control)
        numbers.update(controls={str(c): round(v, 3) for c, v in ordinary.items()}, toward_suspects=round(toward, 3))
        ok = hit >= WARP_SUCCESS and hit - worst >= WARP_MARGIN and toward >= WARP_TOWARD
        partial = not ok and hit - worst >= WARP_MARGIN / 2 and toward >= WARP_TOWARD / 2
        reason = (
            f"a smooth warp of at most {WARP_PIXELS:g} px sends {hit:.0%} of other classes' images to the class "
            f"(ordinary classes: at most {worst:.0%}), and moves {toward:.0%} of them towards the suspects "
            "rather than the genuine group in the model's features"
        )
        return ok, partial, numbers, reason
