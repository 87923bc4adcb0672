"""Content-addressed blob store on local disk, fed by streamed uploads.

Bytes are counted and hashed while they arrive, written to ``tmp/<uuid>.part`` on the same
filesystem, fsynced, then ``os.replace``d to ``blobs/<sha256><suffix>``: a reader never
sees a partial blob, identical uploads share one file, and memory stays flat whatever
the size. Exceeding the cap aborts the upload with 413 and removes the part file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from app.problems import ProblemError

DATASET_SUFFIXES = (".npz", ".tar.gz", ".tgz", ".tar", ".zip")


@dataclass(frozen=True)
class Blob:
    path: Path
    sha256: str
    size: int


def too_large(limit: int) -> ProblemError:
    return ProblemError(413, f"upload exceeds the limit of {limit} bytes", kind="upload-too-large")


UPLOAD_CHUNK = 1024 * 1024


async def upload_chunks(file: object) -> AsyncIterator[bytes]:
    """A multipart ``UploadFile`` as 1 MiB chunks, so ``store_stream`` treats both upload paths alike."""
    while chunk := await file.read(UPLOAD_CHUNK):  # type: ignore[attr-defined]
        yield chunk


async def store_stream(chunks: AsyncIterator[bytes], *, blobs: Path, tmp: Path, limit: int, suffix: str) -> Blob:
    """Write the stream into the store; raises 413 as soon as it passes ``limit`` bytes."""
    part = tmp / f"{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    size = 0
    f = await anyio.to_thread.run_sync(open, part, "wb")
    try:
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                h.update(chunk)
                await anyio.to_thread.run_sync(f.write, chunk)
            await anyio.to_thread.run_sync(f.flush)
            await anyio.to_thread.run_sync(os.fsync, f.fileno())
        finally:
            f.close()
        target = blobs / f"{h.hexdigest()}{suffix}"
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise
    return Blob(target, h.hexdigest(), size)


def dataset_suffix(filename: str) -> str | None:
    """The archive type the engine will read, from the client's file name (None: unsupported)."""
    lower = filename.lower()
    return next((s for s in DATASET_SUFFIXES if lower.endswith(s)), None)
