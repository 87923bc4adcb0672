"""Writing files so that readers never see half of one, and hashing them.

Every file the engine publishes (weights, bounds, reports, attack records, dataset caches) goes
through :func:`atomic_path`: it is written under a temporary name beside its target (same file
system, so the rename is atomic), made durable, then renamed over the target. A reader sees the
old file or the new one; a crash or an exception leaves the old one and no stray temporary.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an exception, rename it over ``path``.

    The caller writes the temporary path (any writer that takes a file name). ``durable`` fsyncs it
    first, so the rename never becomes visible before the bytes it names; a cache that is cheap to
    rebuild may skip that. On an exception the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Mode ``x`` creates the temporary file with the usual umask permissions rather than ``mkstemp``'s 0600.
    """
    with atomic_path(path) as tmp, open(tmp, "x", encoding="utf-8") as fh:
        fh.write(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
