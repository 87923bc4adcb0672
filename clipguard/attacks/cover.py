"""Attacks with *cover* samples: triggered training images that keep their true label.

Qi et al. (ICLR 2023, "Revisiting the assumption of latent separability for backdoor
defenses") add them so that "carries the trigger" no longer implies "has the target label"
in the training set: the poisoned samples' latent representations then stay close to the
clean ones, which is what latent-separation defenses (spectral signatures, activation
clustering, SCAn) rely on. TaCT (Tang et al. 2021) uses them to make a source-specific
trigger: images of other classes carry it without changing class.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from clipguard.attacks.base import Attack, check_rate, parse_float, sample_count
from clipguard.errors import ClipguardError


class CoverAttack(Attack):
    """An attack that poisons a static set with poisons plus ``cover_rate * N`` cover samples.

    ``cover_rate=None`` (default) takes the published proportion: ``COVER_RATIO`` times the
    poison rate (1 for Adap-Blend and TaCT, 2 for Adap-Patch), which gives the published
    CIFAR-10 counts at the published poison rate and scales with it otherwise.
    """

    COVER_RATIO: ClassVar[float] = 1.0

    def __init__(
        self,
        *,
        cover_rate: float | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(target=target, mode=mode, image_size=image_size)
        if cover_rate is not None:
            check_rate(cover_rate)
            cover_rate = float(cover_rate)
        self.cover_rate = cover_rate

    def cover_count(self, rate: float, n: int) -> int:
        rate = self.COVER_RATIO * rate if self.cover_rate is None else self.cover_rate
        return sample_count(rate, n, "cover")

    def poison_batch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        rate: float = 0.01,
        num_classes: int = 10,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Not defined: the published attack poisons one static training set (use :meth:`poison`)."""
        raise ClipguardError(f"{self.name} poisons a static training set with cover samples; it has no per-batch mode")

    def to_dict(self) -> dict:
        return super().to_dict() | {"cover_rate": self.cover_rate}

    @staticmethod
    def common_state(params: dict) -> dict:
        """The constructor arguments every cover attack saves the same way (for ``from_state``)."""
        cover_rate = params.get("cover_rate")
        return {
            "cover_rate": None if cover_rate is None else float(cover_rate),
            "seed": int(params.get("seed", 0)),
            "target": int(params["target"]),
            "mode": str(params["mode"]),
            "image_size": tuple(params["image_size"]),
        }


def parse_cover_rate(options: dict[str, str]) -> float | None:
    """The ``cover_rate`` option, a fraction of all training samples in ``[0, 1]``."""
    return parse_float("cover_rate", options["cover_rate"], 0.0, 1.0) if "cover_rate" in options else None


def parse_classes(name: str, text: str) -> tuple[int, ...]:
    """``"5,7"`` -> ``(5, 7)``: distinct non-negative class indices (empty text: none)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ClipguardError(f"option {name} must be comma-separated class indices, got {text!r}") from None
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        raise ClipguardError(f"option {name} must list distinct non-negative class indices, got {text!r}")
    return values
