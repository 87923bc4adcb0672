"""Reading, checking and writing model weights without ever running code from a checkpoint.

Uploaded checkpoints are hostile until proven otherwise: a pickle is a program, and so are
TorchScript and ``torch.export`` archives (PyTorch's own security policy says so). This module
is therefore the only place that opens a user's weights, and it accepts exactly two formats:

* safetensors, which has no code path at all;
* a zip-format ``torch.save(model.state_dict())``, read with ``torch.load(weights_only=True)``.
  We never fall back to ``weights_only=False``: the fallback *is* the exploit.

The format is decided from the file's first bytes, never its name, because the name is chosen
by the uploader. Archives are inspected with :mod:`zipfile` before torch sees them, so
TorchScript and ``.pt2`` packages are refused with a message saying what to upload instead,
and legacy (non-zip) pickles are refused without being unpickled at all.

Every refusal is a :class:`~clipguard.errors.CheckpointError` with a one-line message: the
CLI prints it and the service returns it as the problem detail. The network the weights go
into always comes from :mod:`clipguard.models`, never from the upload.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from typing import BinaryIO

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipguard.errors import CheckpointError
from clipguard.files import atomic_path, file_sha256
from clipguard.models import ModelSpec

__all__ = ["canonicalize", "load_weights", "read_state_dict", "save_weights"]

_ZIP_MAGIC = b"PK\x03\x04"
# Where training scripts usually nest the weights, in the order we prefer them when several
# are present (e.g. Lightning's {"state_dict": ..., "optimizer_states": ...}).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Added to every key by nn.DataParallel / DistributedDataParallel and by torch.compile.
_KEY_PREFIXES = ("module.", "_orig_mod.")
_SAVE_HINT = "upload model.state_dict() saved with torch.save or as safetensors"
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own cap on a header

# Member names (relative to the archive's top folder) that mark a zip as something torch
# would run rather than read. TorchScript: torch.serialization._is_torchscript_zip looks for
# constants.pkl; code/ holds the serialized Python. torch.export: the PT2 archive layout of
# torch._C._export.pt2_archive_constants (archive_format, models/*.json, data/weights/ ...,
# data/aotinductor/ holds compiled shared objects) and the pre-2.6 layout
# (serialized_exported_program.json at the archive root).
_TORCHSCRIPT_FILES = frozenset({"constants.pkl"})
_TORCHSCRIPT_DIRS = ("code/",)
_EXPORT_FILES = frozenset({"archive_format", "archive_version", "serialized_exported_program.json"})
_EXPORT_DIRS = (
    "models/",
    "data/weights/",
    "data/constants/",
    "data/sample_inputs/",
    "data/aotinductor/",
    "data/executorch/",
    "xl_model_weights/",
)


# --------------------------------------------------------------------------- reading


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors file or a zip-format torch.save(state_dict), never running code.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's ``module.``
    prefix, torch.compile's ``_orig_mod.``) are removed, so the result is a flat
    ``{name: tensor}`` ready to compare with a model's ``state_dict()``.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")  # kept open: what is inspected is what gets loaded
        head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file: {exc.strerror or exc}") from exc

    with f:
        if head.startswith(_ZIP_MAGIC):
            raw = _load_torch_zip(f)
        elif len(head) == 9 and head[8:9] == b"{":
            # safetensors: little-endian u64 header length, then a JSON object. No code path,
            # so reopening by name is harmless even if the file changed meanwhile.
            raw = _load_safetensors(path)
        elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            # Pickle protocol 2-5 opcode: torch.save(..., _use_new_zipfile_serialization=False)
            # or a plain pickle.dump. There is no way to look inside one without unpickling it.
            raise CheckpointError(
                "legacy (non-zip) pickle checkpoints are refused: they cannot be read without running "
                f"the code they contain; {_SAVE_HINT} (PyTorch >= 1.6 zip format)"
            )
        else:
            raise CheckpointError(
                "not a checkpoint: expected a safetensors file or a zip-format torch.save(model.state_dict())"
            )
    return _as_state_dict(raw)


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError mostly; a hostile file may provoke other types
        raise _corrupt("safetensors file", exc) from exc


def _load_torch_zip(f: BinaryIO) -> object:
    """``torch.load(weights_only=True)``, but only after the member list says it is a torch.save.

    torch gets the open file, not the path: from 2.14 ``torch.load`` picks its loader from a
    path's extension (``*.safetensors``), and a path could be swapped between check and load.
    """
    try:
        with zipfile.ZipFile(f) as archive:
            members = archive.infolist()
    except Exception as exc:  # BadZipFile, EOFError, ValueError...: all mean a broken upload
        raise _corrupt("zip checkpoint", exc) from exc

    # torch.save nests every record under one folder named after the file (``weights/data.pkl``
    # for weights.pt); what torch reads is the part after it, so that is what is checked.
    names = {m.filename.split("/", 1)[-1] for m in members}
    if names & _TORCHSCRIPT_FILES or any(n.startswith(_TORCHSCRIPT_DIRS) for n in names):
        raise CheckpointError(
            "TorchScript archives are refused: torch.jit.load cannot load untrusted files safely; " + _SAVE_HINT
        )
    if names & _EXPORT_FILES or any(n.startswith(_EXPORT_DIRS) for n in names):
        raise CheckpointError(
            "torch.export (.pt2) archives are refused: torch.export.load cannot load untrusted files "
            f"safely; {_SAVE_HINT}"
        )
    if "data.pkl" not in names:
        raise CheckpointError(f"zip file is not a torch.save checkpoint (no data.pkl); {_SAVE_HINT}")
    if any(m.compress_type != zipfile.ZIP_STORED for m in members):
        # torch.save never compresses; a compressed member is a hand-made archive or a zip bomb.
        raise CheckpointError(f"compressed zip members are refused (torch.save never compresses); {_SAVE_HINT}")

    try:
        f.seek(0)
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _pickled_objects_error(f, exc) from exc
    except Exception as exc:
        raise _corrupt("torch checkpoint", exc) from exc


def _pickled_objects_error(f: BinaryIO, exc: Exception) -> CheckpointError:
    """Name what the weights-only unpickler refused, so the uploader knows what to remove.

    ``get_unsafe_globals_in_checkpoint`` disassembles the pickle without executing it.
    torch's own message is not passed on: it suggests ``weights_only=False``.
    """
    try:
        f.seek(0)
        culprits = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:
        culprits = []
    if culprits:
        shown = ", ".join(culprits[:3]) + (f" and {len(culprits) - 3} more" if len(culprits) > 3 else "")
        what = (
            "a pickled nn.Module"
            if any(c.startswith("torch.nn.modules.") for c in culprits)
            else ("pickled Python objects")
        )
        return CheckpointError(f"checkpoint contains {what} ({shown}); only weights are accepted: {_SAVE_HINT}")
    reason = str(exc).split("WeightsUnpickler error:", 1)[-1].strip()
    reason = reason.splitlines()[0].split(". ")[0][:200] if reason else type(exc).__name__
    return CheckpointError(f"checkpoint is not plain weights ({reason}); {_SAVE_HINT}")


def _as_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap the usual training-script containers down to one flat mapping of tensors."""
    for _ in range(3):  # {"model": {"state_dict": ...}} is as deep as real checkpoints go
        if not isinstance(obj, Mapping) or (obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state_dict; {_SAVE_HINT}")
    if not obj:
        raise CheckpointError("checkpoint contains no tensors")

    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint key {repr(key)[:100]} is not a string; {_SAVE_HINT}")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint entry {_shown(key)} is a {type(value).__name__}, not a tensor; {_SAVE_HINT}"
            )
        if value.layout != torch.strided:
            raise CheckpointError(f"checkpoint entry {_shown(key)} is not a dense tensor ({value.layout})")
        state[key] = value

    stripped = True
    while stripped:
        stripped = False
        for prefix in _KEY_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


