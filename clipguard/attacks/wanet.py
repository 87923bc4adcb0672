"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible, fixed image warp as the trigger.

Built as BackdoorBench v2's ``attack/wanet.py`` (same as the official release):

1. ``ins ~ U(-1, 1)`` of shape ``(1, 2, k, k)`` from ``seed``; ``ins /= mean(|ins|)``.
2. ``noise_grid`` = bicubic upsample of ``ins`` to ``H x W`` (``align_corners=True``),
   permuted to ``(1, H, W, 2)``.
3. ``identity_grid`` from ``linspace(-1, 1)`` (x = column, y = row, as ``grid_sample`` wants).
4. ``grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1)``: fixed for the attack,
   saved with it.
5. Backdoor image: ``grid_sample(x, grid, bilinear, align_corners=True)``, label := target.
6. "Noise" (cross) image: ``grid2 = clamp(grid + U(-1, 1)^(n, H, W, 2) / H, -1, 1)``, fresh
   per sample, label kept. Cross samples teach the model that *other* warps are benign,
   which is what makes the trigger specific to the one grid.

Warping happens on uint8 pixels converted to ``[0, 1]`` floats and rounded back to uint8.
BackdoorBench warps normalised tensors instead; that is equivalent up to the final
rounding because interpolation commutes with a per-channel affine map and the clamped
grid never samples outside the image. For non-square images the x displacement is scaled
by ``W`` and the y displacement by ``H`` (both equal ``H`` in the square case).

Two poisoning schemes, recorded as ``poisoning`` in :meth:`WaNet.to_dict`:

* ``static`` (default): :meth:`poison` picks ``round(rate*N)`` backdoor and
  ``round(cross_ratio*rate*N)`` cross samples once, like backdoor-toolbox. The poisoned
  set is a real dataset, so it can be saved and handed to a defender who purifies with
  the training data, which is the setting this project measures.
* ``per_batch`` (BackdoorBench): :meth:`poison_batch` poisons every training batch anew;
  at 1% and B=128 that is 1 backdoor + 2 cross samples per batch (0.78% effective).
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import torch
import torch.nn.functional as F

from clipguard.attacks.base import (
    Attack,
    Poisoned,
    Poisoning,
    check_images,
    check_rate,
    check_size,
    parse_float,
    parse_int,
    sample_count,
)
from clipguard.data import ImageData
from clipguard.errors import ClipguardError, DataError

POISONINGS = ("static", "per_batch")


