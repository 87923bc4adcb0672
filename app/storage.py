"""Content-addressed blob store on local disk, fed by streamed uploads.

Bytes are counted and hashed while they arrive, written to ``tmp/<uuid>.part`` on the same
filesystem, fsynced, then ``os.replace``d to ``blobs/<sha256><suffix>``: a reader never
sees a partial blob, identical uploads share one file, and memory stays flat whatever
the size. Exceeding the cap aborts the upload with 413 and removes the part file.

:func:`storage_for` gives the :class:`Storage` that shares those blobs and the jobs' artifacts
between hosts: the folder itself (:class:`LocalStorage`, the default) or an S3-compatible bucket
(:class:`S3Storage`, ``CLIPGUARD_STORAGE_URL=s3://bucket/prefix``) when workers run on hosts
without a common filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import anyio.to_thread
from clipguard.app.problems import ProblemError, problem_response
from clipguard.app.settings import Settings
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

DATASET_SUFFIXES = (".npz", ".tar.gz", ".tgz", ".tar", ".zip")


class StorageError(RuntimeError):
    """The object store refused a request for good (a missing object, a denied bucket): retrying won't help."""


class StorageUnavailable(StorageError):
    """The object store could not be reached, timed out, throttled or answered 5xx: retry later.

    The worker hands such a job back to the queue (Celery retries it with backoff, the attempt
    counts); the API answers 503 with ``Retry-After``.
    """


def install(app: FastAPI) -> None:
    """Answer object-storage failures as problem+json: 503 with Retry-After when transient, else 502."""

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, StorageUnavailable):
            return problem_response(request, 503, str(exc), kind="storage-unavailable", headers={"Retry-After": "30"})
        return problem_response(request, 502, str(exc), kind="storage-error")


TRANSIENT_S3_CODES = frozenset({"SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable", "InternalError"})


