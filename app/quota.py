"""Per-tenant storage quota: what a tenant's uploads and job outputs take, against ``tenant_quota_bytes``.

Counted from the job store, so every API replica agrees without a counter to keep in step:
checkpoint uploads (``models.upload_size``), uploaded datasets (``datasets.size``; datasets by
server path or registered name are the operator's) and job artifacts (``artifacts.size``). Two
uploads racing can overshoot by one upload, which the next request then finds over the quota.
``DELETE`` on models, datasets and jobs gives the room back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio.to_thread
from clipguard.app.db import Artifact, Dataset, Job, Model
from clipguard.app.problems import ProblemError
from clipguard.app.settings import Settings
from clipguard.app.storage import Blob, store_stream
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker


def usage(sessions: sessionmaker, tenant: str) -> int:
    """Bytes the tenant stores now."""
    with sessions() as s:
        models = s.scalar(select(func.coalesce(func.sum(Model.upload_size), 0)).where(Model.tenant == tenant))
        datasets = s.scalar(select(func.coalesce(func.sum(Dataset.size), 0)).where(Dataset.tenant == tenant))
        artifacts = s.scalar(
            select(func.coalesce(func.sum(Artifact.size), 0))
            .join(Job, Job.id == Artifact.job_id)
            .where(Job.tenant == tenant)
        )
    return int(models or 0) + int(datasets or 0) + int(artifacts or 0)


def exceeded(settings: Settings, used: int, adding: int = 0) -> ProblemError:
    return ProblemError(
        403,
        f"storage quota of {settings.tenant_quota_bytes} bytes exceeded: {used} bytes in use"
        + (f", {adding} more asked for" if adding else "")
        + "; delete jobs, models or datasets you no longer need",
        kind="quota-exceeded",
    )


def room(sessions: sessionmaker, settings: Settings, tenant: str, adding: int = 0) -> int | None:
    """Bytes the tenant may still store (None: no quota); raises 403 when ``adding`` more would not fit."""
    if not settings.tenant_quota_bytes:
        return None
    used = usage(sessions, tenant)
    left = settings.tenant_quota_bytes - used
    if left <= 0 or adding > left:
        raise exceeded(settings, used, adding)
    return left


async def store_upload(
    chunks: AsyncIterator[bytes],
    sessions: sessionmaker,
    settings: Settings,
    tenant: str,
    declared: int | None,
    suffix: str,
) -> Blob:
    """Store an upload within the upload cap (413) and what the tenant's quota leaves (403), the declared
    size checked before a byte is stored."""
    left = await anyio.to_thread.run_sync(room, sessions, settings, tenant, declared or 0)
    used = settings.tenant_quota_bytes - left if left is not None else 0
    return await store_stream(
        chunks,
        blobs=settings.blobs_dir,
        tmp=settings.tmp_dir,
        limit=settings.max_upload_bytes,
        suffix=suffix,
        room=left,
        over_room=lambda size: exceeded(settings, used, size),
    )