# --------------------------------------------------------------------------- checking


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating"
    if dtype.is_complex:
        return "complex"
    if dtype == torch.bool:
        return "bool"
    if dtype in (
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    ):
        return "integer"
    return str(dtype)  # quantized and other exotic dtypes only match themselves


def _fit(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], label: str
) -> dict[str, torch.Tensor]:
    """``state`` checked against ``expected`` (a model's state_dict) and cast to its dtypes."""
    _check_layout(state, expected, label)
    fitted: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        tensor = state[key]
        if _kind(tensor.dtype) != _kind(ref.dtype):
            raise CheckpointError(f"{key}: checkpoint has dtype {tensor.dtype}, {label} expects {ref.dtype}")
        # Cast first: a float64 value that is finite can still overflow to inf in float32.
        tensor = tensor.to(ref.dtype)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{key} contains NaN or infinite values")
        fitted[key] = tensor
    return fitted


def _check_layout(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], label: str) -> None:
    """Same keys and shapes as ``expected``, or a CheckpointError naming the first difference of each kind.

    ``load_state_dict`` would catch key and shape problems too, but its message lists every
    key of the network; naming the first of each kind with both shapes tells the user at once
    whether they picked the wrong architecture or the wrong number of classes.
    """
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)  # file order depends on the format
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]

    def more(keys: list[str]) -> str:
        return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

    problems = []
    if missing:
        problems.append(f"missing {missing[0]}{more(missing)}")
    if unexpected:
        problems.append(f"unexpected {_shown(unexpected[0])}{more(unexpected)}")
    if mismatched:
        k = mismatched[0]
        got, want = tuple(state[k].shape), tuple(expected[k].shape)
        problems.append(f"{k}: checkpoint has {got}, {label} expects {want}{more(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint does not fit {label}: " + "; ".join(problems))


