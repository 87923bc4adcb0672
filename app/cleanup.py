"""Giving disk back: blobs nothing uses any more, uploads past their retention, deleted jobs' files.

Blobs are content-addressed and shared (two tenants uploading the same bytes share one file),
so a blob is removed by the sweeper once no row of the job store names it, never by the
``DELETE`` that dropped a row: another row may still name it, or an upload of the same bytes may
be between storing the file and inserting its row. A blob is therefore only collected once it is
also older than ``staging_max_age_s``, far longer than an upload takes to be recorded.

Checkpoint uploads (``<sha256>.upload``) are needed only until quarantine has decided; after
that they are kept ``upload_retention_s`` (for an operator to look at a rejected one) and then go.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from clipguard.app.db import Dataset, Model
from clipguard.app.settings import Settings
from clipguard.app.storage import StorageError, storage_for
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

log = logging.getLogger("clipguard.api")


def _in_use(sessions: sessionmaker) -> tuple[set[str], set[str]]:
    """Blob file names some row needs, and checkpoint uploads still waiting for quarantine."""
    with sessions() as s:
        canonical = {f"{sha}.safetensors" for sha in s.scalars(select(Model.canonical_sha256)) if sha}
        waiting = {
            f"{sha}.upload" for sha in s.scalars(select(Model.upload_sha256).where(Model.status == "validating")) if sha
        }
        data = {
            Path(ref.partition("#")[0]).name for ref in s.scalars(select(Dataset.ref).where(Dataset.kind == "upload"))
        }
    return canonical | data | waiting, waiting


def collect_blobs(sessions: sessionmaker, settings: Settings, now: float | None = None) -> list[str]:
    """Delete blobs no row needs (older than ``staging_max_age_s``) and decided uploads older than
    ``upload_retention_s``; returns the names removed. Run by the API's sweeper."""
    now = time.time() if now is None else now
    used, waiting = _in_use(sessions)
    shared = storage_for(settings)
    removed = []
    for path in settings.blobs_dir.iterdir():
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        upload = path.name.endswith(".upload")
        if path.name in waiting or (path.name in used and not upload):
            continue
        if age < (settings.upload_retention_s if upload else settings.staging_max_age_s):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        removed.append(path.name)
        if not upload:  # uploads of checkpoints are never shared; datasets and canonical weights are
            try:
                shared.delete_blob(path.name)
            except StorageError as exc:
                log.warning("could not delete blob %s from object storage: %s", path.name, exc)
    if removed:
        log.info("removed %d unused blob(s) from %s", len(removed), settings.blobs_dir)
    return removed


def remove_job_files(settings: Settings, job_id: str, locations: list[str]) -> None:
    """A deleted job's artifacts: its folder on this host, and its objects in the object store."""
    shared = storage_for(settings)
    for location in locations:
        try:
            shared.delete_artifact(location)
        except StorageError as exc:
            log.warning("could not delete %s: %s", location, exc)
    shutil.rmtree(settings.jobs_dir / job_id, ignore_errors=True)
