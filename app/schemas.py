"""Every request and response body of the HTTP API, in one place (the OpenAPI document is built from these)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelStatus = Literal["awaiting_upload", "validating", "ready", "rejected"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
PurifyMethod = Literal["guard", "paper"]
"""The engine's methods (``clipguard.purify.METHODS``), spelled out so the OpenAPI document lists them."""

# An attack given by name and options (``badnets:pattern=checkerboard``), never a file path:
# the engine would read a path on the server.
_ATTACK_SPEC = re.compile(r"^[A-Za-z0-9_-]{1,40}(:[A-Za-z0-9_=.,:-]{0,400})?$")


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` lists the fields a validation error is about."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"examples": [{
        "id": "4f1c0b6f0a6a4d8f9a1e2b3c4d5e6f70", "name": "victim", "arch": "small_cnn", "num_classes": 10,
        "mean": None, "std": None, "status": "ready", "reject_reason": None,
        "sha256": "9b1e…", "upload_sha256": "51aa…", "size": 1234567, "created_at": "2026-11-24T12:00:00Z"}]})

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


ResourceId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$",
                                   description="an id this API returned")]
"""Ids in request bodies: an unknown one answers 404, but control characters (a NUL cannot be
stored in PostgreSQL) and absurd lengths are a 422 before any query."""


class EvalSpec(BaseModel):
    test_data_id: ResourceId
    attack: str | dict[str, Any] | None = Field(
        None, description="attack spec (`badnets`, `blend:alpha=0.2`, …) or the `.attack.json` object written by "
                          "`clipguard train`, to report ASR before and after")

    @field_validator("attack")
    @classmethod
    def _spec_not_path(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, str) and not _ATTACK_SPEC.match(v):
            raise ValueError("attack must be `name[:key=value,...]` or an attack JSON object")
        return v


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "model_id": "4f1c0b6f0a6a4d8f9a1e2b3c4d5e6f70", "train_data_id": "0a9d…", "method": "guard", "lam": "auto",
        "granularity": "channel", "eval": {"test_data_id": "77ef…", "attack": "badnets"}}]})

    model_id: ResourceId
    train_data_id: ResourceId
    method: PurifyMethod = Field("guard", description=(
        "`guard` (default): find the poisoned share of the training data from the model's own features, "
        "unlearn it in a short fine-tune, then clip at μ+λσ with bounds from the rest of the data; the "
        "purified weights differ from the upload. `paper`: the paper's recipe, the μ+λσ clip alone, with "
        "the uploaded weights unchanged"))
    lam: float | Literal["auto"] | None = Field(
        None, description="λ in μ+λσ, `auto`, or null for the method's default (6 for `guard`, 4 for `paper`)")
    granularity: Literal["channel", "element"] = "channel"
    bounds_samples: int | None = Field(
        None, ge=0, le=10_000_000,
        description="measure μ and σ on at most this many training images, a fixed random subset; 0 = all, "
                    "null = the engine's default (5000 with channel granularity, all with element)")
    eval: EvalSpec | None = None


class ArtifactOut(BaseModel):
    name: str
    url: str
    sha256: str
    size: int
    media_type: str


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "c0ffee…", "state": "running", "stage": "bounds", "percent": 42.0, "error": None, "attempts": 1,
        "model_id": "4f1c…", "train_data_id": "0a9d…", "test_data_id": None,
        "params": {"method": "guard", "lam": 3.0, "granularity": "channel", "attack": None},
        "created_at": "2026-11-24T12:00:00Z", "started_at": "2026-11-24T12:00:01Z", "finished_at": None,
        "artifacts": [], "summary": None}]})

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
    params: dict[str, Any] = Field(description=(
        "what the job was created with: `method`, `lam`, `granularity`, `attack`, and `bounds_samples` when "
        "given (a job created before `method` existed has none and is run with `guard`)"))
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    artifacts: list[ArtifactOut]
    summary: dict[str, Any] | None = Field(None, description="λ and ACC/ASR before and after, from report.json")


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None = Field(None, description="pass as `page_token` for the next page; null at the end")
