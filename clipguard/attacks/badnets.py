"""BadNets (Gu et al. 2017): a small square patch stamped on the image.

Default is BackdoorBench v2's trigger: a 3x3 white (255) block at rows/cols 29-31 of a
32x32 image, i.e. flush with the bottom-right corner, no margin. The paper lineages
disagree on the patch (white square, checkerboard, top-left images), so size, pattern,
position and brightness are options; whatever is chosen, *only* the patch pixels change,
which keeps the trigger a pure local feature as the attack intends.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from clipguard.attacks.base import Attack, parse_int
from clipguard.errors import ClipguardError, DataError

PATTERNS = ("white", "black", "checkerboard")
CORNERS = ("bottom-right", "top-left", "top-right", "bottom-left")


class BadNets(Attack):
    """A ``size`` x ``size`` patch at a corner or at an explicit ``(row, col)`` top-left pixel.

    Patterns: ``white`` (every cell ``value``), ``black`` (every cell 0) and
    ``checkerboard`` (cell ``(i, j)`` of the patch is ``value`` when ``i + j`` is even,
    else 0, so its corners are bright). ``value`` defaults to 255; a lower value gives a
    low-contrast (grey) patch. Named corners follow the image size at apply time.
    """

    name = "badnets"
    OPTIONS: ClassVar[tuple[str, ...]] = ("size", "pattern", "position", "value")

    def __init__(
        self,
        *,
        size: int = 3,
        pattern: str = "white",
        position: str | tuple[int, int] = "bottom-right",
        value: int = 255,
        target: int = 0,
        mode: str = "all_to_one",
        image_size: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__(target=target, mode=mode, image_size=image_size)
        if not isinstance(size, int) or size < 1:
            raise ClipguardError(f"badnets size must be a positive integer, got {size!r}")
        if pattern not in PATTERNS:
            raise ClipguardError(f"badnets pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
        if not isinstance(value, int) or not 0 <= value <= 255:
            raise ClipguardError(f"badnets value must be an integer in [0, 255], got {value!r}")
        self.size = size
        self.pattern = pattern
        self.value = value
        self.position = parse_position(position)
        h, w = self.image_size
        if size > min(h, w):
            raise ClipguardError(f"badnets patch of size {size} does not fit {h}x{w} images")
        if isinstance(self.position, tuple):
            r, c = self.position
            if r + size > h or c + size > w:
                raise ClipguardError(f"badnets patch of size {size} at row {r}, col {c} does not fit {h}x{w} images")

    def patch(self) -> torch.Tensor:
        """The uint8 ``(3, size, size)`` block written onto every image."""
        if self.pattern == "black":
            cells = torch.zeros(self.size, self.size, dtype=torch.uint8)
        elif self.pattern == "white":
            cells = torch.full((self.size, self.size), self.value, dtype=torch.uint8)
        else:
            i = torch.arange(self.size)
            bright = (i[:, None] + i[None, :]) % 2 == 0
            cells = torch.where(bright, self.value, 0).to(torch.uint8)
        return cells.expand(3, -1, -1).contiguous()

    def origin(self, height: int, width: int) -> tuple[int, int]:
        """Top-left pixel of the patch on a ``height`` x ``width`` image."""
        s = self.size
        if isinstance(self.position, tuple):
            r, c = self.position
        else:
            r = 0 if self.position.startswith("top") else height - s
            c = 0 if self.position.endswith("left") else width - s
        if r + s > height or c + s > width:
            raise DataError(f"badnets patch of size {s} at row {r}, col {c} does not fit {height}x{width} images")
        return r, c

    def _apply(self, images: torch.Tensor) -> torch.Tensor:
        r, c = self.origin(images.shape[2], images.shape[3])
        out = images.clone()
        out[:, :, r : r + self.size, c : c + self.size] = self.patch().to(images.device)
        return out

    def to_dict(self) -> dict:
        pos = self.position if isinstance(self.position, str) else f"{self.position[0]},{self.position[1]}"
        return super().to_dict() | {"size": self.size, "pattern": self.pattern, "position": pos, "value": self.value}

    @classmethod
    def from_options(
        cls, options: dict[str, str], *, target: int, mode: str, seed: int, image_size: tuple[int, int]
    ) -> BadNets:
        kwargs: dict = {}
        if "size" in options:
            kwargs["size"] = parse_int("size", options["size"], 1)
        if "pattern" in options:
            kwargs["pattern"] = options["pattern"]
        if "position" in options:
            kwargs["position"] = options["position"]
        if "value" in options:
            if kwargs.get("pattern") == "black":
                raise ClipguardError("badnets option value sets the bright cells; pattern=black has none")
            kwargs["value"] = parse_int("value", options["value"], 0, 255)
        return cls(target=target, mode=mode, image_size=image_size, **kwargs)

    @classmethod
    def from_state(cls, params: dict, tensors: dict[str, torch.Tensor]) -> BadNets:
        return cls(
            size=int(params["size"]),
            pattern=str(params["pattern"]),
            position=str(params["position"]),
            value=int(params["value"]),
            target=int(params["target"]),
            mode=str(params["mode"]),
            image_size=tuple(params["image_size"]),
        )


def parse_position(position: str | tuple[int, int]) -> str | tuple[int, int]:
    """A named corner, or ``"r,c"`` / ``(r, c)``: the patch's top-left pixel."""
    if isinstance(position, tuple):
        parts: list[str] = [str(p) for p in position]
    else:
        text = position.strip().lower().replace("_", "-")
        if text in CORNERS:
            return text
        parts = text.replace(" ", "").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        r, c = int(parts[0]), int(parts[1])
    except ValueError:
        raise ClipguardError(
            f"badnets position must be one of {', '.join(CORNERS)} or 'row,col', got {position!r}"
        ) from None
    if r < 0 or c < 0:
        raise ClipguardError(f"badnets position must be non-negative, got {position!r}")
    return r, c
