"""clipguard's default defense before the clip: find candidates, confirm them, unlearn only the confirmed.

One function, :func:`guard_pass`, shared by ``purify`` (CLI and worker) and the benchmarks, so
what is measured is what ships. Its steps:

1. **Screen** a class-balanced sample (:func:`~clipguard.detection.screen_indices`) through the
   model once, keeping the penultimate features, the logits and the tail's inputs.
2. **Candidates**: every class whose feature split stands out (:mod:`clipguard.detection`), and
   every class whose split's small group carries a pattern that moves the model's decisions
   (:class:`~clipguard.confirmation.GraftTest`, one cheap graft per class). A split alone is not
   evidence: natural classes have modes.
3. **Confirm** each candidate on its whole class: read the rest of the class, split it again,
   take the side the poisoned samples are on, and graft that group and the genuine one onto
   the other classes' images. Only a group whose graft moves decisions far beyond the genuine
   group's is a confirmed backdoor.
4. **Unlearn** the confirmed classes' suspects together (:func:`~clipguard.unlearning.unlearn`);
   an unconfirmed candidate is reported (``inconclusive``) and left alone.

The clip that follows is the paper's μ+λσ, computed on the returned model and data (see
docs/method.md for why both steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from clipguard.confirmation import Evidence, GraftTest, Transfer, WarpTest
from clipguard.data import ImageData
from clipguard.detection import (
    ESCALATE_Z,
    MIN_SEPARATION,
    MIN_Z,
    SCREEN_PER_CLASS,
    FeaturePass,
    class_split,
    detect_poison,
    feature_pass,
    poisoned_side,
    screen_indices,
    standing,
)
from clipguard.models import ModelSpec
from clipguard.split import Split, split_tail
from clipguard.stages import Progress, Stage, timed
from clipguard.unlearning import TailInputs, UnlearnConfig, unlearn
from clipguard.verdict import Verdict

NOTABLE_FLIP = 0.25
"""A screened class's small group whose graft sends this share of the other classes' images (median
over sources, to the class or to one other class) becomes a candidate whatever its split score."""
NOTABLE_SOURCE = 0.6
"""Likewise for the share of a single source class sent to the class (a source-specific trigger)."""
MAX_CANDIDATES = 10
"""Most classes confirmed on their whole class per run (the strongest first). An all-to-all attack makes every
class a candidate; each costs its share of one more partial pass and two grafts."""


@dataclass
class GuardResult:
    """What :func:`guard_pass` hands to the clip, and what the report says about it."""

    model: nn.Module
    """A fine-tuned copy when a backdoor was confirmed, else the model as given."""
    data: ImageData
    """The training data without the final suspects (the data as given when nothing was unlearned)."""
    detection: dict
    verdict: Verdict
    unlearning: dict | None


@dataclass
class _Candidate:
    cls: int
    screen_score: float
    z: float
    reason: str
    whole_score: float | None = None
    side: dict | None = None
    suspects: torch.Tensor | None = None
    """Positions in the training data."""
    evidence: Evidence | None = None
    screen_evidence: Transfer | None = None
    unresolved: bool = False
    """Not confirmed, yet not dismissed: its split stands out, or its suspects moved decisions more than the control."""

    def to_dict(self) -> dict:
        out = {
            "class": self.cls,
            "why_tested": self.reason,
            "screen_score": self.screen_score,
            "z": self.z,
            "whole_class_score": self.whole_score,
            "side": self.side,
            "unresolved": self.unresolved,
        }
        if self.evidence is not None:
            out.update(self.evidence.to_dict())
            out["class"] = self.cls
        return out


def guard_pass(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    screen_per_class: int | None = SCREEN_PER_CLASS,
    unlearn_options: dict | None = None,
    progress: Progress | None = None,
    should_cancel: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
) -> GuardResult:
    """Screen, confirm and unlearn (see the module docstring); ``model`` itself is never changed.

    ``screen_per_class`` samples of each class are read first (``None``: all of them). Unlearning
    draws its clean samples from the screened share, which keeps the classes balanced; the
    confirmed classes' other samples take part as suspects or second-round flips.
    """
    say = progress or (lambda _stage, _f: None)
    timings = {} if timings is None else timings
    config = UnlearnConfig(**(unlearn_options or {}))
    with timed(Stage.DETECT_POISON, timings, say):
        split = split_tail(model, config.tail_share) if config.scope == "tail" else None
        cache_bytes = config.max_cache_mb * 2**20
        screen = screen_indices(data.labels, spec.num_classes, screen_per_class)
        partial = len(screen) < len(data)
        seen = feature_pass(
            model,
            data.subset(screen) if partial else data,
            spec,
            split=split,
            max_cache_bytes=cache_bytes,
            device=device,
            batch_size=batch_size,
            progress=lambda f: say(Stage.DETECT_POISON, 0.8 * f * len(screen) / len(data)),
            should_cancel=should_cancel,
        )
        labels = data.labels[screen]
        found = detect_poison(
            seen.for_detection(), labels, spec.num_classes, min_separation=MIN_SEPARATION, min_z=MIN_Z
        )
        record = {**found.to_dict(), "peaks": seen.peaks is not None, "screened": len(screen), "of": len(data)}

    with timed(Stage.CONFIRM, timings, say):
        test = GraftTest(
            model, data.images[screen], labels, spec, device=device, batch_size=batch_size, should_cancel=should_cancel
        )
        candidates = _candidates(found.scores, found.groups, screen, data, test)
        work, seen = screen, seen
        if partial and candidates:
            work, seen = _read_whole_classes(
                model,
                data,
                spec,
                seen,
                screen,
                [c.cls for c in candidates],
                split,
                cache_bytes,
                device=device,
                batch_size=batch_size,
                should_cancel=should_cancel,
                say=say,
            )
        counts = torch.bincount(data.labels, minlength=spec.num_classes)
        features = seen.for_detection()
        warps: WarpTest | None = None
        for i, cand in enumerate(candidates):
            members = (data.labels[work] == cand.cls).nonzero().flatten()
            score, small = class_split(features[members])
            cand.whole_score = score
            chosen, cand.side = poisoned_side(members, members[small], seen.logits, cand.cls, counts)
            genuine = work[members[~torch.isin(members, chosen)]].sort().values
            cand.suspects = work[chosen].sort().values
            cand.evidence = test.confirm(data, cand.suspects, genuine, cand.cls)
            if cand.evidence.swapped:  # the graft found the trigger on the other side of the split
                cand.suspects = genuine
            cand.unresolved = test.unresolved(cand.evidence)
            stands_out = score >= MIN_SEPARATION and cand.z >= MIN_Z
            if not cand.evidence.confirmed and (cand.unresolved or stands_out):  # no per-pixel pattern: a warp?
                warps = warps or WarpTest(
                    model, data.images[screen], labels, spec, device=device, should_cancel=should_cancel
                )
                ok, half, numbers, why = warps.confirm(
                    data, cand.suspects, genuine, cand.cls, _ordinary(found.scores, [c.cls for c in candidates])
                )
                cand.evidence.warp = numbers
                if ok:
                    cand.evidence.confirmed, cand.evidence.kind, cand.evidence.reason = True, "warp", why
                else:
                    cand.evidence.reason += f"; {why}"
                cand.unresolved = not ok and (cand.unresolved or half)
            say(Stage.CONFIRM, 0.5 + 0.5 * (i + 1) / len(candidates))
        verdict = _verdict(candidates, found.top, found.z)
        record.update(
            candidates=[c.to_dict() for c in candidates],
            flagged=bool(verdict.classes),
            target=verdict.classes[0] if len(verdict.classes) == 1 else None,
            targets=verdict.classes,
        )
        confirmed = [c for c in candidates if c.evidence is not None and c.evidence.confirmed]
    if not confirmed:
        return GuardResult(model, data, record, verdict, None)

    with timed(Stage.UNLEARN, timings, say):
        positions = torch.cat([c.suspects for c in confirmed if c.suspects is not None]).unique()  # sorted
        in_work = torch.full((len(data),), -1, dtype=torch.int64)
        in_work[work] = torch.arange(len(work))
        suspects = in_work[positions]
        record["suspects"] = len(suspects)
        tail = TailInputs(split.cut, seen.tail_inputs) if split is not None and seen.tail_inputs is not None else None
        subset = data.subset(work) if partial else data
        pool = torch.arange(len(screen)) if partial else None
        fixed, final, info = unlearn(
            model,
            subset,
            seen.logits,
            suspects,
            verdict.classes,
            spec,
            config,
            pool=pool,
            tail=tail,
            device=device,
            batch_size=batch_size,
            progress=lambda f: say(Stage.UNLEARN, f),
            should_cancel=should_cancel,
        )
        if config.scope == "tail" and tail is None:
            info["scope_note"] = (
                "no cut point leaves the tail enough of the network"
                if split is None
                else f"the tail's inputs would exceed max_cache_mb={config.max_cache_mb}"
            )
        final = work[final].sort().values  # positions in the training data as given
        info["suspect_indices"] = final.tolist()
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[final] = False
    return GuardResult(fixed.eval(), data.subset(keep.nonzero().flatten()), record, verdict, info)


def _candidates(
    scores: list[float | None], groups: list[torch.Tensor], screen: torch.Tensor, data: ImageData, test: GraftTest
) -> list[_Candidate]:
    """The classes worth confirming on their whole class, strongest first (at most ``MAX_CANDIDATES``).

    Either signal makes a candidate: a split that stands out from the other classes', or a small
    group whose graft already moves decisions on the screen. The second catches a trigger whose
    cluster the split scores modestly (a patch the averaged features dilute)."""
    found = []
    for c, score in enumerate(scores):
        if score is None:
            continue
        z = standing(scores, c)
        transfer = test.transfer(data.images[screen[groups[c]]], c) if len(groups[c]) else None
        why = []
        if score >= MIN_SEPARATION and z >= ESCALATE_Z:
            why.append("its split stands out")
        if transfer is not None and (
            max(transfer.broad, transfer.redirect) >= NOTABLE_FLIP or transfer.strongest >= NOTABLE_SOURCE
        ):
            why.append("its small group's pattern moves decisions")
        if why:
            found.append(_Candidate(c, score, z, " and ".join(why), screen_evidence=transfer))
    strength = {
        id(c): max(c.screen_evidence.broad, c.screen_evidence.redirect) if c.screen_evidence else 0.0 for c in found
    }
    found.sort(key=lambda c: (strength[id(c)], c.screen_score), reverse=True)
    return found[:MAX_CANDIDATES]


ORDINARY_CONTROLS = 2


def _ordinary(scores: list[float | None], candidates: list[int]) -> list[int]:
    """The classes a warp search is compared with: the non-candidates whose split scores are nearest the median."""
    scored = [(c, s) for c, s in enumerate(scores) if s is not None and c not in candidates]
    if not scored:
        return []
    middle = float(torch.tensor([s for _, s in scored]).median())
    return [c for c, _ in sorted(scored, key=lambda cs: abs(cs[1] - middle))[:ORDINARY_CONTROLS]]


def _verdict(candidates: list[_Candidate], top: int | None, z: float) -> Verdict:
    confirmed = [c for c in candidates if c.evidence is not None and c.evidence.confirmed]
    open_ = [c for c in candidates if c.unresolved]
    table = [c.to_dict() for c in candidates]
    unsure = "; ".join(
        f"class {c.cls} stood out but was not confirmed ({c.evidence.reason if c.evidence else ''})" for c in open_
    )
    if confirmed:
        classes = sorted(c.cls for c in confirmed)
        parts = [
            f"class {c.cls} ({len(c.suspects) if c.suspects is not None else 0} suspects; "
            f"{c.evidence.reason if c.evidence else ''})"
            for c in confirmed
        ]
        return Verdict(
            "backdoor_found",
            classes,
            "; ".join([*parts, *([unsure] if unsure else [])]),
            f"unlearned the suspects of class(es) {', '.join(map(str, classes))}, then clipped",
            table,
        )
    if open_:
        return Verdict("inconclusive", [], f"no trigger was confirmed; {unsure}", "nothing unlearned; clipped", table)
    if candidates:
        dismissed = "; ".join(f"class {c.cls} ({c.evidence.reason if c.evidence else c.reason})" for c in candidates)
        return Verdict(
            "no_evidence",
            [],
            "no group of the training data was shown to carry a trigger (a trigger built to hide from these "
            "tests can still be there; the clip is the only defense applied); tested and dismissed: " + dismissed,
            "nothing unlearned; clipped",
            table,
        )
    near = "" if top is None else f"; the highest-scoring class, {top}, stands {z:.1f} robust deviations above the rest"
    return Verdict(
        "no_evidence",
        [],
        f"no class's training data holds a group that stands out or carries a pattern{near} (a trigger built to "
        "hide from these tests can still be there; the clip is the only defense applied)",
        "nothing unlearned; clipped",
        table,
    )


def _read_whole_classes(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    seen: FeaturePass,
    screen: torch.Tensor,
    classes: list[int],
    split: Split | None,
    cache_bytes: int,
    *,
    device: torch.device | str,
    batch_size: int,
    should_cancel: Callable[[], bool] | None,
    say: Progress,
) -> tuple[torch.Tensor, FeaturePass]:
    """The screen plus the candidate classes' unread samples (positions in ``data``), and the pass over both.

    Why a second pass and not the first: which classes to confirm is decided on the screen; only
    those need every sample read, so every poisoned one can be named."""
    in_screen = torch.zeros(len(data), dtype=torch.bool)
    in_screen[screen] = True
    rest = (torch.isin(data.labels, torch.tensor(classes, dtype=torch.int64)) & ~in_screen).nonzero().flatten()
    if not len(rest):  # the screen already drew these classes whole
        return screen, seen
    # The cache limit is per pass: what the screen kept plus what the rest adds must fit.
    kept_bytes = 0 if seen.tail_inputs is None else seen.tail_inputs.numel() * seen.tail_inputs.element_size()
    more = feature_pass(
        model,
        data.subset(rest),
        spec,
        split=split if seen.tail_inputs is not None else None,
        max_cache_bytes=max(0, cache_bytes - kept_bytes),
        device=device,
        batch_size=batch_size,
        should_cancel=should_cancel,
        progress=lambda f: say(Stage.CONFIRM, 0.5 * f),
    )
    tails = (
        torch.cat([seen.tail_inputs, more.tail_inputs])
        if seen.tail_inputs is not None and more.tail_inputs is not None
        else None
    )
    peaks = torch.cat([seen.peaks, more.peaks]) if seen.peaks is not None and more.peaks is not None else None
    return torch.cat([screen, rest]), FeaturePass(
        torch.cat([seen.features, more.features]), torch.cat([seen.logits, more.logits]), tails, peaks
    )
