"""SIG (Barni, Kallas & Tondi 2019): a horizontal sinusoid added to the whole image.

``x' = clip(x + Δ·sin(2π j f / W))`` for every row, channel and column ``j`` of a ``W``-wide
image, in 0-255 pixel units. Defaults are BackdoorBench v2's (``config/attack/sig/default.yaml``
and its ``sigTriggerAttack`` transform): Δ = 40, f = 6, the same signal at train and test
time, so results line up with the BackdoorBench leaderboard's SIG column. The paper's own
setting is Δ = 20 (``delta=20``); backdoor-toolbox uses Δ = 30/255 of a ``[0, 1]`` image
(``delta=30``). The offset is rounded to whole pixel levels once per column (BackdoorBench
truncates the sum instead), so the trigger is an exact integer offset.

Label rule (option ``label``):

* ``clean`` (default, as published): only target-class training images are triggered and
  they keep their label. ``rate * N`` of them, ``N`` the whole training set, as BackdoorBench
  and backdoor-toolbox count, so 0.5% of CIFAR-10 is 250 of the 5,000 target images.
* ``dirty``: images of any class, relabelled to the target (BackdoorBench's general rule).

ASR is measured on non-target test images either way. All-to-all needs ``dirty``: a
clean-label poison keeps its label, which cannot be ``(y + 1) % K``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from clipguard.attacks.base import Attack, check_size, parse_float, parse_int
from clipguard.attacks.patterns import digest, restore
from clipguard.errors import ClipguardError, DataError

LABELS = ("clean", "dirty")


class SIG(Attack):
    """Add a fixed horizontal sinusoid of amplitude ``delta`` and ``freq`` periods per image width."""

    name = "sig"
    OPTIONS: ClassVar[tuple[str, ...]] = ("delta", "freq", "label")

    def __init__(
        self,
        *,
        delta: float = 40.0,
        freq: int = 6,
        label: str | None = None,
        offset: torch.Tensor | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(target=target, mode=mode, image_size=image_size)
        if not isinstance(delta, (int, float)) or not 0 < delta <= 255 or not math.isfinite(delta):
            raise ClipguardError(f"sig delta must be in (0, 255], got {delta!r}")
        if not isinstance(freq, int) or isinstance(freq, bool) or freq < 1:
            raise ClipguardError(f"sig freq must be a positive integer, got {freq!r}")
        if label is None:  # the published clean-label rule, unless all-to-all makes it impossible
            label = "dirty" if self.mode == "all_to_all" else "clean"
        if label not in LABELS:
            raise ClipguardError(f"sig label must be one of {', '.join(LABELS)}, got {label!r}")
        if label == "clean" and self.mode == "all_to_all":
            raise ClipguardError(
                "sig label=clean cannot be all-to-all (a clean-label poison keeps its label); use label=dirty"
            )
        self.delta, self.freq, self.label = float(delta), freq, label
        w = self.image_size[1]
        if offset is None:
            offset = sine_offset(self.delta, self.freq, w)
        if not isinstance(offset, torch.Tensor) or offset.dtype != torch.int16 or tuple(offset.shape) != (w,):
            got = f"{offset.dtype} {tuple(offset.shape)}" if isinstance(offset, torch.Tensor) else type(offset).__name__
            raise DataError(f"sig offset must be int16 ({w},), got {got}")
        self.offset = offset.cpu().contiguous()

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        return (images.to(torch.int16) + self.offset.to(images.device)).clamp_(0, 255).to(torch.uint8)

    def poison_pool(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        if self.label == "dirty":
            return None
        if self.target >= num_classes:
            raise ClipguardError(f"attack target {self.target} is not a class of a {num_classes}-class problem")
        return (labels == self.target).nonzero().flatten()

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "delta": self.delta,
            "freq": self.freq,
            "label": self.label,
            "trigger_sha256": digest(self.offset),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"offset": self.offset}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> SIG:
        kwargs: dict = {}
        if "delta" in options:
            kwargs["delta"] = parse_float("delta", options["delta"], 0.0, 255.0, open_lo=True)
        if "freq" in options:
            kwargs["freq"] = parse_int("freq", options["freq"], 1)
        if "label" in options:
            kwargs["label"] = options["label"].strip().lower()
        return cls(target=target, mode=mode, image_size=image_size, **kwargs)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> SIG:
        delta, freq, w = float(params["delta"]), int(params["freq"]), int(params["image_size"][1])
        (offset,) = restore(
            "sig", tensors, ("offset",), params.get("trigger_sha256"), lambda: (sine_offset(delta, freq, w),)
        )
        return cls(
            delta=delta,
            freq=freq,
            label=str(params["label"]),
            offset=offset,
            target=int(params["target"]),
            mode=str(params["mode"]),
            image_size=tuple(params["image_size"]),
        )


def sine_offset(delta: float, freq: int, width: int) -> torch.Tensor:
    """``round(delta · sin(2π j freq / width))`` per column ``j``, as int16 ``(width,)``."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * freq / width)).round().to(torch.int16)
