"""``/v1/models``: upload a suspect checkpoint; it becomes usable once quarantine says ``ready``."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

from clipguard.app import quota
from clipguard.app.db import Job, Model
from clipguard.app.deps import SessionDep, SessionsDep, SettingsDep, TenantDep
from clipguard.app.pagination import paginate
from clipguard.app.problems import ProblemError
from clipguard.app.quarantine import QuarantineQueue, QueueFull, quarantine
from clipguard.app.schemas import ModelOut, ModelStatus, Page
from clipguard.app.settings import Settings
from clipguard.app.storage import Blob, StorageError, storage_for, upload_chunks
from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

router = APIRouter(prefix="/v1/models", tags=["models"])
ARCH_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
"""Registry names and ``torchvision:<name>``; checked against the registry by the quarantine (no torch here)."""
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"
"""Free text without control characters (PostgreSQL cannot store a NUL; logs should not carry escapes)."""
NAME_MAX = 200
"""The ``name`` columns' length."""


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
        raise ProblemError(
            422, f"{name} must be three comma-separated {what} numbers, got {text!r}"[:300], kind="validation"
        )
    return values


def run_quarantine(sessions: sessionmaker, settings: Settings, model_id: str, upload: Path) -> None:
    """Background step after an upload: decide ``ready`` or ``rejected`` (runs in a worker thread)."""
    with sessions() as s:
        model = s.get_one(Model, model_id)
    verdict = quarantine(
        upload,
        arch=model.arch,
        num_classes=model.num_classes,
        mean=model.mean,
        std=model.std,
        blobs=settings.blobs_dir,
        tmp=settings.tmp_dir,
        timeout_s=settings.quarantine_timeout_s,
        memory_bytes=settings.quarantine_memory_bytes,
    )
    # A reason may quote the upload: no NUL (PostgreSQL cannot store one) nor other control characters.
    ok, reason = verdict.ok, verdict.reason and "".join(c if c.isprintable() else "?" for c in verdict.reason)
    if ok:  # shared before the model is ready: a worker on another host fetches it from there
        try:
            storage_for(settings).put_blob(settings.blobs_dir / f"{verdict.sha256}.safetensors")
        except StorageError as exc:  # never leave the model "validating": say why, the user uploads again
            ok, reason = False, f"the checkpoint passed its checks but could not be shared with the workers: {exc}"
    with sessions.begin() as s:
        s.execute(
            update(Model)
            .where(Model.id == model_id, Model.status == "validating")
            .values(status="ready" if ok else "rejected", canonical_sha256=verdict.sha256, reject_reason=reason)
        )


QUARANTINE_RETRY_AFTER_S = "10"


@contextlib.asynccontextmanager
async def _quarantine_place(request: Request, tenant: str) -> AsyncIterator[QuarantineQueue]:
    """One of the tenant's places in the quarantine queue, taken before the upload is stored (429 when it has
    none left) and given back if the upload fails before the check is queued."""
    queue: QuarantineQueue = request.app.state.quarantine
    try:
        queue.reserve(tenant)
    except QueueFull:
        raise ProblemError(
            429,
            f"{queue.per_tenant} checkpoints of yours are already waiting for or in quarantine; "
            "retry once one is decided",
            kind="quarantine-busy",
            headers={"Retry-After": QUARANTINE_RETRY_AFTER_S},
        ) from None
    try:
        yield queue
    except BaseException:
        queue.unreserve(tenant)
        raise


async def _accept_upload(
    sessions: sessionmaker, settings: Settings, model: Model, blob: Blob, queue: QuarantineQueue
) -> Model:
    with sessions.begin() as s:
        claimed = s.execute(
            update(Model)
            .where(Model.id == model.id, Model.status == "awaiting_upload")
            .values(status="validating", upload_sha256=blob.sha256, upload_size=blob.size)
        ).rowcount
    if not claimed:
        raise ProblemError(409, "this model's content was already uploaded", kind="conflict")
    queue.submit(model.tenant, functools.partial(run_quarantine, sessions, settings, model.id, blob.path))
    with sessions() as s:
        return s.get_one(Model, model.id)


