"""Masked blending on uint8 pixels, and seeded stand-ins for the trigger PNGs we cannot ship.

backdoor-toolbox stamps every adaptive trigger as ``x' = x + α·m·(t − x)`` on ``[0, 1]``
floats; :func:`paste` does the same on uint8 pixels and rounds once, so the pixels a victim
is trained on and the ones ASR is measured with are bit-identical on every device.

The toolbox reads its triggers from ``triggers/*.png`` (phoenix, firefox, badnet_patch4,
trojan_square). Those files are not part of this project and are not downloaded at run
time, so each is replaced by a pattern with the *same geometry* (position, size, mask) and
seeded colours; docs/attacks.md lists every substitution. Geometry is given for 32x32 and
anchored to the edge it sits on, so it also works on other image sizes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from clipguard.errors import DataError


def paste(images: torch.Tensor, pattern: torch.Tensor, alpha: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``round(x + α·m·(t − x))`` for uint8 ``images`` ``(N, 3, H, W)`` and a uint8 ``pattern`` ``(3, H, W)``.

    ``mask`` (0/1) is ``(H, W)`` for one mask or ``(N, 1, H, W)`` for one per image; none
    means the whole image. float64 keeps the rounding identical on CPU and CUDA (MPS has no
    float64).
    """
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    x = images.to(dtype)
    t = pattern.to(images.device, dtype)
    w = alpha if mask is None else alpha * mask.to(images.device, dtype)
    return (x + w * (t - x)).round_().clamp_(0, 255).to(torch.uint8)


def seeded(seed: int, salt: int) -> torch.Generator:
    """A generator per substitute trigger, so two triggers built from one seed do not share colours."""
    return torch.Generator().manual_seed(seed * 16 + salt)


def colours(generator: torch.Generator, height: int, width: int) -> torch.Tensor:
    """Uniform random uint8 colours ``(3, height, width)``: a stand-in for an image trigger's pixels."""
    return torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)


def _frame(image_size: tuple[int, int], block: torch.Tensor, row: int, col: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``block`` ``(3, h, w)`` placed at ``(row, col)`` of an empty frame: (pattern, mask)."""
    h, w = image_size
    pattern = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    bh, bw = block.shape[1:]
    pattern[:, row : row + bh, col : col + bw] = block
    mask[row : row + bh, col : col + bw] = 1
    return pattern, mask


def corner_patch(
    seed: int, image_size: tuple[int, int], corners: tuple[str, ...] = ("br",)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for ``phoenix_corner_32.png`` (a 5x5 patch at rows/cols 27-31 of 32x32).

    ``corners=("bl", "br")`` is ``phoenix_corner2_32.png``, Adap-Patch's test trigger: the same
    patch at the bottom-left and bottom-right corners.
    """
    h, w = image_size
    block = colours(seeded(seed, 1), 5, 5)
    pattern = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for corner in corners:
        p, m = _frame(image_size, block, h - 5, 0 if corner == "bl" else w - 5)
        pattern, mask = torch.where(m.bool(), p, pattern), mask | m
    return pattern, mask


def icon(seed: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for ``firefox_corner_32.png``: a 137-pixel disc in the 13x13 box rows 1-13, cols 18-30.

    The original is a 140-pixel icon in that box whose mask is its non-black pixels; a disc
    of radius² 42 has nearly the same area and footprint.
    """
    _, w = image_size
    i = torch.arange(13)
    disc = ((i[:, None] - 6) ** 2 + (i[None, :] - 6) ** 2 <= 42).to(torch.uint8)
    pattern, box = _frame(image_size, colours(seeded(seed, 2), 13, 13), 1, w - 14)
    mask = torch.zeros_like(box)
    mask[1:14, w - 14 : w - 1] = disc
    return pattern * mask, mask


def checker_corners(image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for ``badnet_patch4_32.png``: a 3x3 white/black checkerboard in each of the four corners.

    Its mask covers all four 3x3 corners (black cells are pasted too, as the toolbox's mask
    file says). The checkerboard has bright corners, like BadNets' ``checkerboard`` pattern.
    """
    h, w = image_size
    i = torch.arange(3)
    board = torch.where((i[:, None] + i[None, :]) % 2 == 0, 255, 0).to(torch.uint8).expand(3, 3, 3)
    pattern = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for r in (0, h - 3):
        for c in (0, w - 3):
            pattern[:, r : r + 3, c : c + 3] = board
            mask[r : r + 3, c : c + 3] = 1
    return pattern, mask


def square(seed: int, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in for ``trojan_square_32.png`` with its mask: an 8x8 square at rows/cols 21-28 of 32x32."""
    h, w = image_size
    return _frame(image_size, colours(seeded(seed, 3), 8, 8), h - 11, w - 11)


def check_trigger(
    name: str, tensors: dict[str, object], shapes: dict[str, tuple[int, ...]], masks: tuple[str, ...]
) -> None:
    """Trigger tensors are uint8 of the expected shapes and masks hold only 0 and 1: saved files are not trusted."""
    for label, shape in shapes.items():
        x = tensors[label]
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or tuple(x.shape) != shape:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"{name} {label} must be uint8 {shape}, got {got}")
    for label in masks:
        mask = tensors[label]
        if not isinstance(mask, torch.Tensor) or bool((mask > 1).any()):
            raise DataError(f"{name} {label} must hold 0 and 1 only")


def digest(*tensors: torch.Tensor) -> str:
    """sha256 over the tensors' bytes: what a saved attack records so a regenerated trigger can be checked."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def restore(
    name: str,
    saved: dict[str, torch.Tensor],
    keys: tuple[str, ...],
    expected: str | None,
    regenerate: Callable[[], tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """The trigger tensors of a saved attack: as saved, else regenerated; either way they must hash to ``expected``.

    ASR must be measured with the pixels the victim saw, so a regenerated trigger that does
    not match the recorded digest (another seed, another torch build) is refused.
    """
    if all(k in saved for k in keys):
        tensors = tuple(saved[k] for k in keys)
    elif expected:
        tensors = regenerate()
    else:
        raise DataError(f"saved {name} attack has neither its {', '.join(keys)} tensors nor a trigger_sha256")
    if expected and digest(*tensors) != expected:
        raise DataError(f"{name} trigger does not match the trigger_sha256 recorded with the attack")
    return tensors
