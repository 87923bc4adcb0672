"""Attack specs (``"badnets:size=5,position=top-left"``) and the saved-attack file format.

Why a spec string: the CLI, the service and the benches all name an attack in one
argument. Why a saved file: a victim's trigger (the Blend pattern, the WaNet grid) must
be rebuilt *exactly* when its ASR is measured later, on another machine, so
``save_attack`` writes the parameters as JSON and the trigger tensors beside it as
safetensors (no pickle: attack files may come from someone else).

File format: ``<path>`` is JSON ``{"format": "clipguard-attack", "version": 1,
"attack": {...to_dict()...}, "tensors": {"file": "<name>.safetensors", "sha256": ...}}``
(``"tensors": null`` when the attack has none), and ``<path>.safetensors`` holds them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from clipguard.attacks.adaptive import AdapBlend, AdapPatch
from clipguard.attacks.badnets import BadNets
from clipguard.attacks.base import MODE_ALIASES, MODES, Attack, parse_int
from clipguard.attacks.blend import Blend
from clipguard.attacks.sig import SIG
from clipguard.attacks.tact import TaCT
from clipguard.attacks.wanet import WaNet
from clipguard.errors import ClipguardError, DataError
from clipguard.files import atomic_path, file_sha256, write_text

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, Blend, WaNet, SIG, AdapBlend, AdapPatch, TaCT)}
COMMON_OPTIONS = ("mode", "target")
FORMAT = "clipguard-attack"
VERSION = 1
ALL2ALL_SUFFIXES = ("-all2all", "_all2all", "-all_to_all")


def available_attacks() -> list[str]:
    """Attack names a spec may start with (each also takes a ``-all2all`` suffix)."""
    return sorted(ATTACKS)


def build_attack(
    spec: str | os.PathLike,
    *,
    target: int = 0,
    seed: int = 0,
    image_size: tuple[int, int] = (32, 32),
    files: bool = True,
) -> Attack:
    """An attack from a spec string, or from a saved attack JSON (then the saved trigger wins).

    ``files=False`` (the service: the spec comes from a request) never touches the filesystem: a spec is
    not looked up as a file and Blend's ``image`` option is refused.

    Spec: ``name[:key=value,key=value,...]``; ``name`` is one of :func:`available_attacks`
    (``-`` and ``_`` alike: ``adap-blend`` is ``adap_blend``), optionally with ``-all2all``.
    ``mode`` (``all_to_one``/``all_to_all``) and ``target`` are accepted by every attack and
    override the keyword arguments; a value may itself hold commas (``position=3,4``,
    ``source=1,2``). ``seed`` fixes random triggers (Blend noise, WaNet grid, the substitute
    patch colours); ``image_size`` is ``(H, W)`` of the images the trigger will be stamped on.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ClipguardError(_valid_names("empty attack spec"))
    if files and (text.lower().endswith(".json") or Path(text).expanduser().is_file()):
        return load_attack(text)
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    mode = "all_to_one"
    for suffix in ALL2ALL_SUFFIXES:
        if name.endswith(suffix):
            name, mode = name[: -len(suffix)], "all_to_all"
            break
    name = name.replace("-", "_")
    if name not in ATTACKS:
        raise ClipguardError(_valid_names(f"unknown attack {name!r}"))
    cls = ATTACKS[name]
    options = parse_options(rest, name)
    if not files and "image" in options:
        raise ClipguardError(f"attack {name}: option image names a file, and files are not read here")
    unknown = sorted(set(options) - set(cls.OPTIONS) - set(COMMON_OPTIONS))
    if unknown:
        valid = ", ".join((*cls.OPTIONS, *COMMON_OPTIONS))
        raise ClipguardError(f"unknown option(s) {', '.join(unknown)} for attack {name}; valid options: {valid}")
    if "mode" in options:
        if options["mode"] not in MODE_ALIASES:
            raise ClipguardError(f"option mode must be one of {', '.join(MODES)}, got {options['mode']!r}")
        mode = MODE_ALIASES[options.pop("mode")]
    if "target" in options:
        target = parse_int("target", options.pop("target"), 0)
    return cls.from_options(options, target=target, mode=mode, seed=seed, image_size=tuple(image_size))  # type: ignore[arg-type]


