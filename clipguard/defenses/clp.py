"""CLP: data-free channel-Lipschitzness-based pruning (Zheng et al., ECCV 2022).

A backdoor channel must amplify a small trigger into a large activation, so its
upper bound on the channel Lipschitz constant (UCLC) stands out among the channels of its
layer. For each Conv→BN pair and output channel ``k`` the UCLC is the largest singular
value of the conv kernel ``W_k`` reshaped to ``(C_in, kh·kw)``, scaled by BN's per-channel
gain ``|γ_k| / sqrt(var_k + eps)``. Channels above ``mean + u·std`` of their layer are
pruned by zeroing BN's γ and β. It needs no data at all, which brackets clipguard (which
needs the training data) from below on data access.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clipguard.defenses.common import DefenseResult, Timer, conv_bn_pairs, outliers_above, prune_bn_channels
from clipguard.errors import ClipguardError
from clipguard.models import ModelSpec

DEFAULT_U = 3.0
"""CLP's default threshold (its ``test.py``; BackdoorBench sweeps u over 0..10)."""


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """UCLC per output channel of ``conv`` followed by ``bn`` (float32, CPU)."""
    w = conv.weight.detach().float()
    gain = bn.weight.detach().float().abs() if bn.weight is not None else torch.ones(bn.num_features)
    scale = gain / (bn.running_var.detach().float() + bn.eps).sqrt()  # type: ignore[union-attr]
    kernels = w.reshape(w.shape[0], w.shape[1], -1)  # (C_out, C_in, kh·kw)
    sigma = torch.linalg.matrix_norm(kernels, ord=2)  # largest singular value per channel
    return (sigma * scale).cpu()


def clp(model: nn.Module, spec: ModelSpec, *, u: float = DEFAULT_U) -> DefenseResult:
    """Prune, in a copy of ``model``, the channels whose UCLC is an upper outlier of their layer."""
    del spec  # data-free: the architecture spec is not needed, kept for the common interface
    with Timer() as timer:
        pruned = copy.deepcopy(model).cpu()
        pairs = conv_bn_pairs(pruned)
        if not pairs:
            raise ClipguardError(f"CLP needs Conv2d→BatchNorm2d pairs; {type(model).__name__} has none")
        layers = {}
        total = 0
        for conv_name, conv, bn_name, bn in pairs:
            scores = channel_lipschitz(conv, bn)
            idx = outliers_above(scores, u)
            if len(idx):
                prune_bn_channels(bn, idx)
            layers[bn_name] = {"conv": conv_name, "pruned": idx.tolist(), "channels": int(scores.numel())}
            total += len(idx)
        pruned.eval()
        seconds = timer.elapsed()
    return DefenseResult(
        pruned, seconds, {"defense": "clp", "u": u, "pairs": len(pairs), "pruned_channels": total, "layers": layers}
    )
