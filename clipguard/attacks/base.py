"""The :class:`Attack` interface every backdoor trigger implements, and dataset poisoning.

Why one interface: the same trigger object poisons the training set (``poison`` or
``poison_batch``), is written beside the victim (``to_dict`` + ``tensors``), and is
rebuilt later to measure ASR (``apply`` + ``target_labels``). Every step works on uint8
``(N, 3, H, W)`` pixels, the form :class:`~clipguard.data.ImageData` holds, so the trigger
stamped at training time and the one measured at test time are bit-identical rather than
"the same up to normalisation and float round-off".

Poisoning follows BackdoorBench v2 (``utils/backdoor_generate_poison_index.py``):
``round(rate * N)`` indices drawn uniformly over *all* samples, target-class images
included (they keep the target label but carry the trigger), and the triggered copies
replace the originals, so the poisoned set has as many samples as the clean one.
Attacks that draw from fewer samples (clean-label SIG: the target class; TaCT: its source
classes) or add *cover* samples (triggered, label kept: Adap-Blend, Adap-Patch, TaCT) say so
through the hooks :meth:`Attack.poison_pool`, :meth:`Attack.cover_pool` and
:meth:`Attack.cover_count`; the drawing itself stays here so every attack counts alike.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from clipguard.data import ImageData
from clipguard.errors import ClipguardError, DataError

MAX_IMAGE_PIXELS = 4096 * 4096
"""Largest trigger (``image_size``) an attack is built for: the decoder's cap on one image
(``clipguard.data.Limits.max_image_pixels``); a saved attack can claim any size, and Blend's pattern
and WaNet's grid are allocated for it."""
Mode = Literal["all_to_one", "all_to_all"]
Poisoning = Literal["static", "per_batch"]
MODES: tuple[str, ...] = ("all_to_one", "all_to_all")
MODE_ALIASES: dict[str, Mode] = {
    "all_to_one": "all_to_one",
    "all2one": "all_to_one",
    "all_to_all": "all_to_all",
    "all2all": "all_to_all",
}


@dataclass(frozen=True)
class Poisoned:
    """A poisoned copy of a dataset and which samples were changed.

    ``indices`` are the backdoor samples (trigger + the attack's label: the target, or
    ``(y + 1) % K`` all-to-all; clean-label SIG keeps the label, which already is the target),
    sorted. ``cover_indices`` are cover samples: they carry the (training-time) trigger but
    keep their label, so a defense that looks for "triggered samples with one label" sees
    them on the wrong side (Adap-Blend, Adap-Patch, TaCT). ``cross_indices`` are WaNet's
    "noise mode" samples (warped by a perturbed grid, label kept). Both are sorted and empty
    for attacks without them. Recording all three lets a report say exactly what was done.
    """

    data: ImageData
    indices: torch.Tensor
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    cover_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))


