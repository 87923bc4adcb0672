"""``/v1/models``: upload a suspect checkpoint; it becomes usable once quarantine says ``ready``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, File, Form, Request, Response, UploadFile
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import Model
from app.deps import SessionDep, SessionsDep, SettingsDep, TenantDep
from app.pagination import paginate
from app.problems import ProblemError
from app.quarantine import quarantine
from app.schemas import ModelOut, ModelStatus, Page
from app.settings import Settings
from app.storage import Blob, StorageError, storage_for, store_stream, upload_chunks

router = APIRouter(prefix="/v1/models", tags=["models"])
ARCH_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
"""Registry names and ``torchvision:<name>``; checked against the registry by the quarantine (no torch here)."""
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"
"""Free text without control characters (PostgreSQL cannot store a NUL; logs should not carry escapes)."""


def parse_triplet(name: str, text: str | None, *, positive: bool = False) -> list[float] | None:
    """Three finite numbers (``inf``/``nan`` would poison normalisation, and PostgreSQL's JSON refuses them)."""
    if text is None or not text.strip():
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        what = "positive" if positive else "finite"
        raise ProblemError(422, f"{name} must be three comma-separated {what} numbers, got {text!r}"[:300],
                           kind="validation")
    return values


def run_quarantine(sessions: sessionmaker, settings: Settings, model_id: str, upload: Path) -> None:
    """Background step after an upload: decide ``ready`` or ``rejected`` (runs in a worker thread)."""
    with sessions() as s:
        model = s.get_one(Model, model_id)
    verdict = quarantine(upload, arch=model.arch, num_classes=model.num_classes, mean=model.mean, std=model.std,
                         blobs=settings.blobs_dir, tmp=settings.tmp_dir, timeout_s=settings.quarantine_timeout_s,
                         memory_bytes=settings.quarantine_memory_bytes)
    ok, reason = verdict.ok, verdict.reason
    if ok:  # shared before the model is ready: a worker on another host fetches it from there
        try:
            storage_for(settings).put_blob(settings.blobs_dir / f"{verdict.sha256}.safetensors")
        except StorageError as exc:  # never leave the model "validating": say why, the user uploads again
            ok, reason = False, f"the checkpoint passed its checks but could not be shared with the workers: {exc}"
    with sessions.begin() as s:
        s.execute(update(Model).where(Model.id == model_id, Model.status == "validating").values(
            status="ready" if ok else "rejected", canonical_sha256=verdict.sha256, reject_reason=reason))


async def _accept_upload(sessions: sessionmaker, settings: Settings, model: Model, blob: Blob,
                         background: BackgroundTasks) -> Model:
    with sessions.begin() as s:
        claimed = s.execute(update(Model).where(Model.id == model.id, Model.status == "awaiting_upload").values(
            status="validating", upload_sha256=blob.sha256, upload_size=blob.size)).rowcount
    if not claimed:
        raise ProblemError(409, "this model's content was already uploaded", kind="conflict")
    background.add_task(run_quarantine, sessions, settings, model.id, blob.path)
    with sessions() as s:
        return s.get_one(Model, model.id)



@router.post("", status_code=201, response_model=ModelOut,
             responses={413: {"description": "upload over the size limit"}, 422: {"description": "bad fields"}})
async def create_model(
    response: Response, background: BackgroundTasks, tenant: TenantDep,
    sessions: SessionsDep, settings: SettingsDep,
    arch: Annotated[str, Form(pattern=ARCH_PATTERN, description="architecture from the registry, e.g. `small_cnn`, "
                                                               "`resnet18`, `torchvision:<name>`")],
    num_classes: Annotated[int, Form(ge=2, le=100_000)] = 10,
    mean: Annotated[str | None, Form(description="input normalisation mean, `r,g,b`")] = None,
    std: Annotated[str | None, Form(description="input normalisation std, `r,g,b`")] = None,
    name: Annotated[str | None, Form(max_length=200, pattern=NAME_PATTERN)] = None,
    file: Annotated[UploadFile | None, File(description="`.safetensors` or zip-format torch.save(state_dict); "
                                                    "omit it to upload later with PUT …/content")] = None,
) -> Model:
    """Register a model; with ``file`` the upload is checked in quarantine right away."""
    model = Model(tenant=tenant, arch=arch, num_classes=num_classes, mean=parse_triplet("mean", mean),
                  std=parse_triplet("std", std, positive=True), name=name, status="awaiting_upload")
    with sessions.begin() as s:
        s.add(model)
    response.headers["Location"] = f"/v1/models/{model.id}"
    if file is None:
        return model
    blob = await store_stream(upload_chunks(file), blobs=settings.blobs_dir, tmp=settings.tmp_dir,
                              limit=settings.max_upload_bytes, suffix=".upload")
    return await _accept_upload(sessions, settings, model, blob, background)


@router.put("/{model_id}/content", status_code=202, response_model=ModelOut,
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
            responses={409: {"description": "content already uploaded"}, 413: {"description": "over the limit"}})
async def put_content(model_id: str, request: Request, background: BackgroundTasks, tenant: TenantDep,
                      sessions: SessionsDep, settings: SettingsDep) -> Model:
    """Stream the checkpoint bytes (any size up to the limit, memory stays flat), then quarantine them."""
    with sessions() as s:
        model = _owned(s, tenant, model_id)
    if model.status != "awaiting_upload":
        raise ProblemError(409, "this model's content was already uploaded", kind="conflict")
    blob = await store_stream(request.stream(), blobs=settings.blobs_dir, tmp=settings.tmp_dir,
                              limit=settings.max_upload_bytes, suffix=".upload")
    return await _accept_upload(sessions, settings, model, blob, background)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, tenant: TenantDep, session: SessionDep) -> Model:
    return _owned(session, tenant, model_id)


@router.get("", response_model=Page[ModelOut])
def list_models(tenant: TenantDep, session: SessionDep, status: ModelStatus | None = None,
                page_size: int = 50, page_token: str | None = None) -> dict:
    query = select(Model).where(Model.tenant == tenant)
    if status:
        query = query.where(Model.status == status)
    return paginate(session, query, Model, page_size, page_token)


def _owned(session: Session, tenant: str, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant != tenant:
        raise ProblemError(404, f"no model {model_id}", kind="not-found")
    return model
