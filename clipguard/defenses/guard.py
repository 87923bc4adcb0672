"""clipguard's default defense before the clip: find the poisoned share, unlearn it.

One function, :func:`detect_and_unlearn`, shared by ``purify`` (CLI and worker) and the
benchmarks, so what is measured is what ships. The clip that follows is the paper's μ+λσ,
computed on the returned model and data (see docs/method.md for why both steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from clipguard.data import ImageData
from clipguard.detection import detect_poison, feature_pass
from clipguard.models import ModelSpec
from clipguard.split import split_tail
from clipguard.unlearning import TailInputs, UnlearnConfig, unlearn


def detect_and_unlearn(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    unlearn_options: dict | None = None,
    progress: Callable[[str, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[nn.Module, ImageData, dict, dict | None]:
    """The model and training data to clip with, the detection record, and the unlearning record.

    With a flagged class, the model is a fine-tuned copy (``model`` is untouched) and the data
    excludes the final suspects, so triggered samples cannot widen the bounds. With nothing
    flagged, ``model`` and ``data`` come back as given (the run is the paper's recipe) and the
    unlearning record is ``None``.
    """
    say = progress or (lambda _stage, _f: None)
    timings = {} if timings is None else timings
    config = UnlearnConfig(**(unlearn_options or {}))
    t = time.perf_counter()
    split = split_tail(model, config.tail_share) if config.scope == "tail" else None
    seen = feature_pass(model, data, spec, split=split, max_cache_bytes=config.max_cache_mb * 2**20, device=device,
                        batch_size=batch_size, progress=lambda f: say("detect_poison", f), should_cancel=should_cancel)
    found = detect_poison(seen.features, data.labels, spec.num_classes)
    timings["detect_poison_s"] = time.perf_counter() - t
    if not found.flagged:
        return model, data, found.to_dict(), None
    t = time.perf_counter()
    tail = TailInputs(split.cut, seen.tail_inputs) if split is not None and seen.tail_inputs is not None else None
    fixed, suspects, info = unlearn(model, data, seen.logits, found.suspects, found.target, spec, config, tail=tail,
                                     device=device, batch_size=batch_size, progress=lambda f: say("unlearn", f),
                                     should_cancel=should_cancel)
    if config.scope == "tail" and tail is None:
        info["scope_note"] = ("no cut point leaves the tail enough of the network" if split is None else
                              f"the tail's inputs would exceed max_cache_mb={config.max_cache_mb}")
    timings["unlearn_s"] = time.perf_counter() - t
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[suspects] = False
    return fixed.eval(), data.subset(keep.nonzero().flatten()), found.to_dict(), info
