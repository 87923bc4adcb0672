"""``--lam auto``: choose λ from the training data alone, and keep the evidence.

Smaller λ clips harder: it removes more of a backdoor and more of the clean signal. Without
clean data we cannot measure clean accuracy, but we can measure how much the clipped model
*disagrees* with the suspect model on the training data, grouped by the class the suspect
model predicts.

Why per class: clipping that breaks the backdoor flips the poisoned training samples away
from the target class, so the disagreement concentrates in *one* predicted class (all-to-one
attacks) or spreads thinly (all-to-all). Clipping that destroys clean features instead flips
samples in every class. So the rule takes the smallest λ on the grid at which the classes
other than the single most-affected one keep agreeing with the suspect model to within
``tolerance``: a backdoor is allowed to break, clean behaviour is not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from clipguard.data import ImageData
from clipguard.defenses.clipping import SiteStats, clipped_model
from clipguard.errors import Cancelled
from clipguard.metrics import predict
from clipguard.models import ModelSpec

DEFAULT_GRID: tuple[float, ...] = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
DEFAULT_TOLERANCE = 0.02
DEFAULT_SAMPLES = 5000


def agreement_by_class(ref: torch.Tensor, pred: torch.Tensor, num_classes: int) -> list[float]:
    """Per predicted class (of the suspect model): share of samples the clipped model agrees on."""
    out = []
    for c in range(num_classes):
        mask = ref == c
        out.append(float((pred[mask] == c).float().mean()) if mask.any() else 1.0)
    return out


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
    seed: int = 0,
    batch_size: int = 512,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[float, dict]:
    """The chosen λ and a JSON-able record of the sweep that chose it."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=gen)[: min(max_samples, len(data))]
    ref = predict(model, data, spec.mean, spec.std, device=device, batch_size=batch_size, indices=idx)
    rows = []
    chosen = None
    for i, lam in enumerate(sorted(grid)):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled during the λ sweep")
        clipped = clipped_model(model, stats.bounds(lam)).to(device)
        pred = predict(clipped, data, spec.mean, spec.std, device=device, batch_size=batch_size, indices=idx)
        per_class = agreement_by_class(ref, pred, spec.num_classes)
        worst = min(range(len(per_class)), key=per_class.__getitem__)
        others = [a for c, a in enumerate(per_class) if c != worst]
        criterion = min(others) if others else 1.0
        ok = criterion >= 1.0 - tolerance
        rows.append({"lam": lam, "agreement": float((pred == ref).float().mean()), "per_class": per_class,
                     "most_affected_class": worst, "others_min_agreement": criterion, "accepted": ok})
        if progress is not None:
            progress((i + 1) / len(grid))
        if ok and chosen is None:
            chosen = lam
            break
    if chosen is None:
        chosen = max(grid)
    evidence = {"rule": "smallest λ whose per-class agreement with the suspect model, excluding the most "
                        f"affected class, stays >= {1 - tolerance:.3f}",
                "tolerance": tolerance, "samples": len(idx), "grid": sorted(grid), "sweep": rows,
                "chosen": chosen}
    return chosen, evidence
