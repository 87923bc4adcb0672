"""Device selection shared by every command, so ``--device auto`` means the same everywhere."""

from __future__ import annotations

import torch

from clipguard.errors import ClipguardError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the first CUDA device when there is one; asking for CUDA without one is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClipguardError("{device} cuda was asked for but no CUDA device is available", options=True)
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ClipguardError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from exc


def describe(device: torch.device) -> str:
    """Human-readable device for reports ("cuda:0 (NVIDIA H100 80GB HBM3)", "cpu (2 threads)")."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
