"""A hand-built image task whose classes live in spatial structure, as real images' do.

Why not Gaussian blobs in pixel space: there a class is its per-pixel mean, so moving any
image's pixel means towards a class (what :func:`clipguard.confirmation.graft` does) moves the
decision too, and every group looks like a trigger. In real images a class is a shape found
anywhere in the frame; per-pixel averages over many images are featureless. Here each class is
a 2x2 object of its own colour at a random place on a noisy 8x8 background, and the model is a
convolution with one template per class, a global max pool and a linear read-out. A backdoor is
one more template, for a saturated 2x2 square, wired to the target's logit: stamping the square
at a fixed corner sends any image there, while the square is nowhere in the genuine data.
"""

from __future__ import annotations

import torch
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.models import resolve_spec

SPEC = resolve_spec("small_cnn")
SIZE, OBJECT, CLASSES = 8, 2, 10
TRIGGER_ROWS = {0: (slice(0, 2), slice(0, 2)), 1: (slice(6, 8), slice(6, 8)), 2: (slice(0, 2), slice(6, 8))}
"""Where each of up to three triggers is stamped (top-left, bottom-right, top-right corners)."""
TRIGGER_COLOURS = {0: (255, 255, 255), 1: (255, 0, 255), 2: (0, 255, 255)}
"""Each trigger's colour: saturated, so that no genuine image holds one by chance, and each its own."""


def stamp(images: torch.Tensor, trigger: int = 0) -> torch.Tensor:
    """A copy of ``images`` with trigger ``trigger``'s square painted in."""
    out = images.clone()
    rows, cols = TRIGGER_ROWS[trigger]
    out[:, :, rows, cols] = torch.tensor(TRIGGER_COLOURS[trigger], dtype=torch.uint8).view(3, 1, 1)
    return out


def task(
    *,
    backdoors: tuple[int, ...] = (3,),
    poisoned_per_target: int = 20,
    mode_class: int | None = None,
    per_class: int = 300,
    seed: int = 0,
    strength: float = 50.0,
) -> tuple[nn.Module, ImageData, dict[int, torch.Tensor]]:
    """The model, the training data and, per backdoor target, the poisoned indices.

    Backdoor ``i`` (target ``backdoors[i]``) stamps trigger ``i`` on ``poisoned_per_target`` images
    of other classes and labels them with the target. ``mode_class`` gets a natural mode: a fifth of
    its images show the object in a darker shade, which the model still classifies by its hue. ``strength``
    is the weight of each trigger's template on its target's logit (a weak one sends only some images)."""
    g = torch.Generator().manual_seed(seed)
    n = CLASSES * per_class
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    colours = (torch.rand(CLASSES, 3, generator=g) * 2 - 1) * 90
    images = 128 + 16 * torch.randn(n, 3, SIZE, SIZE, generator=g)
    shade = torch.ones(n)
    if mode_class is not None:
        shade[(labels == mode_class).nonzero().flatten()[::5]] = 0.3
    ys = torch.randint(0, SIZE - OBJECT + 1, (n,), generator=g)
    xs = torch.randint(0, SIZE - OBJECT + 1, (n,), generator=g)
    for i in range(n):
        images[i, :, ys[i] : ys[i] + OBJECT, xs[i] : xs[i] + OBJECT] = (
            128 + shade[i] * colours[labels[i]][:, None, None] + 8 * torch.randn(3, OBJECT, OBJECT, generator=g)
        )
    images = images.clamp(0, 250).round().to(torch.uint8)  # 250: the white trigger appears nowhere by chance
    poisoned: dict[int, torch.Tensor] = {}
    taken = torch.zeros(n, dtype=torch.bool)
    for trigger, target in enumerate(backdoors):
        pick = ((labels != target) & ~taken).nonzero().flatten()
        pick = pick[torch.randperm(len(pick), generator=g)[:poisoned_per_target]].sort().values
        taken[pick] = True
        images[pick] = stamp(images[pick], trigger)
        labels[pick] = target
        poisoned[target] = pick
    data = ImageData(images, labels, tuple(str(c) for c in range(CLASSES)), "toy")
    return _model(colours, backdoors, strength), data, poisoned


def _model(colours: torch.Tensor, backdoors: tuple[int, ...], strength: float) -> nn.Module:
    mean = torch.tensor(SPEC.mean).view(3, 1, 1)
    std = torch.tensor(SPEC.std).view(3, 1, 1)
    grey = (128 / 255 - mean) / std
    templates = [((128 + colours[c]).view(3, 1, 1) / 255 - mean) / std - grey for c in range(CLASSES)]
    templates = [t / t.norm() for t in templates]
    squares = [
        ((torch.tensor(TRIGGER_COLOURS[i], dtype=torch.float32).view(3, 1, 1) / 255 - mean) / std) - grey
        for i in range(len(backdoors))
    ]
    templates += [t / t.norm() for t in squares]
    conv = nn.Conv2d(3, len(templates), OBJECT)
    read = nn.Linear(len(templates), CLASSES)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([t.expand(3, OBJECT, OBJECT) for t in templates]) / OBJECT**2)
        conv.bias.zero_()
        for i, square in enumerate(squares):  # silent unless the trigger's own square is there
            conv.bias[CLASSES + i] = -float(square.norm()) * 0.9
        read.weight.zero_()
        read.weight[:, :CLASSES] = torch.eye(CLASSES)
        read.bias.zero_()
        for i, target in enumerate(backdoors):
            read.weight[target, CLASSES + i] = strength
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), read).eval()
    return model


def hit_rate(model: nn.Module, images: torch.Tensor, target: int) -> float:
    """Share of ``images`` the model sends to ``target``."""
    with torch.no_grad():
        return float((model(normalize(images, SPEC.mean, SPEC.std)).argmax(1) == target).float().mean())
