"""EP: entropy-based pruning from pre-activation distributions (Zheng et al., NeurIPS 2022).

On a training set that contains poisoned samples, a backdoor neuron's pre-activation is a
mixture of two well-separated modes (clean inputs vs. triggered inputs), so once
standardised its histogram has *lower* entropy than an ordinary neuron's roughly Gaussian
one. EP records, for one batch of the (poisoned) training data, each BN channel's input
summarised per sample by its spatial maximum, standardises it per channel, computes the
histogram entropy with a fixed bin width, and prunes channels below ``mean − u·std`` of
their layer by zeroing BN's γ and β. Its data assumption is exactly clipguard's: the
training set the defender already holds, no clean data.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from clipguard.data import ImageData
from clipguard.defenses.common import DefenseResult, Timer, inputs, outliers_below, prune_bn_channels
from clipguard.errors import ClipguardError
from clipguard.models import ModelSpec

DEFAULT_U = 3.0
DEFAULT_BIN = 0.1
"""Histogram bin width on standardised values (the survey's reading of BackdoorBench's EP)."""


def histogram_entropy(values: torch.Tensor, bin_width: float = DEFAULT_BIN) -> torch.Tensor:
    """Entropy (nats) of each row's histogram after standardising the row.

    ``values`` is ``(channels, samples)``. A constant row has entropy 0 (one bin).
    """
    v = values.double()
    mean = v.mean(1, keepdim=True)
    std = v.std(1, keepdim=True)
    z = torch.where(std > 0, (v - mean) / std.clamp_min(1e-12), torch.zeros_like(v))
    bins = torch.floor((z - z.min(1, keepdim=True).values) / bin_width).long()
    n_bins = int(bins.max()) + 1
    counts = torch.zeros(v.shape[0], n_bins, dtype=torch.float64).scatter_add_(1, bins, torch.ones_like(v))
    p = counts / v.shape[1]
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1).float()


def channel_entropies(
    model: nn.Module,
    spec: ModelSpec,
    images: torch.Tensor,
    device: torch.device | str,
    bin_width: float = DEFAULT_BIN,
) -> dict[str, torch.Tensor]:
    """Per BatchNorm2d (by name): the entropy of every channel's per-sample spatial-max input."""
    feats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):

            def hook(_m: nn.Module, inp: tuple, _out: torch.Tensor, name: str = name) -> None:
                x = inp[0].detach()
                feats[name] = x.reshape(x.shape[0], x.shape[1], -1).amax(-1).T.cpu()  # (C, N)

            hooks.append(m.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(inputs(images, spec, device))
    finally:
        for h in hooks:
            h.remove()
    return {name: histogram_entropy(f, bin_width) for name, f in feats.items()}


def ep(
    model: nn.Module,
    spec: ModelSpec,
    poisoned_train: ImageData,
    *,
    u: float = DEFAULT_U,
    batch: int = 256,
    bin_width: float = DEFAULT_BIN,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> DefenseResult:
    """Prune low-entropy BN channels measured on one random batch of the training data."""
    if len(poisoned_train) == 0:
        raise ClipguardError("EP needs training data")
    with Timer(device) as timer:
        pruned = copy.deepcopy(model).to(device)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(poisoned_train), generator=gen)[: min(batch, len(poisoned_train))]
        entropies = channel_entropies(pruned, spec, poisoned_train.images[idx], device, bin_width)
        if not entropies:
            raise ClipguardError(f"EP needs BatchNorm2d layers; {type(model).__name__} has none")
        modules = dict(pruned.named_modules())
        layers, total = {}, 0
        for name, ent in entropies.items():
            low = outliers_below(ent, u)
            if len(low):
                prune_bn_channels(modules[name], low)
            total += len(low)
            layers[name] = {
                "pruned": low.tolist(),
                "channels": int(ent.numel()),
                "entropy_mean": float(ent.mean()),
                "entropy_std": float(ent.std()) if ent.numel() > 1 else math.nan,
            }
        pruned = pruned.cpu().eval()
        seconds = timer.elapsed()
    return DefenseResult(
        pruned,
        seconds,
        {
            "defense": "ep",
            "u": u,
            "batch": len(idx),
            "bin_width": bin_width,
            "pruned_channels": total,
            "layers": layers,
        },
    )
