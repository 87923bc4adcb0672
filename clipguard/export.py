"""Export the clipped model as a drop-in replacement and prove the export is faithful.

Users asked for TorchScript, so ``purified.pt`` is TorchScript: it loads with
``torch.jit.load`` and no clipguard installed, takes the same normalised input as the
original model and returns the same logits shape. TorchScript is deprecated upstream, so a
``torch.export`` program (``purified.pt2``) is written beside it whenever the model exports
cleanly. Neither file is reported as a success until it has been loaded back and compared
with the eager clipped model on a real batch.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from clipguard.defenses.clipping import export_form
from clipguard.errors import ExportError

MAX_ABS_DIFF = 1e-5


def _compare(reference: nn.Module, loaded: nn.Module, batch: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((reference(batch) - loaded(batch)).abs().max())


META_FILE = "clipguard.json"


def write_file(path: str | os.PathLike, blob: bytes) -> None:
    """Write an artifact from Python rather than from torch's C++ writer.

    torch's file writer aborts the whole process when the disk fills up (seen as SIGABRT
    in a worker); serialising to memory first turns a full disk into an ordinary error
    that fails the job with its reason.
    """
    try:
        Path(path).write_bytes(blob)
    except OSError as exc:
        if Path(path).is_file():  # a partial artifact, never a device or anything we did not create
            Path(path).unlink()
        raise ExportError(f"could not write {Path(path).name}: {exc.strerror or exc}") from exc


def export_torchscript(
    model: nn.Module, batch: torch.Tensor, path: str | os.PathLike, metadata: dict | None = None
) -> dict:
    """Script (or, failing that, trace) ``model``, save it, load it back and compare.

    ``metadata`` (architecture, normalisation, λ) travels inside the file as an extra
    ``clipguard.json`` entry, so the artifact alone says what input it expects.

    Raises :class:`ExportError` if the reloaded module differs by more than 1e-5 anywhere on
    ``batch``; the returned dict is the check that goes into the report.
    """
    model = model.eval()
    form = export_form(model)  # a clipped model's ReLU clips then run in place where that is safe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every torch.jit call warns that TorchScript is deprecated
        try:
            scripted = torch.jit.script(form)
            how = "script"
        except Exception:
            with torch.inference_mode():
                scripted = torch.jit.trace(form, batch, check_trace=False)
            how = "trace"
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer, _extra_files={META_FILE: json.dumps(metadata or {})})
        write_file(path, buffer.getvalue())
        loaded = torch.jit.load(str(path), map_location="cpu")
    diff = _compare(model, loaded, batch)
    check = {
        "format": "torchscript",
        "method": how,
        "batch": int(batch.shape[0]),
        "max_abs_diff": diff,
        "tolerance": MAX_ABS_DIFF,
        "ok": diff <= MAX_ABS_DIFF,
    }
    if not check["ok"]:
        Path(path).unlink(missing_ok=True)
        raise ExportError(f"TorchScript export differs from the clipped model by {diff:.3g} (> {MAX_ABS_DIFF})")
    return check


def export_program(model: nn.Module, batch: torch.Tensor, path: str | os.PathLike) -> dict:
    """Best-effort ``torch.export`` artifact with a dynamic batch dimension.

    A model that does not export is not an error (TorchScript is the contract); the
    reason is recorded and no file is left behind.
    """
    model = model.eval()
    try:
        batch_dim = torch.export.Dim("batch", min=1, max=1 << 16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (batch,), dynamic_shapes=({0: batch_dim},))
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            write_file(path, buffer.getvalue())
            loaded = torch.export.load(str(path)).module()
        diff = _compare(model, loaded, batch)
    except Exception as exc:
        Path(path).unlink(missing_ok=True)
        return {"format": "torch.export", "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    ok = diff <= MAX_ABS_DIFF
    if not ok:
        Path(path).unlink(missing_ok=True)
    return {
        "format": "torch.export",
        "batch": int(batch.shape[0]),
        "max_abs_diff": diff,
        "tolerance": MAX_ABS_DIFF,
        "ok": ok,
    }


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load one of *our own* exports (TorchScript ``.pt`` or ``.pt2``) for evaluation.

    Only for files clipguard wrote or the local user vouches for: TorchScript can run
    arbitrary operators and has no safe mode, which is why uploads never go through here.
    """
    p = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if p.suffix == ".pt2":
            return torch.export.load(str(p)).module(), {}
        extra = {META_FILE: ""}
        module = torch.jit.load(str(p), map_location="cpu", _extra_files=extra)
    try:
        meta = json.loads(extra[META_FILE] or "{}")
    except ValueError:
        meta = {}
    return module, meta