class WaNet(Attack):
    """Warp every image with one fixed smooth random grid (see the module docstring)."""

    name = "wanet"
    OPTIONS: ClassVar[tuple[str, ...]] = ("k", "s", "grid_rescale", "cross_ratio", "poisoning", "seed")

    def __init__(
        self,
        *,
        k: int = 4,
        s: float = 0.5,
        grid_rescale: float = 1.0,
        cross_ratio: float = 2.0,
        poisoning: str = "static",
        seed: int = 0,
        grid: torch.Tensor | None = None,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(target=target, mode=mode, image_size=image_size)
        if not isinstance(k, int) or k < 2:
            raise ClipguardError(f"wanet k (control grid size) must be an integer >= 2, got {k!r}")
        if k > max(self.image_size):  # a control grid finer than the image means nothing, and costs k*k memory
            raise ClipguardError(f"wanet k must be at most the image side {max(self.image_size)}, got {k}")
        if not s >= 0 or not grid_rescale > 0 or not cross_ratio >= 0:
            raise ClipguardError(
                f"wanet needs s >= 0, grid_rescale > 0 and cross_ratio >= 0, got {s}, {grid_rescale}, {cross_ratio}"
            )
        if poisoning not in POISONINGS:
            raise ClipguardError(f"wanet poisoning must be one of {', '.join(POISONINGS)}, got {poisoning!r}")
        self.k, self.s, self.grid_rescale, self.cross_ratio = k, float(s), float(grid_rescale), float(cross_ratio)
        self._poisoning: Poisoning = poisoning  # type: ignore[assignment]
        self.seed = int(seed)
        h, w = self.image_size
        if grid is None:
            grid = make_grid(self.k, self.s, self.grid_rescale, self.seed, self.image_size)
        if not isinstance(grid, torch.Tensor) or not grid.is_floating_point() or tuple(grid.shape) != (1, h, w, 2):
            got = f"{grid.dtype} {tuple(grid.shape)}" if isinstance(grid, torch.Tensor) else type(grid).__name__
            raise DataError(f"wanet grid must be a float (1, {h}, {w}, 2) tensor, got {got}")
        if not torch.isfinite(grid).all() or grid.abs().max() > 1:
            raise DataError("wanet grid must be finite and within [-1, 1]")
        self.grid = grid.detach().to("cpu", torch.float64).contiguous()

    @property
    def poisoning(self) -> Poisoning:
        return self._poisoning

    # ------------------------------------------------------------------ warping

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        check_size(self, images)
        return warp(images, self.grid.to(images.device))

    def cross(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """ "Noise mode" images: each warped by the attack grid plus its own fresh U(-1,1)/size jitter.

        Labels stay unchanged. Random draws come from ``generator`` (on its own device) so
        runs are reproducible; the result is on the images' device.
        """
        check_images(images)
        check_size(self, images)
        n, h, w = images.shape[0], images.shape[2], images.shape[3]
        if n == 0:
            return images.clone()
        jitter = torch.rand(n, h, w, 2, generator=generator, device=generator.device, dtype=torch.float64) * 2 - 1
        jitter = jitter / torch.tensor([w, h], dtype=torch.float64, device=jitter.device)
        grid2 = (self.grid.to(jitter.device) + jitter).clamp_(-1, 1)
        return warp(images, grid2.to(images.device))

    # ------------------------------------------------------------------ poisoning

    def poison(self, data: ImageData, rate: float = 0.01, seed: int = 0) -> Poisoned:
        """Static WaNet: ``round(rate*N)`` backdoor samples and ``round(cross_ratio*rate*N)`` cross samples.

        Both sets are drawn together from one seeded permutation over all samples, so they
        never overlap; cross samples keep their labels.
        """
        check_rate(rate)
        n = len(data)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=gen)
        num_bd = sample_count(rate, n, "poison")
        num_cross = min(round(self.cross_ratio * rate * n), n - num_bd)
        idx = order[:num_bd].sort().values
        cross_idx = order[num_bd : num_bd + num_cross].sort().values
        images, labels = self._poison_into(data, idx)
        if num_cross:
            images[cross_idx] = self.cross(data.images[cross_idx], gen)
        source = f"{data.source} + {self!r} rate={rate} seed={seed}"
        return Poisoned(data.replace(images, labels, source), idx, cross_idx)

    def poison_batch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        rate: float = 0.01,
        num_classes: int = 10,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BackdoorBench per-batch WaNet: first ``num_bd`` samples backdoored, next ``num_cross`` cross.

        ``num_bd = int(rate * B)`` (one sample with probability ``rate * B`` when that is
        below 1) and ``num_cross = int(num_bd * cross_ratio)``. The batch is assumed
        shuffled, as a training loader's is. Returns new uint8 images and int64 labels.
        """
        check_images(images)
        images, labels, num_bd = self._poison_batch_head(images, labels, generator, rate, num_classes)
        num_cross = min(int(num_bd * self.cross_ratio), images.shape[0] - num_bd)
        if num_cross:
            images[num_bd : num_bd + num_cross] = self.cross(images[num_bd : num_bd + num_cross], generator)
        return images, labels

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        digest = hashlib.sha256(self.grid.numpy().tobytes()).hexdigest()
        return super().to_dict() | {
            "k": self.k,
            "s": self.s,
            "grid_rescale": self.grid_rescale,
            "cross_ratio": self.cross_ratio,
            "seed": self.seed,
            "grid_sha256": digest,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> WaNet:
        kwargs: dict = {}
        if "k" in options:
            kwargs["k"] = parse_int("k", options["k"], 2)
        for key in ("s", "cross_ratio"):
            if key in options:
                kwargs[key] = parse_float(key, options[key], 0.0)
        if "grid_rescale" in options:
            kwargs["grid_rescale"] = parse_float("grid_rescale", options["grid_rescale"], 0.0, open_lo=True)
        if "poisoning" in options:
            kwargs["poisoning"] = options["poisoning"].replace("-", "_")
        seed = parse_int("seed", options["seed"], 0) if "seed" in options else seed
        return cls(seed=seed, target=target, mode=mode, image_size=image_size, **kwargs)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> WaNet:
        # Without the saved grid, regenerate it from the seed but only accept it if it hashes
        # to what was recorded (another torch build may interpolate differently).
        expected = params.get("grid_sha256")
        if "grid" not in tensors and not expected:
            raise DataError("saved wanet attack has neither its 'grid' tensor nor a grid_sha256")
        attack = cls(
            k=int(params["k"]),
            s=float(params["s"]),
            grid_rescale=float(params["grid_rescale"]),
            cross_ratio=float(params["cross_ratio"]),
            poisoning=str(params["poisoning"]),
            seed=int(params.get("seed", 0)),
            grid=tensors.get("grid"),
            target=int(params["target"]),
            mode=str(params["mode"]),
            image_size=tuple(params["image_size"]),
        )
        if expected and attack.to_dict()["grid_sha256"] != expected:
            raise DataError("wanet grid does not match the grid_sha256 recorded with the attack")
        return attack


def make_grid(k: int, s: float, grid_rescale: float, seed: int, image_size: tuple[int, int]) -> torch.Tensor:
    """The fixed WaNet sampling grid ``(1, H, W, 2)`` in ``[-1, 1]`` (steps 1-4 of the module docstring)."""
    h, w = image_size
    gen = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
    ins = (ins / ins.abs().mean()).double()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    rows = torch.linspace(-1, 1, h, dtype=torch.float64)
    cols = torch.linspace(-1, 1, w, dtype=torch.float64)
    x, y = torch.meshgrid(rows, cols, indexing="ij")
    identity = torch.stack((y, x), dim=-1)[None]  # (..., 0) = column (x), (..., 1) = row (y)
    scale = torch.tensor([w, h], dtype=torch.float64)
    return ((identity + s * noise / scale) * grid_rescale).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear ``grid_sample`` of uint8 images on ``[0, 1]`` floats, rounded back to uint8.

    float64 keeps the identity part exact and makes CPU and GPU round the same way (MPS,
    which has no float64, uses float32).
    """
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    x = images.to(dtype) / 255.0
    g = grid.to(images.device, dtype)
    if g.shape[0] == 1 and images.shape[0] != 1:
        g = g.expand(images.shape[0], -1, -1, -1)
    out = F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out * 255.0).round_().clamp_(0, 255).to(torch.uint8)