class Attack(ABC):
    """A deterministic uint8 trigger plus its label rule.

    Subclasses set ``name`` and implement :meth:`apply`; parameters needed to rebuild the
    trigger go in :meth:`to_dict` (JSON) and :meth:`tensors` (safetensors), and
    :meth:`from_state` must invert them exactly.
    """

    name: ClassVar[str]
    # Options a spec string may set (``name:key=value,...``) besides ``mode`` and ``target``.
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, target: int = 0, mode: str = "all_to_one", image_size: tuple[int, int] = (32, 32)) -> None:
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise ClipguardError(f"attack target must be a non-negative class index, got {target!r}")
        if mode not in MODE_ALIASES:
            raise ClipguardError(f"attack mode must be one of {', '.join(MODES)}, got {mode!r}")
        h, w = (int(v) for v in image_size)
        if h < 1 or w < 1:
            raise ClipguardError(f"image size must be positive, got {tuple(image_size)}")
        if h * w > MAX_IMAGE_PIXELS:  # a trigger is built for this size before any image is seen
            raise ClipguardError(f"attack image size {h}x{w} is over the {MAX_IMAGE_PIXELS}-pixel cap on images")
        self.target = target
        self.mode: Mode = MODE_ALIASES[mode]
        self.image_size = (h, w)

    # ------------------------------------------------------------------ the trigger

    @property
    def poisoning(self) -> Poisoning:
        """How training data is poisoned: once (``static``) or in every batch (``per_batch``)."""
        return "static"

    @abstractmethod
    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        """Triggered copy of a validated, non-empty uint8 ``(N, 3, H, W)`` batch."""

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger on uint8 ``(N, 3, H, W)`` images (any device); returns a new uint8 tensor.

        Deterministic: the same images always give the same output, so ASR is measured on
        exactly the trigger the victim was trained with.
        """
        check_images(images)
        if images.shape[0] == 0:
            return images.clone()
        out = self._apply(images)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        return out

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Labels a backdoored model should output: the target (all-to-one) or ``(y + 1) % K`` (all-to-all)."""
        if self.mode == "all_to_all":
            if num_classes < 2:
                raise ClipguardError("an all-to-all attack needs at least 2 classes")
            return (labels.to(torch.int64) + 1) % num_classes
        if self.target >= num_classes:
            raise ClipguardError(f"attack target {self.target} is not a class of a {num_classes}-class problem")
        return torch.full_like(labels, self.target, dtype=torch.int64)

    def asr_population(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Which test images the attack claims to flip (bool mask): every image, unless the attack is source-specific.

        ASR is then counted over these images whose :meth:`target_labels` differ from their
        label (so target-class images drop out of an all-to-one attack's ASR).
        """
        return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)

    # ------------------------------------------------------------------ poisoning

    def poison(self, data: ImageData, rate: float = 0.01, seed: int = 0) -> Poisoned:
        """BackdoorBench poisoning: ``round(rate * N)`` samples, uniform over all classes, replaced in place.

        Target-class samples can be drawn; they keep their label and carry the trigger,
        as in BackdoorBench, so a 1% rate on CIFAR-10 means exactly 500 triggered images.
        ``N`` is always the whole set, also when the attack draws from a pool (clean-label
        SIG: ``rate * N`` target-class images, as BackdoorBench and backdoor-toolbox count).
        Cover samples are drawn after the poisons, never overlapping them. A positive rate
        that rounds to no sample is an error, not a silently clean "victim".
        """
        check_rate(rate)
        n, k = len(data), num_classes(data)
        gen = torch.Generator().manual_seed(seed)
        num_bd = sample_count(rate, n, "poison")
        num_cover = self.cover_count(rate, n)
        pool, cover_pool = self.poison_pool(data.labels, k), self.cover_pool(data.labels, k)
        if pool is None and cover_pool is None:  # one permutation, as BackdoorBench and backdoor-toolbox draw
            if num_bd + num_cover > n:
                raise ClipguardError(f"{num_bd} poisoned and {num_cover} cover samples do not fit {n} samples")
            order = torch.randperm(n, generator=gen)
            idx, cover = order[:num_bd], order[num_bd : num_bd + num_cover]
        else:
            idx = draw(torch.arange(n) if pool is None else pool, num_bd, gen, "poisoned", self.name)
            rest = torch.arange(n) if cover_pool is None else cover_pool
            cover = draw(rest[~torch.isin(rest, idx)], num_cover, gen, "cover", self.name)
        idx, cover = idx.sort().values, cover.sort().values
        images, labels = self._poison_into(data, idx, gen)
        if len(cover):
            images[cover] = self.stamp_cover(data.images[cover], gen)
        source = f"{data.source} + {self!r} rate={rate} seed={seed}"
        return Poisoned(data.replace(images, labels, source), idx, cover_indices=cover)

    def poison_pool(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        """Indices poisons may be drawn from (``None``: any sample)."""
        return None

    def cover_pool(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
        """Indices cover samples may be drawn from (``None``: any sample not poisoned)."""
        return None

    def cover_count(self, rate: float, n: int) -> int:
        """How many cover samples (triggered, label kept) go with poison rate ``rate`` of ``n`` samples."""
        return 0

    def stamp_poison(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time trigger on the (sorted) poisoned images: the test trigger unless the attack differs."""
        return self.apply(images)

    def stamp_cover(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time trigger on the (sorted) cover images: as on the poisons unless the attack differs."""
        return self.stamp_poison(images, generator)

    def _poison_into(
        self, data: ImageData, idx: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images = data.whole("poisoning").clone()
        labels = data.labels.clone()
        if len(idx):
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            images[idx] = self.stamp_poison(data.images[idx], gen)
            labels[idx] = self.target_labels(data.labels[idx], num_classes(data))
        return images, labels

    def poison_batch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        rate: float = 0.01,
        num_classes: int = 10,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison the first ``num_bd`` samples of an (already shuffled) training batch.

        BackdoorBench's per-batch rule: ``num_bd = int(rate * B)``, and when ``rate * B < 1``
        one sample with probability ``rate * B``, so small batches still see the trigger at
        the requested rate on average. Returns new uint8 images and int64 labels.
        """
        images, labels, _ = self._poison_batch_head(images, labels, generator, rate, num_classes)
        return images, labels

    def _poison_batch_head(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, rate: float, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Copies of the batch with the first ``num_bd`` samples triggered and relabelled, and ``num_bd``."""
        check_rate(rate)
        num_bd = batch_count(rate, images.shape[0], generator)
        images, labels = images.clone(), labels.clone()
        if num_bd:
            images[:num_bd] = self.apply(images[:num_bd])
            labels[:num_bd] = self.target_labels(labels[:num_bd], num_classes)
        return images, labels, num_bd

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        """JSON-able parameters: everything :meth:`from_state` needs besides :meth:`tensors`."""
        return {
            "name": self.name,
            "target": self.target,
            "mode": self.mode,
            "poisoning": self.poisoning,
            "image_size": list(self.image_size),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the trigger is made of (a noise pattern, a warping grid), saved beside the JSON."""
        return {}

    @classmethod
    @abstractmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> Attack:
        """Build from a spec string's ``key=value`` options (already checked against ``OPTIONS``)."""

    @classmethod
    @abstractmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> Attack:
        """Rebuild exactly the attack that produced ``params`` and ``tensors``."""

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (JSON) and, if there are tensors, ``<path>.safetensors``."""
        from clipguard.attacks.registry import save_attack

        save_attack(self, path)

    def __repr__(self) -> str:
        params = {k: v for k, v in self.to_dict().items() if k not in ("name", "image_size") and "sha256" not in k}
        return f"{self.name}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


# ---------------------------------------------------------------------------- helpers


def check_images(images: torch.Tensor) -> None:
    """Triggers are defined on uint8 ``(N, 3, H, W)`` pixels; anything else is refused, not guessed."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"attacks work on uint8 (N, 3, H, W) images, got {got}")


def check_size(attack: Attack, images: torch.Tensor) -> None:
    """Blend patterns and WaNet grids are made for one image size; a mismatch is a user error."""
    h, w = images.shape[2], images.shape[3]
    if (h, w) != attack.image_size:
        eh, ew = attack.image_size
        raise DataError(f"{attack.name} trigger was built for {eh}x{ew} images, got {h}x{w}")


def check_rate(rate: float) -> None:
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ClipguardError(f"poison rate must be in [0, 1], got {rate!r}")


def parse_int(name: str, text: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer option, with a one-line error naming the option and its range."""
    try:
        value = int(text)
    except ValueError:
        raise ClipguardError(f"option {name} must be an integer, got {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ClipguardError(f"option {name} must be {rng}, got {value}")
    return value


def parse_float(name: str, text: str, lo: float, hi: float | None = None, *, open_lo: bool = False) -> float:
    """A finite float option within ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    try:
        value = float(text)
    except ValueError:
        raise ClipguardError(f"option {name} must be a number, got {text!r}") from None
    bad_lo = value <= lo if open_lo else value < lo
    if value != value or bad_lo or (hi is not None and value > hi) or value in (float("inf"), float("-inf")):
        rng = f"{'(' if open_lo else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise ClipguardError(f"option {name} must be in {rng}, got {text}")
    return value


def sample_count(rate: float, n: int, what: str) -> int:
    """``round(rate * n)``; a positive rate that rounds to zero samples is refused with the smallest working rate."""
    count = round(rate * n)
    if rate > 0 and count == 0:
        raise ClipguardError(
            f"a {what} rate of {rate:g} of {n} samples rounds to no sample; "
            f"use a rate of at least {1 / n:.2g} or more data"
        )
    return count


def draw(pool: torch.Tensor, count: int, generator: torch.Generator, what: str, attack: str) -> torch.Tensor:
    """``count`` distinct indices drawn uniformly from ``pool``, or a clear error if the pool is too small."""
    if count > len(pool):
        raise ClipguardError(
            f"{attack} needs {count} {what} samples but only {len(pool)} are eligible; lower the rate or use more data"
        )
    return pool[torch.randperm(len(pool), generator=generator)[:count]]


def num_classes(data: ImageData) -> int:
    """Class count as the metrics count it: the class names, or the labels if they go further."""
    top = int(data.labels.max()) + 1 if len(data) else 0
    return max(len(data.classes), top)


def batch_count(rate: float, batch: int, generator: torch.Generator) -> int:
    """BackdoorBench's per-batch backdoor count (a Bernoulli draw when ``rate * B < 1``)."""
    expected = rate * batch
    if expected < 1:
        return int(torch.rand(1, generator=generator, device=generator.device).item() < expected)
    return min(int(expected), batch)
