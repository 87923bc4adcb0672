"""Every request and response body of the HTTP API, in one place (the OpenAPI document is built from these)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from clipguard.lam import LAM_MAX, LAM_MIN
from clipguard.methods import DEFAULTS, METHOD_HELP, Granularity, Method
from clipguard.report import Summary

ModelStatus = Literal["awaiting_upload", "validating", "ready", "rejected"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]

# An attack given by name and options (``badnets:pattern=checkerboard``), never a file path:
# the engine would read a path on the server.
_ATTACK_SPEC = re.compile(r"^[A-Za-z0-9_-]{1,40}(:[A-Za-z0-9_=.,:-]{0,400})?$")
_ALL2ALL = re.compile(r"(-all2all|_all2all|-all_to_all)$")
_OPTION_START = re.compile(r",(?=\s*[A-Za-z0-9_-]+\s*=)")
"""A comma that starts the next ``key=value``; any other comma belongs to the value (``position=3,4``)."""


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` lists the fields a validation error is about."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ModelOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": "4f1c0b6f0a6a4d8f9a1e2b3c4d5e6f70",
                    "name": "victim",
                    "arch": "small_cnn",
                    "num_classes": 10,
                    "mean": None,
                    "std": None,
                    "status": "ready",
                    "reject_reason": None,
                    "sha256": "9b1e…",
                    "upload_sha256": "51aa…",
                    "size": 1234567,
                    "created_at": "2026-11-24T12:00:00Z",
                }
            ]
        },
    )

    id: str
    name: str | None
    arch: str
    num_classes: int
    mean: list[float] | None
    std: list[float] | None
    status: ModelStatus
    reject_reason: str | None
    sha256: str | None = Field(None, validation_alias="canonical_sha256", description="sha256 of the canonical weights")
    upload_sha256: str | None
    size: int | None = Field(None, validation_alias="upload_size")
    created_at: datetime


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    kind: Literal["upload", "path", "registered"]
    name: str | None
    sha256: str | None
    size: int | None
    created_at: datetime


class DatasetPath(BaseModel):
    """A dataset referenced by server path (under a configured data root) or by registered name."""

    path: str | None = Field(None, description="server path under a configured data root, optionally `#split`")
    name: str | None = Field(None, description="a dataset name registered by the operator, e.g. `cifar10-train`")


ResourceId = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$", description="an id this API returned")
]
"""Ids in request bodies: an unknown one answers 404, but control characters (a NUL cannot be
stored in PostgreSQL) and absurd lengths are a 422 before any query."""


# ---- attacks in job bodies: every option the engine reads, bounded, and never a file -----------------

MAX_TRIGGER_SIDE = 4096
"""Largest trigger side accepted (the decoder's per-image cap is 4096 x 4096 pixels)."""
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]
Side = Annotated[int, Field(ge=1, le=MAX_TRIGGER_SIDE)]


def _no_image(v: object) -> None:
    if v is not None:
        raise ValueError(
            "a trigger made from an image file cannot be given in a job body: the server reads no file "
            "a request names; use the default (generated) trigger, or evaluate locally with "
            "`clipguard evaluate`"
        )
    return None


NoImage = Annotated[None, BeforeValidator(_no_image), Field(description="always null: no file is read")]
CoverRate = Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)]
Opacity = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
ClassIndex = Annotated[int, Field(ge=0, le=100_000)]
TriggerName = Annotated[str, Field(pattern=r"^[a-z0-9_]{1,40}$")]