def load_weights(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Fill ``model`` strictly; refuse mismatches and non-finite values.

    A partial or non-finite load would not fail loudly: it would give a model that silently
    misbehaves, and a purification result that means nothing.
    """
    state = read_state_dict(source) if isinstance(source, str | os.PathLike) else _as_state_dict(source)
    fitted = _fit(state, model.state_dict(), type(model).__name__)
    model.load_state_dict(fitted, strict=True)


# --------------------------------------------------------------------------- writing


def save_weights(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write canonical .safetensors atomically (:func:`clipguard.files.atomic_path`); return its sha256 hex.

    Readers never see a half-written file, and a crash leaves the previous file in place. The
    digest is of the bytes on disk, so it can name a content-addressed blob.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    # Copies, so tied or view-sharing tensors (which save_file refuses) become independent.
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}

    with atomic_path(os.path.abspath(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(str(tmp))
        digest = file_sha256(tmp)
    return digest


def _sort_metadata(path: str) -> None:
    """Rewrite the header's ``__metadata__`` with sorted keys, in place.

    safetensors (0.8 still) writes metadata in Rust HashMap order, which differs between calls,
    so identical weights hashed differently (safetensors issue #584). The rewritten header is
    padded with spaces to its old length, as safetensors pads it itself; if it would not fit,
    the file is left as written (valid, just not byte-reproducible).
    """
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        meta = header.get("__metadata__")
        if not meta or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(encoded) <= length:
            f.seek(8)
            f.write(encoded.ljust(length, b" "))


def canonicalize(path: str | os.PathLike, spec: ModelSpec, out_path: str | os.PathLike) -> str:
    """Quarantine step: read ``path`` safely, check it against ``spec.build()``, write canonical
    safetensors to ``out_path`` atomically and return its sha256.

    Everything downstream (GPU workers included) only ever opens the canonical file, so the
    checks happen once, here: same keys and shapes as the registry's network, finite values,
    floating/integer dtypes as in the model (cast to the model's dtype). Nothing is written
    unless all checks pass.
    """
    expected = expected_state(spec)
    if layout := safetensors_layout(path):  # keys and shapes from the header, before any tensor is read
        _check_layout(_as_state_dict(layout), expected, spec.arch)
    state = read_state_dict(path)
    fitted = _fit(state, expected, spec.arch)
    return save_weights(fitted, out_path, metadata={"arch": spec.arch, "num_classes": str(spec.num_classes)})


def expected_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The architecture's state_dict as shapes and dtypes only: built on the meta device, so checking an
    upload against a large network (a ViT-L is 300 M parameters) allocates none of it. A builder that
    cannot run there is built for real."""
    try:
        with torch.device("meta"):
            return dict(spec.build().state_dict())
    except (NotImplementedError, RuntimeError):  # a builder that computes with tensors (RegNet's widths)
        with _moved_to_meta():
            return dict(spec.build().state_dict())


@contextlib.contextmanager
def _moved_to_meta() -> Iterator[None]:
    """Every parameter and buffer goes to the meta device as it is registered: the builder's own tensor
    arithmetic runs on the CPU, and at most one parameter exists in memory at a time."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, tensor.to("meta") if tensor is not None else None, persistent)

    # Patching the methods on the class is the point (every module built inside registers through them).
    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]


def safetensors_layout(path: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """A safetensors file's keys and shapes, read from its header alone, as meta tensors; None for another
    format (or a header that does not parse: :func:`read_state_dict` then says why)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_SAFETENSORS_HEADER or f.read(1) != b"{":
                return None
            f.seek(8)
            header = json.loads(f.read(length))
        return {k: torch.empty(tuple(v["shape"]), device="meta") for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError):
        return None


def _shown(key: str) -> str:
    """A key from the upload, safe to put in a one-line message (no newlines, bounded length)."""
    return key if key.isprintable() and len(key) <= 120 else repr(key)[:120]


def _corrupt(what: str, exc: BaseException) -> CheckpointError:
    text = str(exc).strip()
    detail = text.splitlines()[0][:200] if text else type(exc).__name__
    return CheckpointError(f"unreadable {what} (truncated or corrupt): {detail}")
