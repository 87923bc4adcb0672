"""Blended (Chen et al. 2017): the whole image is mixed with a fixed trigger image.

``x' = round((1 - α) x + α t)`` clipped to uint8, with α = 0.2 at train and test time as
in BackdoorBench v2. ``t`` is either a user image (BackdoorBench uses hello-kitty, resized
to the image size with its aspect squashed) or, by default, a fixed uniform-noise image
drawn from ``seed`` (the ANP lineage's random-noise variant): no asset file is needed and
the pattern is still reproducible. The pattern itself is saved with the attack, so ASR is
always measured with the exact pixels the victim saw, even if the source file changes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from clipguard.attacks.base import Attack, check_size, parse_float, parse_int
from clipguard.errors import ClipguardError, DataError

MAX_TRIGGER_PIXELS = 8192 * 8192


class Blend(Attack):
    """Alpha-blend every pixel with a fixed uint8 ``(3, H, W)`` pattern."""

    name = "blend"
    OPTIONS: ClassVar[tuple[str, ...]] = ("alpha", "image", "seed")

    def __init__(
        self,
        *,
        alpha: float = 0.2,
        image: str | os.PathLike | None = None,
        seed: int = 0,
        pattern: torch.Tensor | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(target=target, mode=mode, image_size=image_size)
        if not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ClipguardError(f"blend alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.image = os.fspath(image) if image is not None else None
        if pattern is None:
            pattern = (
                load_trigger_image(self.image, self.image_size)
                if self.image
                else noise_pattern(self.seed, self.image_size)
            )
        h, w = self.image_size
        if not isinstance(pattern, torch.Tensor) or pattern.dtype != torch.uint8 or tuple(pattern.shape) != (3, h, w):
            got = f"{pattern.dtype} {tuple(pattern.shape)}" if isinstance(pattern, torch.Tensor) else type(pattern)
            raise DataError(f"blend pattern must be uint8 (3, {h}, {w}), got {got}")
        self.pattern = pattern.cpu().contiguous()

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        # float64 so the rounding is exact and identical on every device (MPS has no float64).
        dtype = torch.float32 if images.device.type == "mps" else torch.float64
        x = images.to(dtype)
        t = self.pattern.to(images.device, dtype)
        return (x * (1.0 - self.alpha) + t * self.alpha).round_().clamp_(0, 255).to(torch.uint8)

    def to_dict(self) -> dict:
        digest = hashlib.sha256(self.pattern.numpy().tobytes()).hexdigest()
        return super().to_dict() | {
            "alpha": self.alpha,
            "image": self.image,
            "seed": self.seed,
            "pattern_sha256": digest,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> Blend:
        alpha = parse_float("alpha", options["alpha"], 0.0, 1.0, open_lo=True) if "alpha" in options else 0.2
        seed = parse_int("seed", options["seed"], 0) if "seed" in options else seed
        image = options.get("image") or None
        return cls(alpha=alpha, image=image, seed=seed, target=target, mode=mode, image_size=image_size)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> Blend:
        # Without the saved pattern, regenerate it (noise seed or image file) but only accept
        # it if it hashes to what was recorded: ASR must be measured with the same pixels.
        expected = params.get("pattern_sha256")
        if "pattern" not in tensors and not expected:
            raise DataError("saved blend attack has neither its 'pattern' tensor nor a pattern_sha256")
        attack = cls(
            alpha=float(params["alpha"]),
            image=params.get("image"),
            seed=int(params.get("seed", 0)),
            pattern=tensors.get("pattern"),
            target=int(params["target"]),
            mode=str(params["mode"]),
            image_size=tuple(params["image_size"]),
        )
        if expected and attack.to_dict()["pattern_sha256"] != expected:
            raise DataError("blend pattern does not match the pattern_sha256 recorded with the attack")
        return attack


def noise_pattern(seed: int, image_size: tuple[int, int]) -> torch.Tensor:
    """Uniform uint8 noise, fixed by ``seed``: a reproducible trigger that needs no asset file."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *image_size), generator=gen, dtype=torch.uint8)


def load_trigger_image(path: str | os.PathLike, image_size: tuple[int, int]) -> torch.Tensor:
    """Read a trigger image as RGB, resized (aspect squashed, as BackdoorBench does) to ``image_size``."""
    from PIL import Image

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"blend trigger image not found: {p}")
    try:
        with Image.open(p) as source:
            w, h = source.size
            if w * h > MAX_TRIGGER_PIXELS:
                raise DataError(f"blend trigger image {p} declares {w}x{h} pixels, over the {MAX_TRIGGER_PIXELS} cap")
            im = source.convert("RGB")
            if im.size != (image_size[1], image_size[0]):
                im = im.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read blend trigger image {p} ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
