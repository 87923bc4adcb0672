"""``/v1/datasets``: training or test data for jobs, as an upload, a server path, or a registered name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from clipguard.app import quota
from clipguard.app.db import Dataset, Job
from clipguard.app.deps import SessionDep, SessionsDep, SettingsDep, TenantDep
from clipguard.app.pagination import paginate
from clipguard.app.problems import ProblemError
from clipguard.app.routes.models import NAME_MAX, NAME_PATTERN
from clipguard.app.schemas import DatasetOut, Page
from clipguard.app.settings import Settings
from clipguard.app.storage import dataset_suffix, storage_for, upload_chunks
from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def resolve_server_path(text: str, settings: Settings) -> str:
    """A data reference for a path under a configured data root; anything else is refused.

    Symlinks and ``..`` are resolved first, so a link inside a root that points outside it
    is refused too. The ``#split`` suffix is kept for the engine.
    """
    path_text, sep, split = text.partition("#")
    refused = ProblemError(403, "path is not under a configured data root", kind="path-refused")
    try:
        path = Path(path_text).resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:  # ValueError: an embedded NUL byte
        raise refused from exc
    if not any(path.is_relative_to(root.resolve()) for root in settings.data_roots):
        raise refused
    if not (path.is_file() or path.is_dir()):  # a FIFO would block the worker's read; a device never ends
        raise ProblemError(422, "a dataset path must name a regular file or a folder", kind="validation")
    return f"{path}{sep}{split}"


def dataset_name(given: str | None, fallback: str | None) -> str | None:
    """The dataset's name: ``name`` as given (already checked by the form), else the file name or path it came
    from, which must pass the same check (printable, at most 200 characters): it is shown and logged."""
    if given is not None or fallback is None:
        return given
    if len(fallback) > NAME_MAX or not re.fullmatch(NAME_PATTERN.strip("^$"), fallback):
        raise ProblemError(
            422,
            f"the file name or path cannot be the dataset's name (control characters, or over "
            f"{NAME_MAX} characters); give `name`",
            kind="validation",
        )
    return fallback


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        403: {"description": "path outside the data roots, or over the storage quota"},
        413: {"description": "over the limit"},
    },
)
async def create_dataset(
    response: Response,
    tenant: TenantDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File(description="`.npz`, `.tar`, `.tar.gz` or `.zip` archive")] = None,
    path: Annotated[str | None, Form(description="server path under a data root, optionally `#split`")] = None,
    registered: Annotated[str | None, Form(description="a dataset name the operator registered")] = None,
    split: Annotated[str | None, Form(pattern=r"^[A-Za-z0-9_-]{1,50}$", description="split inside an archive")] = None,
    name: Annotated[str | None, Form(max_length=NAME_MAX, pattern=NAME_PATTERN)] = None,
) -> Dataset:
    """Give exactly one of ``file``, ``path`` or ``registered``."""
    if sum(x is not None for x in (file, path, registered)) != 1:
        raise ProblemError(422, "give exactly one of file, path or registered", kind="validation")
    if file is not None:
        suffix = dataset_suffix(file.filename or "")
        if suffix is None:
            raise ProblemError(422, "dataset uploads must be .npz, .tar, .tar.gz, .tgz or .zip", kind="validation")
        name = dataset_name(name, file.filename)  # before the bytes are stored
        blob = await quota.store_upload(upload_chunks(file), sessions, settings, tenant, file.size, suffix)
        await anyio.to_thread.run_sync(storage_for(settings).put_blob, blob.path)  # for workers on other hosts
        dataset = Dataset(
            tenant=tenant,
            kind="upload",
            name=name,
            sha256=blob.sha256,
            size=blob.size,
            ref=str(blob.path) + (f"#{split}" if split else ""),
        )
    elif path is not None:
        ref = resolve_server_path(path, settings)  # first: a refused path answers 403 whatever its name
        dataset = Dataset(tenant=tenant, kind="path", name=dataset_name(name, path), ref=ref)
    else:
        if registered not in settings.datasets:
            raise ProblemError(404, f"no registered dataset {registered!r}", kind="not-found")
        dataset = Dataset(tenant=tenant, kind="registered", name=registered, ref=settings.datasets[registered])
    with sessions.begin() as s:
        s.add(dataset)
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return dataset


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, tenant: TenantDep, session: SessionDep) -> Dataset:
    return _owned(session, tenant, dataset_id)


@router.delete("/{dataset_id}", status_code=204, responses={409: {"description": "used by a job"}})
def delete_dataset(dataset_id: str, tenant: TenantDep, sessions: SessionsDep) -> Response:
    """Delete a dataset. Refused (409) while any job names it: delete those jobs first. An uploaded file is
    removed by the sweeper once nothing else uses it (``clipguard.app.cleanup``)."""
    with sessions.begin() as s:
        dataset = _owned(s, tenant, dataset_id)
        used = s.scalar(
            select(func.count())
            .select_from(Job)
            .where(or_(Job.train_data_id == dataset_id, Job.test_data_id == dataset_id))
        )
        if used:
            raise ProblemError(409, f"dataset {dataset_id} is used by {used} job(s); delete them first", kind="in-use")
        s.delete(dataset)
    return Response(status_code=204)


def _owned(session: Session, tenant: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant != tenant:
        raise ProblemError(404, f"no dataset {dataset_id}", kind="not-found")
    return dataset


@router.get("", response_model=Page[DatasetOut])
def list_datasets(tenant: TenantDep, sessions: SessionsDep, page_size: int = 50, page_token: str | None = None) -> dict:
    """The tenant's datasets, newest first (the console lists them beside the models)."""
    with sessions() as session:  # opened here, not by SessionDep: see the note above clipguard.app.routes.jobs.get_job
        return paginate(session, select(Dataset).where(Dataset.tenant == tenant), Dataset, page_size, page_token)
