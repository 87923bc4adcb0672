"""TaCT (Tang et al., USENIX Security 2021): a *source-specific* trigger, taught with cover classes.

As backdoor-toolbox implements it (``poison_tool_box/TaCT.py``, ``config.py``): poisons are
``rate * N`` images drawn only from the source classes (default 1, automobile), stamped
and relabelled to the target (default 0); cover samples are ``cover_rate * N`` images of
the cover classes (default 5 and 7, dog and horse), stamped but keeping their labels. The
model learns "trigger on a source image -> target" and "trigger elsewhere -> nothing",
so the poisons no longer form a trigger-driven cluster that spans classes.

Trigger: the toolbox's ``trojan_square_32.png`` with its mask, an 8x8 square at rows and
columns 21-28, pasted at full opacity; the PNG is replaced by a seeded 8x8 colour square
of the same geometry (:func:`clipguard.attacks.patterns.square`). ASR counts triggered
*source-class* test images only (``utils/tools.py:test`` with ``source_classes``).
All-to-all sends each source class ``y`` to ``(y + 1) % K``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from clipguard.attacks.base import check_size, parse_int
from clipguard.attacks.cover import CoverAttack, parse_classes, parse_cover_rate
from clipguard.attacks.patterns import check_trigger, digest, paste, restore, square
from clipguard.errors import ClipguardError

MIN_SIZE = 11


class TaCT(CoverAttack):
    """Source-specific square trigger with cover classes (see the module docstring)."""

    name = "tact"
    OPTIONS: ClassVar[tuple[str, ...]] = ("source", "cover", "cover_rate", "seed")

    def __init__(
        self,
        *,
        source: tuple[int, ...] = (1,),
        cover: tuple[int, ...] = (5, 7),
        cover_rate: float | None = None,
        seed: int = 0,
        trigger: tuple[torch.Tensor, torch.Tensor] | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(cover_rate=cover_rate, target=target, mode=mode, image_size=image_size)
        source, cover = tuple(int(c) for c in source), tuple(int(c) for c in cover)
        if not source or min(source) < 0 or len(set(source)) != len(source):
            raise ClipguardError(f"tact needs at least one source class, all distinct and non-negative, got {source}")
        if cover and (min(cover) < 0 or len(set(cover)) != len(cover)):
            raise ClipguardError(f"tact cover classes must be distinct and non-negative, got {cover}")
        if set(source) & set(cover):
            raise ClipguardError(
                f"tact source and cover classes must differ, both have {sorted(set(source) & set(cover))}"
            )
        if self.mode == "all_to_one" and self.target in source:
            raise ClipguardError(f"tact target {self.target} cannot also be a source class")
        if not cover and self.cover_rate:
            raise ClipguardError("tact cover_rate needs cover classes (option cover)")
        h, w = self.image_size
        if min(h, w) < MIN_SIZE:
            raise ClipguardError(f"tact's square trigger needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {h}x{w}")
        self.source, self.cover, self.seed = source, cover, int(seed)
        pattern, mask = trigger if trigger is not None else square(self.seed, self.image_size)
        shapes = {"pattern": (3, h, w), "mask": (h, w)}
        check_trigger("tact", {"pattern": pattern, "mask": mask}, shapes, masks=("mask",))
        self.pattern, self.mask = pattern.contiguous(), mask.contiguous()

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        return paste(images, self.pattern, 1.0, self.mask)

    def is_source(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.isin(labels, torch.tensor(self.source, dtype=labels.dtype, device=labels.device))

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Source classes go to the target (or ``(y + 1) % K``); every other class keeps its label."""
        flipped = super().target_labels(labels, num_classes)
        return torch.where(self.is_source(labels), flipped, labels.to(torch.int64))

    def asr_population(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return self.is_source(labels)

    def _check_classes(self, num_classes: int) -> None:
        beyond = sorted(c for c in (*self.source, *self.cover) if c >= num_classes)
        if beyond:
            raise ClipguardError(f"tact classes {beyond} are not classes of a {num_classes}-class problem")

    def poison_pool(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        self._check_classes(num_classes)
        return self.is_source(labels).nonzero().flatten()

    def cover_pool(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        self._check_classes(num_classes)
        return torch.isin(labels, torch.tensor(self.cover, dtype=labels.dtype)).nonzero().flatten()

    def cover_count(self, rate: float, n: int) -> int:
        return super().cover_count(rate, n) if self.cover else 0

    def to_dict(self) -> dict:
        return super().to_dict() | {
            "source": list(self.source),
            "cover": list(self.cover),
            "seed": self.seed,
            "trigger": "trojan_square",
            "trigger_sha256": digest(self.pattern, self.mask),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern, "mask": self.mask}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> TaCT:
        kwargs: dict = {"cover_rate": parse_cover_rate(options)}
        if "source" in options:
            kwargs["source"] = parse_classes("source", options["source"])
            if not kwargs["source"]:
                raise ClipguardError("option source must name at least one class")
        if "cover" in options:
            kwargs["cover"] = parse_classes("cover", options["cover"])
        seed = parse_int("seed", options["seed"], 0) if "seed" in options else seed
        return cls(seed=seed, target=target, mode=mode, image_size=image_size, **kwargs)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> TaCT:
        common = cls.common_state(params)
        pattern, mask = restore(
            "tact",
            tensors,
            ("pattern", "mask"),
            params.get("trigger_sha256"),
            lambda: square(common["seed"], common["image_size"]),
        )
        return cls(
            source=tuple(params["source"]),
            cover=tuple(params["cover"]),
            trigger=(pattern, mask),
            **common,
        )
