"""Data references: every supported layout decodes to the same tensors; hostile input is refused."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.data import Limits, iter_batches, load_data, normalize
from clipguard.errors import DataError

CLASSES = ("cat", "dog", "frog")


def _images(n: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % len(CLASSES)


def _write_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")  # lossless, so pixels can be compared exactly


def _expected(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # ImageFolder order: by class folder, then file name.
    order = sorted(range(len(y)), key=lambda i: (CLASSES[y[i]], i))
    return torch.from_numpy(x[order].transpose(0, 3, 1, 2)), torch.from_numpy(y[order].astype(np.int64))


def test_image_folder_directory(tmp_path):
    x, y = _images()
    _write_folder(tmp_path / "train", x, y)
    data = load_data(tmp_path / "train")
    want_x, want_y = _expected(x, y)
    assert data.classes == CLASSES
    assert torch.equal(data.images, want_x) and torch.equal(data.labels, want_y)


def test_splits_are_named_or_defaulted(tmp_path):
    x, y = _images()
    _write_folder(tmp_path / "ds" / "train", x, y)
    _write_folder(tmp_path / "ds" / "test", x[:3], y[:3])
    with pytest.raises(DataError, match="holds splits test, train; name one"):
        load_data(tmp_path / "ds")
    assert len(load_data(f"{tmp_path / 'ds'}#test")) == 3
    assert len(load_data(tmp_path / "ds", default_split="train")) == 9
    with pytest.raises(DataError, match="no split 'val'"):
        load_data(f"{tmp_path / 'ds'}#val")


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archives_decode_like_the_folder(tmp_path, kind):
    x, y = _images()
    _write_folder(tmp_path / "src" / "train", x, y)
    archive = tmp_path / f"data.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted((tmp_path / "src").rglob("*.png")):
                zf.write(p, p.relative_to(tmp_path / "src").as_posix())
    else:
        with tarfile.open(archive, "w:gz" if kind.endswith("gz") else "w") as tf:
            tf.add(tmp_path / "src" / "train", arcname="train")
    data = load_data(archive, default_split="train")
    want_x, want_y = _expected(x, y)
    assert torch.equal(data.images, want_x) and torch.equal(data.labels, want_y)


def test_npz_and_cache(tmp_path):
    x, y = _images(12)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cache = tmp_path / "cache"
    first = load_data(tmp_path / "d.npz", cache_dir=cache)
    assert torch.equal(first.images, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert len(list(cache.iterdir())) == 1
    second = load_data(tmp_path / "d.npz", cache_dir=cache)
    assert torch.equal(second.images, first.images) and second.sha256 == first.sha256
    # A changed file is a new cache key, never a stale hit.
    np.savez(tmp_path / "d.npz", x=x[:5], y=y[:5])
    assert len(load_data(tmp_path / "d.npz", cache_dir=cache)) == 5


def test_npz_with_objects_is_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, dtype=np.int64))
    with pytest.raises(DataError, match=r"unreadable \.npz"):
        load_data(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 3), dtype=np.float32), y=np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match="uint8"):
        load_data(tmp_path / "float.npz")


def test_cifar_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    full = rng.integers(0, 256, (6, 3 * 32 * 32), dtype=np.uint8)
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": full, b"labels": list(range(6))}, f)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": full[:2], b"labels": [3, 4]}, f)
    train = load_data(tmp_path)
    assert train.images.shape == (30, 3, 32, 32)
    assert torch.equal(train.images[:6], torch.from_numpy(full.reshape(6, 3, 32, 32)))
    assert load_data(f"{tmp_path}#test").labels.tolist() == [3, 4]


def test_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f)
    with pytest.raises(DataError, match="not allowed"):
        load_data(tmp_path)
    assert not marker.exists()


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(member, io.BytesIO(payload) if payload else None)
    return path


@pytest.mark.parametrize("name", ["../escape.png", "/abs/cat/x.png", "a/../../b/c.png"])
def test_archive_members_with_unsafe_paths_are_refused(tmp_path, name):
    info = tarfile.TarInfo(name)
    info.size = 3
    with pytest.raises(DataError, match="unsafe path"):
        load_data(_tar_with(tmp_path, info, b"abc"))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_archive_links_are_refused(tmp_path, kind):
    info = tarfile.TarInfo("cat/link.png")
    info.type = kind
    info.linkname = "/etc/passwd"
    with pytest.raises(DataError, match="link member"):
        load_data(_tar_with(tmp_path, info))


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cat/0.png", b"\0" * (2 << 20))
    with pytest.raises(DataError, match="larger than"):
        load_data(path, limits=Limits(max_member_bytes=1 << 20))
    with pytest.raises(DataError, match="more than"):
        load_data(path, limits=Limits(max_total_bytes=1 << 20))


def test_symlink_leaving_a_data_folder_is_refused(tmp_path):
    x, y = _images(3)
    _write_folder(tmp_path / "d", x, y)
    (tmp_path / "secret.png").write_bytes(b"x")
    (tmp_path / "d" / "cat" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(DataError, match="symlink"):
        load_data(tmp_path / "d")


def test_truncated_jpeg_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_images(1)[0][0]).resize((32, 32)).save(buf, format="JPEG")
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cat/broken\.jpg"):
        load_data(tmp_path)


def test_decompression_bomb_header_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("L", (3000, 3000)).save(tmp_path / "cat" / "huge.png")
    with pytest.raises(DataError, match=r"over the .* cap"):
        load_data(tmp_path, limits=Limits(max_image_pixels=1000 * 1000))


def test_mixed_sizes_need_an_image_size(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "cat" / "b.png")
    with pytest.raises(DataError, match=r"b\.png is 16x16"):
        load_data(tmp_path)
    assert load_data(tmp_path, image_size=(8, 8)).images.shape == (2, 3, 8, 8)


def test_missing_and_unsupported_references(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported"):
        load_data(tmp_path / "x.csv")


def test_normalisation_and_batches():
    x = torch.full((5, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(out[:, 0], torch.tensor(2.0)) and torch.allclose(out[:, 2], torch.tensor(0.5))


def test_real_cifar10_archive(cifar_test):
    assert len(cifar_test) == 10_000
    assert cifar_test.images.shape[1:] == (3, 32, 32)
    assert cifar_test.labels.bincount().tolist() == [1000] * 10
    assert cifar_test.classes[0] == "airplane"
    sizes = [len(b[0]) for b in iter_batches(cifar_test.subset(range(700)), 256, (0, 0, 0), (1, 1, 1))]
    assert sizes == [256, 256, 188]
