"""Adap-Blend and Adap-Patch (Qi et al., ICLR 2023): triggers built to defeat latent-separation defenses.

Both follow backdoor-toolbox (``poison_tool_box/adaptive_blend.py``, ``adaptive_patch.py``;
the official ``Unispac/Circumventing-Backdoor-Defenses`` has the same generators) with its
CIFAR-10 reproduction settings. Two ideas weaken the poisons' latent signature:

* *cover* samples (:mod:`clipguard.attacks.cover`) carry the trigger but keep their label;
* the training trigger is *weaker or partial* (a random half of the Adap-Blend pattern, or
  one of four low-opacity Adap-Patch triggers per image) while the test trigger is whole
  (the full pattern at a higher opacity, or two patch triggers together at full opacity).

Poisons and covers are drawn from one seeded permutation of the whole training set (any
class, target included), never overlapping, as the toolbox does.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

import torch

from clipguard.attacks.base import check_size, parse_float, parse_int
from clipguard.attacks.blend import load_trigger_image, noise_pattern
from clipguard.attacks.cover import CoverAttack, parse_cover_rate
from clipguard.attacks.patterns import (
    check_trigger,
    checker_corners,
    corner_patch,
    digest,
    icon,
    paste,
    restore,
    square,
)
from clipguard.errors import ClipguardError, DataError


class AdapBlend(CoverAttack):
    """Adap-Blend: a blend trigger cut into ``pieces`` blocks, a random ``mask_rate`` of them hidden per image.

    Training (poison and cover images alike): ``x' = x + alpha · m · (t − x)`` with a fresh
    block mask ``m`` per image. Test: the whole pattern at ``test_alpha``. Published
    CIFAR-10 setting: 4x4 blocks of 8x8, half masked, alpha 0.15, test_alpha 0.2, 0.3%
    poison and 0.3% cover. The published pattern is ``hellokitty_32.png``, which this
    project does not ship: ``image=`` takes any image file (resized as Blend does), and
    without one the pattern is seeded uniform noise (Blend's default).
    """

    name = "adap_blend"
    OPTIONS: ClassVar[tuple[str, ...]] = ("alpha", "test_alpha", "pieces", "mask_rate", "cover_rate", "image", "seed")

    def __init__(
        self,
        *,
        alpha: float = 0.15,
        test_alpha: float = 0.2,
        pieces: int = 16,
        mask_rate: float = 0.5,
        cover_rate: float | None = None,
        image: str | os.PathLike | None = None,
        seed: int = 0,
        pattern: torch.Tensor | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(cover_rate=cover_rate, target=target, mode=mode, image_size=image_size)
        for key, value in (("alpha", alpha), ("test_alpha", test_alpha)):
            if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ClipguardError(f"adap_blend {key} must be in (0, 1], got {value!r}")
        grid = math.isqrt(pieces) if isinstance(pieces, int) and pieces > 0 else 0
        h, w = self.image_size
        if grid * grid != pieces or grid > min(h, w):
            raise ClipguardError(
                f"adap_blend pieces must be a square number of blocks (4, 9, 16, ...) that fits "
                f"{h}x{w} images, got {pieces!r}"
            )
        if not isinstance(mask_rate, (int, float)) or not 0.0 <= mask_rate < 1.0:
            raise ClipguardError(f"adap_blend mask_rate must be in [0, 1), got {mask_rate!r}")
        self.alpha, self.test_alpha, self.pieces, self.mask_rate = (
            float(alpha),
            float(test_alpha),
            pieces,
            float(mask_rate),
        )
        self.image = os.fspath(image) if image is not None else None
        self.seed = int(seed)
        if pattern is None:
            pattern = (
                load_trigger_image(self.image, self.image_size)
                if self.image
                else noise_pattern(self.seed, self.image_size)
            )
        check_trigger("adap_blend", {"pattern": pattern}, {"pattern": (3, h, w)}, masks=())
        self.pattern = pattern.cpu().contiguous()
        # Which block each pixel belongs to: rows and columns cut into ``grid`` near-equal bands.
        rows = torch.arange(h) * grid // h
        cols = torch.arange(w) * grid // w
        self._block = rows[:, None] * grid + cols[None, :]

    @property
    def masked_pieces(self) -> int:
        return round(self.mask_rate * self.pieces)

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        return paste(images, self.pattern, self.test_alpha)

    def piece_masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random block masks ``(n, 1, H, W)`` (1 = trigger shown), each hiding ``masked_pieces`` blocks."""
        hidden = torch.rand(n, self.pieces, generator=generator, device=generator.device).argsort(1)
        shown = torch.ones(n, self.pieces, dtype=torch.uint8)
        shown.scatter_(1, hidden[:, : self.masked_pieces].cpu(), 0)
        return shown[:, self._block][:, None]

    def stamp_poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_size(self, images)
        if images.shape[0] == 0:
            return images.clone()
        masks = self.piece_masks(images.shape[0], generator)
        return paste(images, self.pattern, self.alpha, masks)

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "alpha": self.alpha,
            "test_alpha": self.test_alpha,
            "pieces": self.pieces,
            "mask_rate": self.mask_rate,
            "image": self.image,
            "seed": self.seed,
            "trigger_sha256": digest(self.pattern),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> AdapBlend:
        kwargs: dict = {"cover_rate": parse_cover_rate(options)}
        for key in ("alpha", "test_alpha"):
            if key in options:
                kwargs[key] = parse_float(key, options[key], 0.0, 1.0, open_lo=True)
        if "pieces" in options:
            kwargs["pieces"] = parse_int("pieces", options["pieces"], 1)
        if "mask_rate" in options:
            kwargs["mask_rate"] = parse_float("mask_rate", options["mask_rate"], 0.0, 1.0)
        seed = parse_int("seed", options["seed"], 0) if "seed" in options else seed
        return cls(
            image=options.get("image") or None, seed=seed, target=target, mode=mode, image_size=image_size, **kwargs
        )

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> AdapBlend:
        common, image = cls.common_state(params), params.get("image")

        def regenerate() -> tuple[torch.Tensor, ...]:
            # A saved record never makes us read a file it names: an image trigger needs its saved tensor.
            if image:
                raise DataError("saved adap_blend attack made from an image needs its 'pattern' tensor beside it")
            return (noise_pattern(common["seed"], common["image_size"]),)

        (pattern,) = restore("adap_blend", tensors, ("pattern",), params.get("trigger_sha256"), regenerate)
        return cls(
            alpha=float(params["alpha"]),
            test_alpha=float(params["test_alpha"]),
            pieces=int(params["pieces"]),
            mask_rate=float(params["mask_rate"]),
            image=image,
            pattern=pattern,
            **common,
        )


TRIGGERS = ("phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square")
TEST_TRIGGERS = ("phoenix_corner2", "badnet_patch4")
ALPHAS = (0.5, 0.2, 0.5, 0.3)
MIN_SIZE = 16


class AdapPatch(CoverAttack):
    """Adap-Patch with k = 4 patch triggers: one per training image, two together at test time.

    The sorted poison indices are cut into four quarters and quarter ``j`` gets trigger
    ``j`` at opacity ``alphas[j]``; the cover indices likewise. Test images get
    ``phoenix_corner2`` (the 5x5 patch at both bottom corners) then ``badnet_patch4`` (3x3
    checkerboards in the four corners), both at ``test_alpha`` (1). Published CIFAR-10
    setting: alphas 0.5 / 0.2 / 0.5 / 0.3, 0.3% poison and 0.6% cover. The trigger PNGs are
    replaced by seeded patterns of the same geometry (:mod:`clipguard.attacks.patterns`).
    """

    name = "adap_patch"
    COVER_RATIO = 2.0
    OPTIONS: ClassVar[tuple[str, ...]] = ("alphas", "test_alpha", "cover_rate", "seed")

    def __init__(
        self,
        *,
        alphas: tuple[float, ...] = ALPHAS,
        test_alpha: float = 1.0,
        cover_rate: float | None = None,
        seed: int = 0,
        triggers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(cover_rate=cover_rate, target=target, mode=mode, image_size=image_size)
        alphas = tuple(alphas)
        if len(alphas) != len(TRIGGERS) or not all(isinstance(a, (int, float)) and 0.0 < a <= 1.0 for a in alphas):
            raise ClipguardError(
                f"adap_patch alphas must be {len(TRIGGERS)} opacities in (0, 1] (for "
                f"{', '.join(TRIGGERS)}), got {alphas!r}"
            )
        if not isinstance(test_alpha, (int, float)) or not 0.0 < test_alpha <= 1.0:
            raise ClipguardError(f"adap_patch test_alpha must be in (0, 1], got {test_alpha!r}")
        h, w = self.image_size
        if min(h, w) < MIN_SIZE:
            raise ClipguardError(f"adap_patch triggers need images of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}")
        self.alphas, self.test_alpha, self.seed = tuple(float(a) for a in alphas), float(test_alpha), int(seed)
        patterns, masks, test_patterns, test_masks = (
            triggers if triggers is not None else patch_triggers(self.seed, self.image_size)
        )
        k, t = len(TRIGGERS), len(TEST_TRIGGERS)
        check_trigger(
            "adap_patch",
            {"patterns": patterns, "masks": masks, "test_patterns": test_patterns, "test_masks": test_masks},
            {"patterns": (k, 3, h, w), "masks": (k, h, w), "test_patterns": (t, 3, h, w), "test_masks": (t, h, w)},
            masks=("masks", "test_masks"),
        )
        self.patterns, self.masks = patterns.contiguous(), masks.contiguous()
        self.test_patterns, self.test_masks = test_patterns.contiguous(), test_masks.contiguous()

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        out = images
        for pattern, mask in zip(self.test_patterns, self.test_masks, strict=True):
            out = paste(out, pattern, self.test_alpha, mask)
        return out

    def trigger_ids(self, n: int) -> torch.Tensor:
        """Which training trigger each of ``n`` sorted poison (or cover) images gets: quarter ``j`` gets ``j``."""
        return torch.arange(n) * len(TRIGGERS) // max(n, 1)

    def stamp_poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        check_size(self, images)
        out = images.clone()
        ids = self.trigger_ids(images.shape[0]).to(images.device)
        for j in range(len(TRIGGERS)):
            sel = ids == j
            if bool(sel.any()):
                out[sel] = paste(images[sel], self.patterns[j], self.alphas[j], self.masks[j])
        return out

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "alphas": list(self.alphas),
            "test_alpha": self.test_alpha,
            "seed": self.seed,
            "triggers": list(TRIGGERS),
            "test_triggers": list(TEST_TRIGGERS),
            "trigger_sha256": digest(self.patterns, self.masks, self.test_patterns, self.test_masks),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "patterns": self.patterns,
            "masks": self.masks,
            "test_patterns": self.test_patterns,
            "test_masks": self.test_masks,
        }

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> AdapPatch:
        kwargs: dict = {"cover_rate": parse_cover_rate(options)}
        if "alphas" in options:
            parts = [p for p in options["alphas"].split(",") if p.strip()]
            if len(parts) != len(TRIGGERS):
                raise ClipguardError(
                    f"option alphas must list {len(TRIGGERS)} opacities (for {', '.join(TRIGGERS)}), "
                    f"got {options['alphas']!r}"
                )
            kwargs["alphas"] = tuple(parse_float("alphas", p, 0.0, 1.0, open_lo=True) for p in parts)
        if "test_alpha" in options:
            kwargs["test_alpha"] = parse_float("test_alpha", options["test_alpha"], 0.0, 1.0, open_lo=True)
        seed = parse_int("seed", options["seed"], 0) if "seed" in options else seed
        return cls(seed=seed, target=target, mode=mode, image_size=image_size, **kwargs)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> AdapPatch:
        common = cls.common_state(params)
        keys = ("patterns", "masks", "test_patterns", "test_masks")
        patterns, masks, test_patterns, test_masks = restore(
            "adap_patch",
            tensors,
            keys,
            params.get("trigger_sha256"),
            lambda: patch_triggers(common["seed"], common["image_size"]),
        )
        return cls(
            alphas=tuple(float(a) for a in params["alphas"]),
            test_alpha=float(params["test_alpha"]),
            triggers=(patterns, masks, test_patterns, test_masks),
            **common,
        )


def patch_triggers(
    seed: int, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Substitute Adap-Patch triggers: (patterns, masks) for :data:`TRIGGERS`, then for :data:`TEST_TRIGGERS`."""
    h, w = image_size
    if min(h, w) < MIN_SIZE:
        raise DataError(f"adap_patch triggers need images of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}")
    train = [
        corner_patch(seed, image_size),
        icon(seed, image_size),
        checker_corners(image_size),
        square(seed, image_size),
    ]
    test = [corner_patch(seed, image_size, ("bl", "br")), checker_corners(image_size)]
    return (
        torch.stack([p for p, _ in train]),
        torch.stack([m for _, m in train]),
        torch.stack([p for p, _ in test]),
        torch.stack([m for _, m in test]),
    )
