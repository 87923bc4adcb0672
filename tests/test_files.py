"""clipguard.files: the one atomic writer and the file hash."""

from __future__ import annotations

import hashlib

import pytest

from clipguard.files import atomic_path, file_sha256, write_text


def test_atomic_path_replaces_the_target_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_path_leaves_the_old_file_and_no_temporary_on_error(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target, durable=False) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_text_and_file_sha256(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert file_sha256(target) == hashlib.sha256(b"{}\n").hexdigest()
