"""``bounds.safetensors``: the clip bounds and the statistics they came from, with provenance.

The file holds, per site, ``bound/<site>`` (what the purified model clips at) and the
``mean/<site>`` and ``std/<site>`` it was derived from, so another λ can be tried without
another pass over the data. The metadata records site order, λ, granularity, sample count
and the sha256 of the model and data, so a bound file can always be traced to its inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from clipguard.defenses.clipping import SiteStats
from clipguard.errors import ClipguardError

FORMAT = "clipguard.bounds/1"


def save_bounds(
    path: str | os.PathLike,
    bounds: dict[str, torch.Tensor],
    stats: SiteStats | None,
    metadata: dict[str, object],
) -> None:
    """Write the bounds (and statistics, when given) with string metadata."""
    tensors = {f"bound/{k}": v.detach().float().cpu().contiguous() for k, v in bounds.items()}
    if stats is not None:
        for name, mom in zip(stats.names, stats.moments, strict=True):
            std = mom.std()  # raises when nothing was recorded
            assert mom.mean is not None
            tensors[f"mean/{name}"] = mom.mean.float().cpu().contiguous()
            tensors[f"std/{name}"] = std.float().cpu().contiguous()
    meta = {"format": FORMAT, "sites": json.dumps(list(bounds))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    save_file(tensors, str(path), metadata=meta)


def load_bounds(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Bounds in site order and the metadata; a foreign or damaged file is a clear error."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ClipguardError(f"{p.name}: not a readable bounds file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ClipguardError(f"{p.name}: not a clipguard bounds file (format {meta.get('format')!r})")
    sites = json.loads(meta["sites"])
    return {s: tensors[f"bound/{s}"] for s in sites}, meta
