"""Faster CPU execution for clipguard's passes and the baselines' loops, without changing what is computed.

The statistics pass and detection's feature pass are most of clipguard's cost, and both
are plain inference. Two rewrites make a CPU forward about twice as fast without changing
what is computed:

* **BatchNorm folded into the convolution before it** (eval mode: the normalisation is an
  affine map with fixed running statistics, so ``bn(conv(x))`` *is* a convolution with
  rescaled weights and a bias). One elementwise pass per block fewer; results agree to float
  rounding (~1e-7 relative).
* **channels_last** (NHWC) memory format: oneDNN's convolutions and, above all, max-pooling
  are much faster in it than in NCHW on a CPU (SmallCNN's forward: 0.37 s → 0.17 s per 512
  images on 2 cores, both rewrites together). Per-channel moments of NHWC activations need
  their own reduction (``clipguard.defenses.clipping``), which this format makes cheap too.

Training loops (NAD, MM-BM, guard's unlearning, ``clipguard train``) cannot fold a BatchNorm
that is still learning, but channels_last speeds their forward and backward on a CPU too
(SmallCNN, batch 128: 88-128 ms a step against 144-158 ms; ``train`` on 2,000 images, 2 epochs:
3.56 s against 4.58 s, medians of 3), so every loop gets it: the baselines are timed with the
same engineering as clipguard (:func:`fast_layout`).

A CPU pass also runs in pieces of :data:`CPU_PIECE` images (:func:`pieces`), whatever batch
its caller hands over: the activations of a small batch stay in cache between layers
(SmallCNN's forward over 1,024 images: 0.106 s in pieces of 64, 0.194 s in batches of 256;
ResNet-18 3.66 s against 4.66 s). Inference results do not depend on how a batch is cut, and a
gradient summed over pieces is the batch's gradient, so this too applies to every defense
whose network is fixed (the statistics, detection, every prediction pass, MM-BM); training
loops whose BatchNorms learn keep their batches, because there the cut changes the result.

Only CPU work is rewritten: on CUDA neither change has been measured here, so the model
runs as given. The copies never leave the pass that made them; purified models and exports
are built from, or returned in, the usual contiguous layout.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse


def rewrites_for(device: torch.device | str) -> bool:
    """Whether :func:`fast_copy` rewrites models for passes on ``device`` (CPU only; see module doc)."""
    return torch.device(device).type == "cpu"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy with every ``Conv → BatchNorm`` pair folded into one convolution.

    A graph module (e.g. one with clipguard's site modules spliced in) is folded as it is, so
    its extra modules survive; any other model is traced first. A model that cannot be
    traced, or a pair torch cannot fold, leaves an unfolded copy: folding only saves time.
    """
    model = model.eval()
    try:
        return fuse(model, no_trace=isinstance(model, fx.GraphModule))
    except Exception:  # tracing or folding failed: the plain copy computes the same thing
        return copy.deepcopy(model)


def fast_copy(model: nn.Module, device: torch.device | str) -> nn.Module:
    """An eval-mode copy of ``model`` for an inference pass on ``device``: the model itself off the CPU."""
    if not rewrites_for(device):
        return model.eval()
    return fold_batchnorm(model).to(memory_format=torch.channels_last)


CPU_PIECE = 64
"""Images per forward on a CPU (32-64 were fastest for SmallCNN, ResNet-18 and VGG-16 on 2 cores)."""


def piece_size(device: torch.device | str) -> int:
    """How many images one forward on ``device`` takes: :data:`CPU_PIECE` on a CPU, any number elsewhere."""
    return CPU_PIECE if rewrites_for(device) else sys.maxsize


def pieces(x: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """``x`` cut along the batch into :func:`piece_size` pieces, each in :func:`fast_input`'s format."""
    return tuple(fast_input(piece, device) for piece in x.split(piece_size(device)))


def fast_layout(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` itself, moved to channels_last on a CPU (for a loop that trains it); see :func:`usual_layout`."""
    return model.to(memory_format=torch.channels_last) if rewrites_for(device) else model


def usual_layout(model: nn.Module) -> nn.Module:
    """``model`` itself, back in the contiguous (NCHW) layout every consumer of a returned model expects."""
    return model.to(memory_format=torch.contiguous_format)


def fast_input(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` in the memory format :func:`fast_copy`'s model runs fastest on."""
    if rewrites_for(device) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
