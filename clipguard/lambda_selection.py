"""``--lam auto``: choose λ from the training data alone, and keep the evidence.

Smaller λ clips harder: it removes more of a backdoor and more of the clean signal. Without
clean data we cannot measure clean accuracy, but we can measure how much accuracy on the
training data itself the clipping costs, class by class (classes by their training label).

Why per class, and why drop the worst class: clipping that breaks an all-to-one backdoor
flips the poisoned training samples, which all carry the target label, so their loss
lands in *one* class; an all-to-all backdoor spreads its poisoned share thinly over every
class. Clipping that destroys clean features costs accuracy in every class. So the rule
takes the smallest λ on the grid at which the mean accuracy drop over all classes but the
most-affected one stays within ``tolerance``: a backdoor is allowed to break, clean
behaviour is not.

After guard has unlearned the backdoor (``rule="agreement"``) there is nothing left that may
break: the clip is a second line against what unlearning missed, and every decision it changes on
the training data (the suspects already removed) is clean behaviour lost. So that rule takes the
smallest λ whose clipped model agrees with the unclipped one on all but ``tolerance`` of the
samples. The class-drop rule's 2% would have chosen λ = 4 there and cost 1.8-2.5 points of test
accuracy against λ = 6 (docs/lab/benchmarks.md); agreement at 2% chose λ = 6.

Why the mean and a loose-looking tolerance: victims fit their training data better than
unseen data, and clipping costs more accuracy on memorised training samples than on test
images, so the training-data drop is a conservative proxy; docs/method.md and
docs/lab/benchmarks.md have the measurements and the sweeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipguard.data import SAMPLE_SEED, ImageData
from clipguard.defenses.clipping import SiteStats, clipped_model
from clipguard.errors import Cancelled
from clipguard.metrics import per_class_accuracy, predict
from clipguard.models import ModelSpec

DEFAULT_GRID: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
DEFAULT_TOLERANCE = 0.02
RULES = ("class_drop", "agreement")
DEFAULT_SAMPLES = 5000


def accuracy_by_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Per training label: share of samples predicted as their label (1.0 for an absent class: it cannot drop)."""
    return [1.0 if acc is None else acc for acc in per_class_accuracy(pred, labels, num_classes)]


def select_lambda(
    model: nn.Module,
    stats: SiteStats,
    data: ImageData,
    spec: ModelSpec,
    *,
    device: torch.device | str = "cpu",
    grid: Sequence[float] = DEFAULT_GRID,
    tolerance: float = DEFAULT_TOLERANCE,
    max_samples: int = DEFAULT_SAMPLES,
    seed: int = SAMPLE_SEED,
    rule: str = "class_drop",
    batch_size: int = 512,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[float, dict]:
    """The chosen λ and a JSON-able record of the sweep that chose it.

    ``rule``: ``"class_drop"`` for a model that may still carry a backdoor (the paper's recipe),
    ``"agreement"`` for one whose backdoor was already unlearned (guard); see the module docstring.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[: min(max_samples, len(data))]
    labels = data.labels[idx]
    ref = predict(model, data, spec.mean, spec.std, device=device, batch_size=batch_size, indices=idx)
    base = accuracy_by_class(ref, labels, spec.num_classes)
    rows = []
    chosen = None
    for i, lam in enumerate(sorted(grid)):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled during the λ sweep")
        clipped = clipped_model(model, stats.bounds(lam)).to(device)
        pred = _predict_unless_rejected(
            clipped, data, spec, idx, labels, ref, base, rule, tolerance, device, batch_size
        )
        n = len(pred)  # all of idx, or the prefix after which the rule could no longer accept this λ
        scored_base = base if n == len(idx) else accuracy_by_class(ref[:n], labels[:n], spec.num_classes)
        drops = [b - a for a, b in zip(accuracy_by_class(pred, labels[:n], spec.num_classes), scored_base, strict=True)]
        worst = max(range(len(drops)), key=drops.__getitem__)
        others = [d for c, d in enumerate(drops) if c != worst]
        mean_drop_others = sum(others) / len(others) if others else 0.0
        agreement = float((pred == ref[:n]).float().mean())
        ok = n == len(idx) and (mean_drop_others if rule == "class_drop" else 1.0 - agreement) <= tolerance
        rows.append(
            {
                "lam": lam,
                "samples": n,
                "train_acc": float((pred == labels[:n]).float().mean()),
                "agreement": agreement,
                "drop_by_class": drops,
                "most_affected_class": worst,
                "mean_drop_others": mean_drop_others,
                "accepted": ok,
            }
        )
        if progress is not None:
            progress((i + 1) / len(grid))
        if ok:
            chosen = lam
            break
    if chosen is None:
        chosen = max(grid)
    words = (
        f"smallest λ whose mean per-class training-accuracy drop, excluding the most affected class, is at "
        f"most {tolerance:.3f}"
        if rule == "class_drop"
        else f"smallest λ whose clipped model disagrees with the unclipped one on at most {tolerance:.3f} of the "
        "training samples"
    )
    evidence = {
        "rule": words,
        "criterion": rule,
        "tolerance": tolerance,
        "samples": len(idx),
        "train_acc_before": float((ref == labels).float().mean()),
        "grid": sorted(grid),
        "sweep": rows,
        "chosen": chosen,
    }
    return chosen, evidence


def _predict_unless_rejected(
    clipped: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    idx: torch.Tensor,
    labels: torch.Tensor,
    ref: torch.Tensor,
    base: Sequence[float],
    rule: str,
    tolerance: float,
    device: torch.device | str,
    batch_size: int,
) -> torch.Tensor:
    """Predictions on ``idx`` in order, stopped as soon as the rule can no longer accept this λ.

    Why: most of the grid is far from the answer (a hard clip changes a large share of decisions
    in the first batch), and scoring every image there was most of ``--lam auto``'s time. The
    stop is exact, never a guess, so the chosen λ is what the full sweep would choose:

    * ``agreement``: more disagreements than ``tolerance`` allows over *all* of ``idx``;
    * ``class_drop``: even if every sample still to come were predicted right, each class's drop
      would be at least ``lower``; the sum of all drops but the largest is then at least the sum
      of all lower bounds but the largest, over ``tolerance``.
    """
    n, classes = len(idx), len(base)
    per_class = torch.bincount(labels, minlength=classes).double()
    base_t = torch.tensor(base, dtype=torch.float64)
    right = torch.zeros(classes, dtype=torch.float64)
    seen = torch.zeros(classes, dtype=torch.float64)
    disagree = 0

    def cannot_pass(start: int, pred: torch.Tensor) -> bool:
        nonlocal disagree, right, seen
        end = start + len(pred)
        if rule == "agreement":
            disagree += int((pred != ref[start:end]).sum())
            return disagree > tolerance * n
        lab = labels[start:end]
        right += torch.bincount(lab[pred == lab], minlength=classes).double()
        seen += torch.bincount(lab, minlength=classes).double()
        best_acc = torch.where(per_class > 0, (right + per_class - seen) / per_class.clamp_min(1), 1.0)
        lower = (base_t - best_acc).tolist()
        return classes > 1 and (sum(lower) - max(lower)) / (classes - 1) > tolerance

    return predict(
        clipped, data, spec.mean, spec.std, device=device, batch_size=batch_size, indices=idx, stop=cannot_pass
    )
