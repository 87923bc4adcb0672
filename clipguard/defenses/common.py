"""What every baseline defense shares: its result type, timing, and small model utilities.

Each baseline (NAD, MM-BD, CLP, EP, UNIT) returns a :class:`DefenseResult` so the Table 1
benchmark can loop over them and score every purified model with the same metrics code.
Defenses never modify the model they are given: they work on a deep copy, because the
benchmark runs every defense on the *same* victim.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from clipguard.data import ImageData, normalize
from clipguard.errors import ClipguardError
from clipguard.models import ModelSpec


@dataclass
class DefenseResult:
    """A purified model in eval mode, the defense's wall time, and what it did (JSON-able)."""

    model: nn.Module
    seconds: float
    info: dict = field(default_factory=dict)


class Timer:
    """Wall time that waits for queued GPU work, so defense times compare fairly across devices."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.start = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def elapsed(self) -> float:
        self._sync()
        return time.perf_counter() - self.start

    def __exit__(self, *exc: object) -> None:
        return None


def working_copy(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy on ``device``: the caller's victim stays untouched for the next defense."""
    return copy.deepcopy(model).to(device)


def inputs(images: torch.Tensor, spec: ModelSpec, device: torch.device | str) -> torch.Tensor:
    """uint8 images to the normalised float input the model was trained on."""
    return normalize(images.to(device), spec.mean, spec.std)


def shuffled_batches(
    data: ImageData, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 ``(images, labels)`` batches in a fresh random order (augmentation is the caller's)."""
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield data.images[idx], data.labels[idx]


@torch.no_grad()
def accuracy(
    model: nn.Module, data: ImageData, spec: ModelSpec, device: torch.device | str, batch_size: int = 512
) -> float:
    """Clean accuracy of ``model`` on ``data`` (eval mode is restored by the caller if needed)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = inputs(data.images[start : start + batch_size], spec, device)
        correct += int((model(x).argmax(1).cpu() == data.labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(data))


def balanced_subset(data: ImageData, per_class: int, seed: int = 0) -> ImageData:
    """``per_class`` random images of every class: MM-BM's and UNIT's class-balanced clean sets."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(data.labels).tolist():
        idx = torch.nonzero(data.labels == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return data.subset(torch.cat(picks).sort().values)


def random_subset(data: ImageData, fraction: float, seed: int = 0) -> ImageData:
    """A uniformly random share of ``data`` (BackdoorBench's ``ratio`` clean subsets, no balancing)."""
    n = max(1, round(fraction * len(data)))
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    """Every ``Conv2d`` whose output feeds a ``BatchNorm2d`` directly, found in the traced graph.

    Why the graph and not module order: CLP's Lipschitz bound combines a conv's weights with
    the BN that normalises *that conv's* output. In a pre-activation ResNet the BN that follows
    a conv in module order normalises something else (CLP's issue #2 on WaNet PreAct), so
    pairing by order silently computes nonsense. If the model cannot be traced we fall back
    to module order, but only for adjacent conv/BN modules with matching channel counts.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception:  # data-dependent control flow: fall back to module order
        return _pairs_by_order(model)
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules.get(str(src.target)), nn.Conv2d):
            conv, bn = modules[str(src.target)], modules[str(node.target)]
            if conv.out_channels == bn.num_features:
                pairs.append((str(src.target), conv, str(node.target), bn))
    return pairs


def _pairs_by_order(model: nn.Module) -> list[tuple[str, nn.Conv2d, str, nn.BatchNorm2d]]:
    pairs = []
    prev: tuple[str, nn.Module] | None = None
    for name, m in model.named_modules():
        if (
            isinstance(m, nn.BatchNorm2d)
            and prev is not None
            and isinstance(prev[1], nn.Conv2d)
            and prev[1].out_channels == m.num_features
        ):
            pairs.append((prev[0], prev[1], name, m))
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            prev = (name, m)
    return pairs


def prune_bn_channels(bn: nn.BatchNorm2d, channels: torch.Tensor) -> None:
    """Silence channels by zeroing BN's γ and β: the channel then outputs 0 for every input."""
    if bn.weight is None or bn.bias is None:
        raise ClipguardError("channel pruning needs BatchNorm with affine parameters")
    with torch.no_grad():
        bn.weight[channels] = 0.0
        bn.bias[channels] = 0.0


def outliers_above(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices with score > mean + u·std over the layer (CLP's rule; std unbiased as torch's default)."""
    if scores.numel() < 2:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(scores > scores.mean() + u * scores.std()).flatten()


def outliers_below(scores: torch.Tensor, u: float) -> torch.Tensor:
    """Indices with score < mean − u·std over the layer (EP's rule on entropies)."""
    if scores.numel() < 2:
        return torch.empty(0, dtype=torch.int64)
    return torch.nonzero(scores < scores.mean() - u * scores.std()).flatten()


# --------------------------------------------------------------------------- learnable clip bounds


class LearnableClip(nn.Module):
    """``min(x, upper)`` with a trainable bound; the optimisation-time twin of ``clipping.Clip``.

    MM-BM and UNIT *optimise* their bounds, then the result is frozen into clipguard's own
    :class:`~clipguard.defenses.clipping.Clip` via ``clipped_model``, so every clipping
    defense is exported and scored through the same graph surgery as clipguard itself.
    """

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.upper = nn.Parameter(upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.upper.to(x.dtype))


def site_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per activation site (clipguard's names), the shape of one sample's activation."""
    from clipguard.defenses.clipping import Tap, instrument, site_modules

    gm, names = instrument(model, lambda _n, _i: Tap())
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tap in zip(names, site_modules(gm), strict=True):

        def hook(_m: nn.Module, _i: tuple, out: torch.Tensor, name: str = name) -> None:
            shapes.setdefault(name, tuple(int(s) for s in out.shape[1:]))

        tap.register_forward_hook(hook)
    gm.eval()
    with torch.no_grad():
        gm(example[:1])
    return shapes


def channel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-channel bound's shape for one sample's activation: (C, 1, 1) for maps, (C,) for vectors."""
    return (shape[0], *([1] * (len(shape) - 1)))


def learnable_clipped(
    model: nn.Module, init: dict[str, torch.Tensor]
) -> tuple[fx.GraphModule, dict[str, LearnableClip]]:
    """``model`` traced with a :class:`LearnableClip` at every site named in ``init`` (others untouched).

    The network's own parameters are frozen: only the bounds train.
    """
    from clipguard.defenses.clipping import Tap, instrument

    clips: dict[str, LearnableClip] = {}

    def make(name: str, _i: int) -> nn.Module:
        if name in init:
            clips[name] = LearnableClip(init[name])
            return clips[name]
        return Tap()

    gm, names = instrument(model, make)
    unknown = set(init) - set(names)
    if unknown:
        raise ClipguardError(f"no such activation sites: {sorted(unknown)[:3]}")
    for name, param in gm.named_parameters():
        if not name.startswith("clipguard_sites."):
            param.requires_grad_(False)
    gm.eval()
    return gm, clips


def frozen_bounds(clips: dict[str, LearnableClip]) -> dict[str, torch.Tensor]:
    """The learnt bounds as plain CPU tensors, ready for ``clipping.clipped_model``."""
    return {name: clip.upper.detach().float().cpu().clone() for name, clip in clips.items()}