@router.post(
    "",
    status_code=201,
    response_model=ModelOut,
    responses={
        403: {"description": "over the tenant's storage quota"},
        413: {"description": "upload over the size limit"},
        422: {"description": "bad fields"},
        429: {"description": "too many of the tenant's checkpoints in quarantine"},
    },
)
async def create_model(
    request: Request,
    response: Response,
    tenant: TenantDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    arch: Annotated[
        str,
        Form(
            pattern=ARCH_PATTERN,
            description="architecture from the registry, e.g. `small_cnn`, `resnet18`, `torchvision:<name>`",
        ),
    ],
    num_classes: Annotated[int, Form(ge=2, le=100_000)] = 10,
    mean: Annotated[str | None, Form(description="input normalisation mean, `r,g,b`")] = None,
    std: Annotated[str | None, Form(description="input normalisation std, `r,g,b`")] = None,
    name: Annotated[str | None, Form(max_length=NAME_MAX, pattern=NAME_PATTERN)] = None,
    file: Annotated[
        UploadFile | None,
        File(
            description="`.safetensors` or zip-format torch.save(state_dict); "
            "omit it to upload later with PUT …/content"
        ),
    ] = None,
) -> Model:
    """Register a model; with ``file`` the upload is checked in quarantine right away."""
    model = Model(
        tenant=tenant,
        arch=arch,
        num_classes=num_classes,
        mean=parse_triplet("mean", mean),
        std=parse_triplet("std", std, positive=True),
        name=name,
        status="awaiting_upload",
    )
    if file is None:
        with sessions.begin() as s:
            s.add(model)
        response.headers["Location"] = f"/v1/models/{model.id}"
        return model
    async with _quarantine_place(request, tenant) as queue:  # before anything is stored
        blob = await quota.store_upload(upload_chunks(file), sessions, settings, tenant, file.size, ".upload")
        with sessions.begin() as s:
            s.add(model)
        response.headers["Location"] = f"/v1/models/{model.id}"
        return await _accept_upload(sessions, settings, model, blob, queue)


@router.put(
    "/{model_id}/content",
    status_code=202,
    response_model=ModelOut,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    responses={409: {"description": "content already uploaded"}, 413: {"description": "over the limit"}},
)
async def put_content(
    model_id: str, request: Request, tenant: TenantDep, sessions: SessionsDep, settings: SettingsDep
) -> Model:
    """Stream the checkpoint bytes (any size up to the limit, memory stays flat), then quarantine them."""
    with sessions() as s:
        model = _owned(s, tenant, model_id)
    if model.status != "awaiting_upload":
        raise ProblemError(409, "this model's content was already uploaded", kind="conflict")
    declared = request.headers.get("content-length", "")
    async with _quarantine_place(request, tenant) as queue:
        blob = await quota.store_upload(
            request.stream(), sessions, settings, tenant, int(declared) if declared.isdigit() else None, ".upload"
        )
        return await _accept_upload(sessions, settings, model, blob, queue)


@router.delete("/{model_id}", status_code=204, responses={409: {"description": "in use by a job, or in quarantine"}})
def delete_model(model_id: str, tenant: TenantDep, sessions: SessionsDep) -> Response:
    """Delete a model. Refused (409) while it is in quarantine or any job names it: delete those jobs first.
    Its files are removed by the sweeper once nothing else uses them (``clipguard.app.cleanup``)."""
    with sessions.begin() as s:
        model = _owned(s, tenant, model_id)
        if model.status == "validating":
            raise ProblemError(409, f"model {model_id} is in quarantine; delete it once it is decided", kind="conflict")
        if jobs := s.scalar(select(func.count()).select_from(Job).where(Job.model_id == model_id)):
            raise ProblemError(409, f"model {model_id} is used by {jobs} job(s); delete them first", kind="in-use")
        s.delete(model)
    return Response(status_code=204)


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, tenant: TenantDep, session: SessionDep) -> Model:
    return _owned(session, tenant, model_id)


@router.get("", response_model=Page[ModelOut])
def list_models(
    tenant: TenantDep,
    session: SessionDep,
    status: ModelStatus | None = None,
    page_size: int = 50,
    page_token: str | None = None,
) -> dict:
    query = select(Model).where(Model.tenant == tenant)
    if status:
        query = query.where(Model.status == status)
    return paginate(session, query, Model, page_size, page_token)


def _owned(session: Session, tenant: str, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.tenant != tenant:
        raise ProblemError(404, f"no model {model_id}", kind="not-found")
    return model