class _AttackObject(BaseModel):
    """Options every attack has (``Attack.to_dict`` in the engine). ``image_size`` is optional: the worker
    takes the evaluation data's and refuses a trigger made for another size."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `true` is not a size, `"3"` not a seed

    target: int = Field(0, ge=0, le=100_000)
    mode: Literal["all_to_one", "all_to_all"] = "all_to_one"
    poisoning: Literal["static", "per_batch"] | None = None
    image_size: list[Side] | None = Field(None, min_length=2, max_length=2)


class BadNetsAttack(_AttackObject):
    name: Literal["badnets"]
    size: Side
    pattern: Literal["white", "black", "checkerboard"]
    position: str = Field(pattern=r"^(top-left|top-right|bottom-left|bottom-right|\d{1,5},\d{1,5})$")
    value: int = Field(ge=0, le=255)


class BlendAttack(_AttackObject):
    name: Literal["blend"]
    alpha: float = Field(gt=0, le=1, allow_inf_nan=False)
    seed: Seed = 0
    pattern_sha256: Sha256
    image: NoImage = None


class WaNetAttack(_AttackObject):
    name: Literal["wanet"]
    k: int = Field(ge=2, le=MAX_TRIGGER_SIDE)
    s: float = Field(ge=0, le=1000, allow_inf_nan=False)
    grid_rescale: float = Field(gt=0, le=1000, allow_inf_nan=False)
    cross_ratio: float = Field(ge=0, le=1000, allow_inf_nan=False)
    seed: Seed = 0
    grid_sha256: Sha256


class AdapBlendAttack(_AttackObject):
    name: Literal["adap_blend"]
    cover_rate: CoverRate = None
    alpha: Opacity
    test_alpha: Opacity
    pieces: int = Field(ge=1, le=MAX_TRIGGER_SIDE)
    mask_rate: float = Field(ge=0, lt=1, allow_inf_nan=False)
    image: NoImage = None
    seed: Seed = 0
    trigger_sha256: Sha256


class AdapPatchAttack(_AttackObject):
    name: Literal["adap_patch"]
    cover_rate: CoverRate = None
    alphas: list[Opacity] = Field(min_length=4, max_length=4)
    test_alpha: Opacity
    seed: Seed = 0
    triggers: list[TriggerName] | None = Field(None, max_length=16, description="informational: the substitutes' names")
    test_triggers: list[TriggerName] | None = Field(None, max_length=16)
    trigger_sha256: Sha256


class SigAttack(_AttackObject):
    name: Literal["sig"]
    delta: float = Field(gt=0, le=255, allow_inf_nan=False)
    freq: int = Field(ge=1, le=MAX_TRIGGER_SIDE)
    label: Literal["clean", "dirty"]
    trigger_sha256: Sha256


class TactAttack(_AttackObject):
    name: Literal["tact"]
    cover_rate: CoverRate = None
    source: list[ClassIndex] = Field(min_length=1, max_length=1000)
    cover: list[ClassIndex] = Field(max_length=1000)
    seed: Seed = 0
    trigger: TriggerName | None = Field(None, description="informational: the substitute's name")
    trigger_sha256: Sha256


AttackObject = Annotated[
    BadNetsAttack | BlendAttack | WaNetAttack | AdapBlendAttack | AdapPatchAttack | SigAttack | TactAttack,
    Field(discriminator="name"),
]
"""The object form of an attack, as ``clipguard train`` records it (``<weights>.attack.json``). A trigger
is rebuilt from its seed and must hash to the recorded sha256; its tensors are never sent."""
SPEC_OPTIONS: dict[str, frozenset[str]] = {
    "badnets": frozenset({"size", "pattern", "position", "value"}),
    "blend": frozenset({"alpha", "seed"}),
    "wanet": frozenset({"k", "s", "grid_rescale", "cross_ratio", "poisoning", "seed"}),
    "adap_blend": frozenset({"alpha", "test_alpha", "pieces", "mask_rate", "cover_rate", "seed"}),
    "adap_patch": frozenset({"alphas", "test_alpha", "cover_rate", "seed"}),
    "sig": frozenset({"delta", "freq", "label"}),
    "tact": frozenset({"source", "cover", "cover_rate", "seed"}),
}
"""Options a spec string may set besides ``mode`` and ``target``: the engine's (``clipguard.attacks``), less
``image`` (a file). An attack family added to the engine is refused here until it is described in this module."""
_SPEC_FIELDS: dict[str, type[_AttackObject]] = {
    "badnets": BadNetsAttack,
    "blend": BlendAttack,
    "wanet": WaNetAttack,
    "adap_blend": AdapBlendAttack,
    "adap_patch": AdapPatchAttack,
    "sig": SigAttack,
    "tact": TactAttack,
}


def check_attack_spec(text: str) -> str:
    """A spec string (``badnets:size=5,position=3,4``) whose name, option names and values the engine will
    accept; raises ValueError naming the first problem. Never a path: a file name would be opened."""
    if not _ATTACK_SPEC.match(text) or text.lower().endswith(".json"):
        raise ValueError("attack must be `name[:key=value,...]` or an attack JSON object")
    name, _, rest = text.partition(":")
    name = _ALL2ALL.sub("", name.strip().lower()).replace("-", "_")
    if name not in SPEC_OPTIONS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(SPEC_OPTIONS))}")
    options: dict[str, str] = {}
    for piece in _OPTION_START.split(rest) if rest.strip() else []:
        key, eq, value = piece.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not eq or not key or key in options:
            raise ValueError(f"attack {name}: expected distinct key=value options, got {piece!r}")
        options[key] = value.strip()
    allowed = SPEC_OPTIONS[name] | {"mode", "target"}
    if unknown := sorted(set(options) - allowed):
        raise ValueError(f"attack {name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}")
    fields = _SPEC_FIELDS[name].model_fields
    for key, value in options.items():  # each value checked as the object form's field (strings converted)
        if key == "mode":
            value = {"all2all": "all_to_all", "all2one": "all_to_one"}.get(value, value)
        if key == "position" and value.replace("_", "-") in ("top-left", "top-right", "bottom-left", "bottom-right"):
            continue
        annotation = fields[key].rebuild_annotation()
        listed = list in (get_origin(annotation), get_origin(get_args(annotation)[0] if get_args(annotation) else None))
        try:  # a list option is written comma-separated (alphas=0.5,0.2,0.5,0.3; source=1,2)
            TypeAdapter(annotation).validate_python(value.split(",") if listed else value)
        except ValidationError as exc:
            raise ValueError(f"attack {name}: option {key}: {exc.errors()[0]['msg']}, got {value!r}") from None
    return text


AttackField = Annotated[
    Annotated[str, AfterValidator(check_attack_spec), Tag("spec")] | Annotated[AttackObject, Tag("object")],
    Discriminator(lambda v: "spec" if isinstance(v, str) else "object"),
]
"""A spec string or an attack object; each form's own errors are reported, not the other's."""


Lam = Annotated[float, Field(strict=True, gt=LAM_MIN, le=LAM_MAX, allow_inf_nan=False)]
"""λ as the engine accepts it (``clipguard.lam``): strict, so ``true`` and ``"3"`` are not numbers here."""


class EvalSpec(BaseModel):
    test_data_id: ResourceId
    attack: AttackField | None = Field(
        None,
        description="attack spec (`badnets`, `blend:alpha=0.2`, …) or the `.attack.json` object written by "
        "`clipguard train` (its trigger is rebuilt from the seed and checked against the recorded "
        "sha256), to report ASR before and after. Never a file: Blend's `image` is refused",
    )

    @field_validator("attack", mode="before")
    @classmethod
    def _unwrap_saved(cls, v: object) -> object:
        """A whole saved-attack file (``{"format": "clipguard-attack", "attack": {...}, "tensors": ...}``) is
        its ``attack`` object; the ``tensors`` entry names a file beside it on the client and is dropped."""
        if isinstance(v, dict) and v.get("format") == "clipguard-attack":
            if v.get("version") != 1:
                raise ValueError(f"attack file version {v.get('version')!r} is not supported")
            return v.get("attack")
        return v


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model_id": "4f1c0b6f0a6a4d8f9a1e2b3c4d5e6f70",
                    "train_data_id": "0a9d…",
                    "method": "guard",
                    "lam": "auto",
                    "granularity": "channel",
                    "eval": {"test_data_id": "77ef…", "attack": "badnets"},
                }
            ]
        },
    )

    model_id: ResourceId
    train_data_id: ResourceId
    method: Method = Field(
        DEFAULTS.method,
        description="; ".join(f"`{m}`{' (default)' if m == DEFAULTS.method else ''}: {METHOD_HELP[m]}" for m in Method),
    )
    lam: Lam | Literal["auto"] | None = Field(
        None,
        description=f"λ in μ+λσ, {LAM_MIN:g} < λ <= {LAM_MAX:g}, `auto`, or null for the method's default ("
        + ", ".join(f"{DEFAULTS.lam_for(m):g} for `{m}`" for m in Method)
        + ")",
    )
    granularity: Granularity = DEFAULTS.granularity
    bounds_samples: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="measure μ and σ on at most this many training images, a fixed random subset; 0 = all, "
        f"null = the engine's default ({DEFAULTS.bounds_samples} with channel granularity, all with element)",
    )
    resize: bool = Field(
        False,
        strict=True,
        description=(
            "scale every image to the architecture's input size; without it, images of another size fail the job "
            "(larger ones before they are decoded)"
        ),
    )
    reactivation_check: bool = Field(
        False,
        strict=True,
        description=(
            "after purifying, fine-tune a copy of the purified model briefly on a random slice of the training data "
            "without the suspects and report whether the backdoor comes back (ASR when `eval.attack` is given) and "
            "how far the predictions move (report field `reactivation`); the artifacts are not changed by it"
        ),
    )
    eval: EvalSpec | None = None


class ArtifactOut(BaseModel):
    name: str
    url: str
    sha256: str
    size: int
    media_type: str


class JobOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "c0ffee…",
                    "state": "running",
                    "stage": "bounds",
                    "percent": 42.0,
                    "error": None,
                    "attempts": 1,
                    "model_id": "4f1c…",
                    "train_data_id": "0a9d…",
                    "test_data_id": None,
                    "params": {"method": "guard", "lam": 3.0, "granularity": "channel", "attack": None},
                    "created_at": "2026-11-24T12:00:00Z",
                    "started_at": "2026-11-24T12:00:01Z",
                    "finished_at": None,
                    "artifacts": [],
                    "summary": None,
                }
            ]
        }
    )

    id: str
    state: JobState
    stage: str | None
    percent: float | None
    error: str | None
    attempts: int
    cancel_requested: bool
    model_id: str
    train_data_id: str
    test_data_id: str | None
    params: dict[str, Any] = Field(
        description=(
            "what the job was created with: `method`, `lam`, `granularity`, `attack`, and `bounds_samples` when "
            "given (a job created before `method` existed has none and is run with `guard`)"
        )
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifacts: list[ArtifactOut]
    summary: Summary | None = Field(
        None,
        description=(
            "report.json at a glance (λ, ACC/ASR before and after, the verdict, the reactivation check) once the job "
            "succeeded; the same type the engine's `clipguard.report.Summary` is"
        ),
    )


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = Field(None, description="pass as `page_token` for the next page; null at the end")
