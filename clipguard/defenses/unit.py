"""UNIT: per-neuron activation bounds, initialised from clean statistics, then tightened (Cheng et al., ECCV 2024).

UNIT is clipguard's closest relative. Both cap every activation at a per-node upper
bound; UNIT starts exactly where clipguard's recipe ends, at ``μ + 4σ`` per *neuron*
(C×H×W, statistics over the batch only) on clean data, and then *optimises* the bounds
on that clean data: Adam (lr 1e-3, betas 0.5/0.9), 300 full-batch steps of
``CE + cost · Σ_sites mean(bound)``. The cost adapts like Neural Cleanse's: it starts at
1e-3, is multiplied by 2 after ``patience`` (5) consecutive steps whose validation
accuracy is within ``acc_degrade`` (3 points) of the unclipped model's, and divided by
2^1.5 after 5 consecutive steps below. The kept solution is the feasible one with the
smallest total bound. Clean data: 5% of the training set, class-balanced, split 80/20
into optimisation and validation parts (survey §5, ``Megum1/UNIT:unit.py``).

How clipguard differs: clipguard computes ``μ + λσ`` on the (possibly poisoned)
training data and stops there, with no clean data and no optimisation. UNIT's bounds here
are also projected to stay at or below their initial value after every step, which keeps
the method a *tightening* of its starting point (the released code does not project).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import ImageData, iter_batches
from clipguard.defenses.clipping import clipped_model, compute_statistics
from clipguard.defenses.common import DefenseResult, Timer, frozen_bounds, inputs, learnable_clipped
from clipguard.errors import ClipguardError
from clipguard.metrics import accuracy
from clipguard.models import ModelSpec

INIT_LAMBDA = 4.0


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return accuracy(pred, y)


def unit(
    model: nn.Module,
    spec: ModelSpec,
    clean: ImageData,
    *,
    steps: int = 300,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.5, 0.9),
    init_lambda: float = INIT_LAMBDA,
    cost_init: float = 1e-3,
    cost_up: float = 2.0,
    cost_down: float = 2.0**1.5,
    patience: int = 5,
    acc_degrade: float = 0.03,
    val_fraction: float = 0.2,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> DefenseResult:
    """Clip at μ+4σ per neuron (clean data), then shrink the bounds under a validation-accuracy constraint.

    ``batch_size=None`` is UNIT's full-batch step; a number accumulates gradients over
    chunks of that size (the same step, less memory).
    """
    if len(clean) < 2:
        raise ClipguardError("UNIT needs clean data (at least two images)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with Timer(device) as timer:
        net = copy.deepcopy(model).to(device).eval()
        order = torch.randperm(len(clean), generator=gen)
        n_val = max(1, round(val_fraction * len(clean)))
        train, val = clean.subset(order[n_val:]), clean.subset(order[:n_val])
        stats = compute_statistics(
            net, lambda: iter_batches(train, 512, spec.mean, spec.std, device), granularity="element"
        )
        init = {name: b.to(device) for name, b in stats.bounds(init_lambda).items()}
        x_tr, y_tr = inputs(train.whole("UNIT"), spec, device), train.labels.to(device)
        x_val, y_val = inputs(val.whole("UNIT"), spec, device), val.labels.to(device)
        base_val = _accuracy(net, x_val, y_val)
        threshold = base_val - acc_degrade
        gm, clips = learnable_clipped(net, init)
        gm = gm.to(device)
        opt = torch.optim.Adam([c.upper for c in clips.values()], lr=lr, betas=betas)
        chunk = batch_size or len(x_tr)

        def total_bound() -> float:
            return float(sum(c.upper.detach().mean() for c in clips.values()))

        start_val = _accuracy(gm, x_val, y_val)
        best = frozen_bounds(clips)
        best_total, best_step = total_bound(), 0
        best_val = start_val
        cost = cost_init
        up = down = 0
        history = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            ce_sum = 0.0
            for i in range(0, len(x_tr), chunk):
                ce = F.cross_entropy(gm(x_tr[i : i + chunk]), y_tr[i : i + chunk], reduction="sum") / len(x_tr)
                ce.backward()
                ce_sum += float(ce.detach())
            reg = cost * sum(c.upper.mean() for c in clips.values())
            reg.backward()  # type: ignore[union-attr]
            opt.step()
            with torch.no_grad():
                for name, clip in clips.items():
                    clip.upper.copy_(torch.minimum(clip.upper, init[name]))
            val_acc = _accuracy(gm, x_val, y_val)
            tb = total_bound()
            feasible = val_acc >= threshold
            if feasible and tb < best_total:
                best, best_total, best_step, best_val = frozen_bounds(clips), tb, step + 1, val_acc
            if feasible:
                up, down = up + 1, 0
            else:
                up, down = 0, down + 1
            if up >= patience:
                cost, up = cost * cost_up, 0
            elif down >= patience:
                cost, down = cost / cost_down, 0
            history.append({"step": step + 1, "ce": ce_sum, "cost": cost, "val_acc": val_acc, "total_bound": tb})
        purified = clipped_model(net.cpu(), best)
        seconds = timer.elapsed()
    init_total = float(sum(b.mean() for b in init.values()))
    info = {
        "defense": "unit",
        "clean_samples": len(clean),
        "train_samples": len(train),
        "val_samples": len(val),
        "steps": steps,
        "lr": lr,
        "init_lambda": init_lambda,
        "acc_degrade": acc_degrade,
        "base_val_acc": base_val,
        "init_val_acc": start_val,
        "best_val_acc": best_val,
        "best_step": best_step,
        "init_total_bound": init_total,
        "best_total_bound": best_total,
        "final_cost": cost,
        "history": history[:: max(1, len(history) // 50)],
        "sites": list(init),
        "train_indices": order[n_val:].tolist(),
        # tensors, for tests and reports; JSON writers drop them
        "init_bounds": {n: b.cpu() for n, b in init.items()},
    }
    return DefenseResult(purified, seconds, info)