@contextlib.contextmanager
def s3_errors(what: str) -> Iterator[None]:
    """Turn boto3's exceptions into :class:`StorageUnavailable` or :class:`StorageError`, saying ``what`` failed."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

    try:
        yield
    except (ClientError, S3UploadFailedError, BotoCoreError) as exc:
        cause = (exc.__cause__ or exc.__context__) if isinstance(exc, S3UploadFailedError) else exc
        if isinstance(cause, (NoCredentialsError, ParamValidationError)):  # configuration: no retry will fix it
            raise StorageError(f"object storage refused {what}: {cause}") from exc
        if isinstance(cause, ClientError):
            code = str(cause.response.get("Error", {}).get("Code", ""))
            status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status < 500 and code not in TRANSIENT_S3_CODES:
                raise StorageError(f"object storage refused {what}: {code or status}") from exc
        raise StorageUnavailable(f"object storage unavailable while {what}: {type(cause).__name__}: {cause}") from exc


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


async def store_stream(
    chunks: AsyncIterator[bytes],
    *,
    blobs: Path,
    tmp: Path,
    limit: int,
    suffix: str,
    room: int | None = None,
    over_room: Callable[[int], Exception] | None = None,
) -> Blob:
    """Write the stream into the store; raises 413 as soon as it passes ``limit`` bytes, and
    ``over_room(size)`` as soon as it passes ``room`` (what the tenant's quota leaves)."""
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
                if room is not None and size > room and over_room is not None:
                    raise over_room(size)
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


# --- sharing blobs and artifacts between hosts ------------------------------------------------------


class Storage(Protocol):
    """Where the files every host needs live: uploaded blobs (API -> workers) and job artifacts (workers -> API).

    Every host keeps its working copies under its own ``CLIPGUARD_HOME``; the storage is what they
    share. Locations are strings kept in the job store (``Artifact.path``): a local path for
    :class:`LocalStorage`, ``s3://bucket/key`` for :class:`S3Storage`.
    """

    def put_blob(self, path: Path) -> None:
        """Share a blob the API just stored under ``<home>/blobs`` (an upload, a canonical checkpoint)."""

    def get_blob(self, path: Path) -> Path:
        """A local copy of the blob named like ``path`` (``<sha256><suffix>``), fetched if this host lacks it."""

    def put_artifact(self, path: Path, key: str) -> str:
        """Share a job's output file under ``key`` (``jobs/<id>/attempt-<n>/<name>``); returns its location."""

    def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        """A URL the client can fetch the artifact from directly, or None: the API streams the local file."""

    def delete_blob(self, name: str) -> None:
        """Remove the shared copy of blob ``name`` (the local file is the caller's to remove)."""

    def delete_artifact(self, location: str) -> None:
        """Remove an artifact ``put_artifact`` stored (a local file is removed with its job folder)."""


@dataclass(frozen=True)
class LocalStorage:
    """The default: one folder (``CLIPGUARD_HOME``) that every process mounts, so sharing is a no-op."""

    home: Path

    def put_blob(self, path: Path) -> None:
        return None

    def get_blob(self, path: Path) -> Path:
        return path

    def put_artifact(self, path: Path, key: str) -> str:
        return str(path)

    def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        return None

    def delete_blob(self, name: str) -> None:
        return None

    def delete_artifact(self, location: str) -> None:
        return None


class S3Storage:
    """An S3-compatible bucket (AWS S3, SeaweedFS, Garage, Ceph RGW, ...) through boto3.

    Hosts share nothing but the bucket: the API uploads blobs after storing them locally, a worker
    downloads the blobs of its job into its own ``<home>/blobs`` (content-addressed, so a present
    file is the right file) and uploads its artifacts; artifact downloads are answered with a 302
    to a presigned URL, so the bytes go from the object store to the client without passing the API.
    boto3 uploads and downloads large files in parts and retries; the bucket is created on first use.
    """

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        url = urlsplit(settings.storage_url)
        if url.scheme != "s3" or not url.netloc:
            raise ValueError(f"CLIPGUARD_STORAGE_URL must look like s3://bucket/prefix, got {settings.storage_url!r}")
        self.bucket, self.prefix = url.netloc, url.path.strip("/")
        self.blobs_dir, self.tmp_dir = settings.blobs_dir, settings.tmp_dir
        self.expiry_s = settings.presign_expiry_s
        secret = settings.s3_secret_access_key.get_secret_value()
        credentials = (
            {"aws_access_key_id": settings.s3_access_key_id, "aws_secret_access_key": secret}
            if settings.s3_access_key_id
            else {}
        )
        # Path-style addressing: self-hosted servers are rarely set up for bucket.host virtual hosting.
        config = Config(
            signature_version="s3v4",
            retries={"mode": "standard"},
            s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        )
        session = boto3.session.Session(region_name=settings.s3_region, **credentials)
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None, config=config)
        public = settings.s3_public_url or settings.s3_endpoint_url
        # Presigning is local computation; the URL must name the endpoint the *client* reaches.
        self.presigner = (
            session.client("s3", endpoint_url=public or None, config=config)
            if public != settings.s3_endpoint_url
            else self.client
        )
        self._bucket_ready = False

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        if self._bucket_ready:
            return
        with s3_errors(f"opening bucket {self.bucket}"):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
                    self.client.create_bucket(Bucket=self.bucket)
        self._bucket_ready = True

    def put_blob(self, path: Path) -> None:
        self.ensure_bucket()
        with s3_errors(f"uploading blob {path.name}"):
            self.client.upload_file(str(path), self.bucket, self._key(f"blobs/{path.name}"))

    def get_blob(self, path: Path) -> Path:
        local = self.blobs_dir / path.name
        if local.exists():
            return local
        part = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with s3_errors(f"fetching blob {path.name}"):
                self.client.download_file(self.bucket, self._key(f"blobs/{path.name}"), str(part))
            os.replace(part, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
        return local

    def put_artifact(self, path: Path, key: str) -> str:
        self.ensure_bucket()
        with s3_errors(f"uploading artifact {key}"):
            self.client.upload_file(str(path), self.bucket, self._key(key))
        return self.location(key)

    def download_url(self, location: str, filename: str, media_type: str) -> str | None:
        url = urlsplit(location)
        if url.scheme != "s3":
            return None  # written before the switch to S3: still a local file
        return self.presigner.generate_presigned_url(
            "get_object",
            ExpiresIn=self.expiry_s,
            Params={
                "Bucket": url.netloc,
                "Key": url.path.lstrip("/"),
                "ResponseContentType": media_type,
                "ResponseContentDisposition": f'attachment; filename="{filename}"',
            },
        )

    def delete_blob(self, name: str) -> None:
        with s3_errors(f"deleting blob {name}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(f"blobs/{name}"))

    def delete_artifact(self, location: str) -> None:
        url = urlsplit(location)
        if url.scheme == "s3":
            with s3_errors(f"deleting {location}"):
                self.client.delete_object(Bucket=url.netloc, Key=url.path.lstrip("/"))


_storages: dict[tuple, Storage] = {}
_storages_lock = threading.Lock()


def storage_for(settings: Settings) -> Storage:
    """The storage ``settings`` name, built once per process (a boto3 client is thread-safe and slow to make)."""
    if not settings.storage_url:
        return LocalStorage(settings.home)
    key = (
        settings.storage_url,
        settings.s3_endpoint_url,
        settings.s3_public_url,
        settings.s3_access_key_id,
        settings.home,
    )
    with _storages_lock:
        if key not in _storages:
            _storages[key] = S3Storage(settings)
        return _storages[key]


def local_data_ref(storage: Storage, ref: str, kind: str) -> str:
    """The engine's data reference on this host: an uploaded dataset (``kind == "upload"``, a blob) is
    fetched first. Paths under data roots and registered datasets must be mounted on every host."""
    if kind != "upload":
        return ref
    path, sep, split = ref.partition("#")
    return f"{storage.get_blob(Path(path))}{sep}{split}"