def parse_options(text: str, name: str) -> dict[str, str]:
    """``"a=1,b=2,3"`` -> ``{"a": "1", "b": "2,3"}``: a piece without ``=`` continues the previous value."""
    options: dict[str, str] = {}
    key: str | None = None
    for piece in text.split(","):
        if "=" in piece:
            k, _, v = piece.partition("=")
            key = k.strip().lower().replace("-", "_")
            if not key:
                raise ClipguardError(f"attack {name}: option without a name in {text!r}")
            if key in options:
                raise ClipguardError(f"attack {name}: option {key} given twice")
            options[key] = v.strip()
        elif piece.strip():
            if key is None:
                raise ClipguardError(f"attack {name}: expected key=value options, got {piece.strip()!r}")
            options[key] += "," + piece.strip()
    return options


def _valid_names(problem: str) -> str:
    names = ", ".join(available_attacks())
    return (
        f"{problem}; valid attacks: {names} (append -all2all for all-to-all), options as name:key=value,..., "
        "or a saved .attack.json"
    )


# ---------------------------------------------------------------------------- files


def tensors_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_attack` puts the trigger tensors of ``path``: ``<path>.safetensors``."""
    p = Path(path)
    return p.with_name(p.name + ".safetensors")


def save_attack(attack: Attack, path: str | os.PathLike) -> Path:
    """Write ``path`` (JSON) and, for attacks with tensors, ``<path>.safetensors``; both atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in attack.tensors().items()}
    record: dict = {"format": FORMAT, "version": VERSION, "attack": attack.to_dict(), "tensors": None}
    if tensors:
        tpath = tensors_path(path)
        with atomic_path(tpath) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "attack": attack.name})
        record["tensors"] = {"file": tpath.name, "sha256": file_sha256(tpath), "keys": sorted(tensors)}
    write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def load_attack(path: str | os.PathLike) -> Attack:
    """Rebuild the attack :func:`save_attack` wrote, trigger tensors included, bit for bit.

    Also accepts a bare ``to_dict()`` JSON (as recorded in a training report); random
    triggers are then regenerated from their seed and must match the recorded sha256.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"attack file not found: {path}")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path.name}: not a readable attack JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise DataError(f"{path.name}: not an attack file")
    if record.get("format") == FORMAT:
        if record.get("version") != VERSION:
            raise DataError(f"{path.name}: attack file version {record.get('version')!r} is not supported")
        params, meta = record.get("attack"), record.get("tensors")
    else:
        params, meta = record, None
    if not isinstance(params, dict) or params.get("name") not in ATTACKS:
        found = params.get("name") if isinstance(params, dict) else None
        raise DataError(f"{path.name}: unknown attack {found!r}; known: {', '.join(available_attacks())}")
    tensors = _load_tensors(path, meta) if meta else {}
    try:
        return ATTACKS[params["name"]].from_state(params, tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path.name}: malformed {params['name']} attack ({type(exc).__name__}: {exc})") from exc


def _load_tensors(path: Path, meta: object) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(meta, dict) or not isinstance(meta.get("file"), str):
        raise DataError(f"{path.name}: malformed 'tensors' entry")
    # Only ever beside the JSON: ``<path>.safetensors``, else the recorded name (files renamed together).
    recorded = Path(meta["file"]).name
    candidates = [tensors_path(path)] + ([path.with_name(recorded)] if recorded not in ("", ".", "..") else [])
    tpath = next((c for c in candidates if c.is_file()), None)
    if tpath is None:
        raise DataError(f"{path.name}: trigger tensors {candidates[0].name} are missing (keep them beside the JSON)")
    if meta.get("sha256") and file_sha256(tpath) != meta["sha256"]:
        raise DataError(f"{tpath.name} does not match the sha256 recorded in {path.name}")
    try:
        return load_file(str(tpath))
    except (SafetensorError, OSError) as exc:
        raise DataError(f"{tpath.name}: unreadable safetensors ({exc})") from exc
