"""``purify``: the one engine entry point behind the CLI, the Celery task and the benchmarks.

Given a suspect checkpoint, its architecture and a training-data reference, it computes
activation bounds, builds the clipped model, exports it, checks the export, and publishes
``purified.pt`` (TorchScript), ``purified.pt2`` (torch.export, when the model exports),
``bounds.safetensors`` and ``report.json`` into ``out``. Everything is written into a
sibling temporary folder first and renamed into place at the end, so a failure or a
cancellation never leaves a half-written output behind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Progress = Callable[[str, float], None]
"""``progress(stage, fraction)`` with fraction in [0, 1] for the current stage."""

ShouldCancel = Callable[[], bool]


@dataclass
class PurifyOptions:
    """Everything a purification run needs; mirrors ``clipguard purify``'s flags."""

    arch: str
    weights: Path
    data: str
    out: Path
    num_classes: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    lam: float | Literal["auto"] | None = None
    granularity: Literal["channel", "element"] = "channel"
    method: str = "paper"
    device: str = "auto"
    batch_size: int = 256
    eval_data: str | None = None
    attack: str | None = None
    cache_dir: Path | None = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class PurifyResult:
    out: Path
    report: dict
