"""Training- and evaluation-data references, decoded once into a uint8 tensor.

A *reference* is what a user can point at: an ImageFolder directory, a CIFAR-10
python-batches directory, an ``.npz`` with ``x`` (uint8 NHWC) and ``y``, or a
``.tar``/``.tar.gz``/``.zip`` archive holding any of these. Append ``#split`` to pick a
sub-folder (``cifar10-jpg.tar.gz#train``).

Why uint8 and decoded once: the bounds pass, the λ sweep and the evaluation all walk the
same images several times, and attacks must stamp triggers on exactly the pixels the model
sees at train and test time. Holding ``(N, 3, H, W)`` uint8 keeps 50,000 CIFAR images in
150 MB, lets triggers work on integer pixels, and leaves normalisation to the moment a
batch is moved to the device.

Archives are read member by member into memory and never extracted to disk, so a hostile
archive cannot write anywhere; members with absolute or ``..`` paths, links, and archives
over the size or file-count caps are refused outright rather than skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from clipguard.errors import DataError, literal
from clipguard.files import atomic_path
from clipguard.files import file_sha256 as file_sha256  # where callers have always found it

if TYPE_CHECKING:
    from clipguard.streaming import StreamedImages

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
SAMPLE_SEED = 0x636C6970  # "clip"
"""Seed of clipguard's own random draws from a user's training data (the statistics sample,
λ selection's subsample, detection's screen). Not 0 or another small integer: a poisoner
typically draws its poisoned indices with one (``clipguard train`` draws them with
``torch.randperm(N)`` seeded by ``--seed``, default 0), and a draw with the same seed over the
same N starts with the same indices. With seed 0 on both sides, the 5,000-image statistics
sample of a 1%-poisoned CIFAR-10 held all 500 poisoned images, a 10% share that inflated σ."""
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class Limits:
    """Caps that keep a hostile or mistaken reference from exhausting the machine."""

    max_files: int = 300_000
    max_total_bytes: int = 4 << 30
    """Bytes read from a reference: an archive's members together, a folder's files, an ``.npz`` file."""
    max_member_bytes: int = 256 << 20
    max_image_pixels: int = 4096 * 4096
    max_decoded_bytes: int = 4 << 30
    """The decoded arrays together (images ``N x H x W x 3``, labels, class names), checked from the
    declared sizes (image headers, ``.npy`` headers) before anything of that size is allocated."""
    max_resident_bytes: int = 1 << 30
    """A folder reference whose images would decode to more than this is streamed (``clipguard.streaming``):
    read a batch at a time when a stage needs it, so memory is bounded by the batch, not by the data."""
    max_batch_bytes: int = 1 << 30
    """The most one read of streamed images may decode at once."""


@dataclass(frozen=True)
class ImageData:
    """Images and labels; ``images`` is uint8 ``(N, 3, H, W)`` on the CPU: a tensor, or for a large folder
    :class:`clipguard.streaming.StreamedImages`, which decodes what is indexed (``images[idx]``)."""

    images: torch.Tensor | StreamedImages
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError("labels must be int64 with one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def streamed(self) -> bool:
        return not isinstance(self.images, torch.Tensor)

    def whole(self, what: str) -> torch.Tensor:
        """All images as one tensor, for ``what`` (a step that needs them at once); streamed data refuses."""
        if isinstance(self.images, torch.Tensor):
            return self.images
        raise DataError(
            f"{self.source}: {what} needs all {len(self)} images in memory, and this reference is streamed "
            "(it decodes to more than the resident cap); use a smaller set"
        )

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageData:
        """A view on some samples; the hash records which ones so reports stay traceable."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        digest = hashlib.sha256(self.sha256.encode() + idx.numpy().tobytes()).hexdigest()
        images = self.images[idx] if isinstance(self.images, torch.Tensor) else self.images.take(idx)
        return ImageData(images, self.labels[idx], self.classes, f"{self.source}[subset {len(idx)}]", digest)

    def replace(self, images: torch.Tensor, labels: torch.Tensor, source: str) -> ImageData:
        """New data with the same class names (e.g. after poisoning)."""
        digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        return ImageData(images.contiguous(), labels.contiguous(), self.classes, source, digest)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` (any device) to the float input a model was trained on."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
    return (batch.float().div_(255.0) - m) / s


def iter_batches(
    data: ImageData,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
    indices: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised ``(inputs, labels)`` batches in order; normalisation happens on ``device``.

    Streamed images are decoded one batch ahead, in the background, while the caller computes on the
    current one: decoding then overlaps the model instead of adding to it."""
    order = torch.arange(len(data)) if indices is None else indices
    non_blocking = torch.device(device).type == "cuda"
    starts = range(0, len(order), batch_size)
    if isinstance(data.images, torch.Tensor):
        for start in starts:
            idx = order[start : start + batch_size]
            x = data.images[idx].to(device, non_blocking=non_blocking)
            y = data.labels[idx].to(device, non_blocking=non_blocking)
            yield normalize(x, mean, std), y
        return
    from concurrent.futures import ThreadPoolExecutor

    images = data.images
    with ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(images.__getitem__, order[0:batch_size]) if len(order) else None
        for start in starts:
            assert pending is not None
            x = pending.result()
            following = order[start + batch_size : start + 2 * batch_size]
            pending = ahead.submit(images.__getitem__, following) if len(following) else None
            y = data.labels[order[start : start + batch_size]]
            yield normalize(x.to(device, non_blocking=non_blocking), mean, std), y.to(device, non_blocking=non_blocking)


# --------------------------------------------------------------------------- references


def save_npz(data: ImageData, path: str | os.PathLike) -> Path:
    """Write ``data`` as an ``.npz`` reference (``x`` uint8 NHWC, ``y``, ``classes``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez adds no ".npz" to it
        np.savez(
            fh,
            x=data.whole("saving as .npz").permute(0, 2, 3, 1).numpy(),
            y=data.labels.numpy(),
            classes=np.array(data.classes),
        )
    return path


def default_cache_dir() -> Path:
    """``$CLIPGUARD_CACHE`` or ``~/.cache/clipguard``: decoded datasets, keyed by content hash."""
    return Path(os.environ.get("CLIPGUARD_CACHE", Path.home() / ".cache" / "clipguard")) / "data"


def split_reference(ref: str | os.PathLike) -> tuple[Path, str | None]:
    """``"data.tar.gz#train"`` -> (path, "train"); a plain path has no split."""
    text = os.fspath(ref)
    if "#" in text:
        path, split = text.rsplit("#", 1)
        return Path(path).expanduser(), (split.strip("/") or None)
    return Path(text).expanduser(), None


def load_data(
    ref: str | os.PathLike,
    *,
    split: str | None = None,
    default_split: str | None = None,
    image_size: tuple[int, int] | None = None,
    max_image_size: tuple[int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_max_bytes: int | None = None,
    limits: Limits = Limits(),
    progress: Callable[[float], None] | None = None,
    stream: bool | None = None,
) -> ImageData:
    """Decode a data reference into :class:`ImageData`, using a tensor cache when given one.

    The cache key is the content hash of the reference (file bytes for archives and
    ``.npz``; relative paths, sizes and mtimes for directories) plus split and image size,
    so a changed dataset is never served stale. ``default_split`` is used when the
    reference holds splits (``train/``, ``test/``) and none was named: training data
    defaults to ``train``, evaluation data to ``test``.

    ``image_size`` resizes every image to ``(H, W)``. ``max_image_size`` refuses images larger
    than ``(H, W)`` in either side (a model's input size: nothing bigger is worth decoding, and a
    forward pass over it could need any amount of memory), from their declared sizes, before they
    are decoded. Only regular files and folders are read: a FIFO or a device would block the
    reader or never end. ``cache_max_bytes`` bounds the cache folder (least recently used entries
    go first, see :func:`trim_cache`). ``progress(fraction)`` is called as files are read and decoded.

    ``stream``: True reads a folder's images when they are used (:mod:`clipguard.streaming`), never whole;
    None does so when they would decode to more than ``limits.max_resident_bytes``; False never. Streamed
    data is not cached.
    """
    path, ref_split = split_reference(ref)
    split = split or ref_split
    if not path.exists():
        raise DataError(f"data reference not found: {path}")
    if not (path.is_dir() or path.is_file()):
        raise DataError(f"data reference {path} is not a regular file or a folder")
    digest = _reference_digest(path, split or default_split, image_size)
    cache_file = Path(cache_dir) / f"{digest}.pt" if cache_dir is not None else None
    # A cached decode is served before the folder is listed again to decide on streaming, unless it is larger
    # than the resident cap allows now (the file's size stands for the decoded size it holds).
    cached = cache_file is not None and cache_file.exists() and stream is not True
    if cached and stream is None and cache_file.stat().st_size > limits.max_resident_bytes:  # type: ignore[union-attr]
        cached = False
    if not cached and stream is not False:
        streamed = _streamed(path, split, default_split, image_size, max_image_size, limits, digest, stream)
        if streamed is not None:
            return streamed
    if cached and cache_file is not None:
        try:
            blob = torch.load(cache_file, weights_only=True)
            data = ImageData(blob["images"], blob["labels"], tuple(json.loads(blob["classes"])), str(path), digest)
            os.utime(cache_file)  # recently used: trimmed last
            return data
        except Exception:  # a torn cache entry is rebuilt, never trusted
            cache_file.unlink(missing_ok=True)
    tree = _open_tree(path, limits)
    if split is None and default_split is not None and _holds_split(tree, default_split):
        split = default_split
    sizes = _Sizes(image_size, max_image_size, limits, progress or (lambda _f: None))
    images, labels, classes = _decode_tree(tree, split, sizes, label=str(path))
    data = ImageData(images, labels, tuple(classes), str(path) + (f"#{split}" if split else ""), digest)
    if cache_file is not None and (cache_max_bytes is None or images.numel() < cache_max_bytes):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file, durable=False) as tmp:  # a cache: a lost one is decoded again
            torch.save({"images": images, "labels": labels, "classes": json.dumps(list(classes))}, tmp)
        if cache_max_bytes is not None:
            trim_cache(cache_file.parent, cache_max_bytes)
    return data


def _streamed(
    path: Path,
    split: str | None,
    default_split: str | None,
    image_size: tuple[int, int] | None,
    max_image_size: tuple[int, int] | None,
    limits: Limits,
    digest: str,
    stream: bool | None,
) -> ImageData | None:
    """The folder at ``path`` as streamed data, or None where it is to be decoded whole (``stream`` None
    and it fits ``limits.max_resident_bytes``). Only a folder of class folders streams."""
    from clipguard.streaming import StreamedImages

    if not path.is_dir():
        if stream:
            raise DataError(f"{path.name}: only a folder of images can be streamed, not an archive or .npz")
        return None
    tree = _open_tree(path, limits, whole=False)
    if split is None and default_split is not None and _holds_split(tree, default_split):
        split = default_split
    label = str(path) + (f"#{split}" if split else "")
    tree, names = _locate(tree, split, label)
    if any("/" not in n and (n.endswith(".npz") or n in (CIFAR_TEST_BATCH, *CIFAR_TRAIN_BATCHES)) for n in names):
        if stream:
            raise DataError(f"{label}: only a folder of class folders of images can be streamed")
        return None
    files, labels, classes = image_folder_files(names, label)
    sizes = _Sizes(image_size, max_image_size, limits, lambda _f: None)
    first = decode_image(tree.read(files[0]), files[0], sizes, image_size, label)
    size = (int(first.shape[0]), int(first.shape[1]))
    if stream is None and len(files) * 3 * size[0] * size[1] <= limits.max_resident_bytes:
        return None
    paths = [Path(tree.files[n]) for n in files]  # type: ignore[arg-type]  # a folder's tree maps names to paths
    images = StreamedImages(paths, size, sizes=sizes, label=label)
    return ImageData(images, torch.from_numpy(labels), tuple(classes), label, digest)


def trim_cache(cache_dir: str | os.PathLike, max_bytes: int) -> int:
    """Delete decoded-data cache entries, least recently used first, until the folder holds at most
    ``max_bytes``; returns the bytes freed. Entries are rebuilt from their reference when needed
    again, so any of them may go; a concurrent reader either has its file open or rebuilds it."""
    entries = []
    for p in Path(cache_dir).glob("*.pt"):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total, freed = sum(size for _, size, _ in entries), 0
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total - freed <= max_bytes:
            break
        p.unlink(missing_ok=True)
        freed += size
    return freed


@dataclass(frozen=True)
class _Sizes:
    """What the decoders may allocate: the resize target, the largest image, the caps, and who hears of progress."""

    resize: tuple[int, int] | None
    largest: tuple[int, int] | None
    limits: Limits
    progress: Callable[[float], None]

    def check_image(self, h: int, w: int, label: str, what: str) -> None:
        """Refuse an image by its declared size, before it is decoded."""
        if h * w > self.limits.max_image_pixels:
            raise DataError(f"{label}: {what} declares {w}x{h} pixels, over the {self.limits.max_image_pixels} cap")
        if self.resize is None and self.largest is not None and (h > self.largest[0] or w > self.largest[1]):
            raise DataError(
                literal(
                    f"{label}: {what} is {h}x{w}, larger than the model's {self.largest[0]}x"
                    f"{self.largest[1]} input; resize the data first, or ask for resizing"
                )
                + " ({resize})",
                options=True,
            )

    def check_resized(self, count: int, label: str) -> None:
        """``count`` images scaled to the resize target must fit the cap too (a target may be larger)."""
        if self.resize is not None:
            h, w = self.resize
            self.check_decoded(count * 3 * h * w, label, f"{count} images resized to {h}x{w}")

    def check_decoded(self, nbytes: int, label: str, what: str) -> None:
        if nbytes > self.limits.max_decoded_bytes:
            raise DataError(
                f"{label}: {what} would decode to {nbytes} bytes, over the cap of {self.limits.max_decoded_bytes} bytes"
            )


def open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """``open(path, "rb")`` for a regular file only; anything else (a FIFO, a device, a socket) is a DataError.

    Opened without blocking and checked on the open descriptor, so a file swapped for a FIFO after a
    check cannot block the reader: opening a FIFO for reading waits for a writer, and reading a
    device like ``/dev/zero`` never ends.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_regular(path: Path, limit: int, label: str) -> bytes:
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise DataError(f"{label}: {path.name} is larger than {limit} bytes")
        data = f.read(size + 1)  # what it holds, not the limit: read(n) reserves n bytes first
    if len(data) > size:
        raise DataError(f"{label}: {path.name} grew while it was read")
    return data


def _reference_digest(path: Path, split: str | None, image_size: tuple[int, int] | None) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        with open_regular(path) as f:
            h = hashlib.file_digest(f, "sha256")
    h.update(f"split={split};size={image_size}".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- a tree of files


class _Tree:
    """Relative POSIX path -> bytes loader, over a directory or an archive's members."""

    def __init__(self, files: dict[str, object], reader) -> None:
        self.files = files
        self._reader = reader

    def read(self, name: str) -> bytes:
        return self._reader(self.files[name])

    def names(self) -> list[str]:
        return sorted(self.files)


def _safe_member_name(name: str, archive: Path) -> str:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise DataError(f"{archive.name}: refusing archive member with an unsafe path: {name!r}")
    return str(pure).lstrip("./") if str(pure) != "." else ""


def _open_tree(path: Path, limits: Limits, *, whole: bool = True) -> _Tree:
    """``whole``: the tree will be read whole, so its bytes together are capped; a streamed folder is read
    a batch at a time and only its file count and each file's size are."""
    name = path.name.lower()
    if path.is_dir():
        root = path.resolve()
        files: dict[str, object] = {}
        total = 0
        for p in path.rglob("*"):
            if p.is_symlink():
                if not p.resolve().is_relative_to(root):
                    raise DataError(f"refusing symlink that leaves the data folder: {p}")
            if p.is_file():
                files[p.relative_to(path).as_posix()] = p
                if len(files) > limits.max_files:
                    raise DataError(f"{path}: more than {limits.max_files} files")
                total += p.stat().st_size
                if whole and total > limits.max_total_bytes:
                    raise DataError(f"{path}: holds more than {limits.max_total_bytes} bytes")
        return _Tree(files, lambda p: _read_regular(Path(p), limits.max_member_bytes, str(path)))
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _tar_tree(path, limits)
    if name.endswith(".zip"):
        return _zip_tree(path, limits)
    if name.endswith(".npz"):
        return _Tree({path.name: path}, lambda p: _read_regular(Path(p), limits.max_total_bytes, str(path)))
    raise DataError(f"unsupported data reference {path}: expected a folder, .npz, .tar, .tar.gz or .zip")


def _tar_tree(path: Path, limits: Limits) -> _Tree:
    blobs: dict[str, object] = {}
    total = 0
    try:
        with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if member.issym() or member.islnk():
                    raise DataError(f"{path.name}: refusing link member {member.name!r}")
                if not member.isfile():
                    raise DataError(f"{path.name}: refusing special member {member.name!r}")
                rel = _safe_member_name(member.name, path)
                if member.size > limits.max_member_bytes:
                    raise DataError(f"{path.name}: member {rel!r} is larger than {limits.max_member_bytes} bytes")
                total += member.size
                if total > limits.max_total_bytes:
                    raise DataError(f"{path.name}: unpacks to more than {limits.max_total_bytes} bytes")
                if len(blobs) >= limits.max_files:
                    raise DataError(f"{path.name}: holds more than {limits.max_files} files")
                member_file = tar.extractfile(member)
                blobs[rel] = member_file.read() if member_file is not None else b""
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path.name}: unreadable tar archive ({exc})") from exc
    return _Tree(blobs, lambda b: b)


def _zip_tree(path: Path, limits: Limits) -> _Tree:
    try:
        zf = zipfile.ZipFile(open_regular(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path.name}: unreadable zip archive ({exc})") from exc
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > limits.max_files:
        raise DataError(f"{path.name}: holds more than {limits.max_files} files")
    total = 0
    names: dict[str, object] = {}
    for info in infos:
        rel = _safe_member_name(info.filename, path)
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"{path.name}: refusing symlink member {info.filename!r}")
        if info.file_size > limits.max_member_bytes:
            raise DataError(f"{path.name}: member {rel!r} is larger than {limits.max_member_bytes} bytes")
        total += info.file_size
        if total > limits.max_total_bytes:
            raise DataError(f"{path.name}: unpacks to more than {limits.max_total_bytes} bytes")
        names[rel] = info

    def read(info: zipfile.ZipInfo) -> bytes:
        # Read at most the declared size + 1 so a lying header (zip bomb) is caught, not inflated.
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
        if len(data) > info.file_size:
            raise DataError(f"{path.name}: member {info.filename!r} inflates past its declared size")
        return data

    return _Tree(names, read)


# --------------------------------------------------------------------------- decoding


def _holds_split(tree: _Tree, split: str) -> bool:
    """True when ``split/`` is a top-level folder of splits rather than a class folder."""
    names = tree.names()
    prefix = split + "/"
    return any(n.startswith(prefix) for n in names) and all(n.count("/") >= 2 for n in names if "/" in n)


def _locate(tree: _Tree, split: str | None, label: str) -> tuple[_Tree, list[str]]:
    """The part of ``tree`` that holds the data: the split's folder, without a folder that only wraps it."""
    names = tree.names()
    top_files = {n for n in names if "/" not in n}
    is_cifar = CIFAR_TEST_BATCH in top_files or any(b in top_files for b in CIFAR_TRAIN_BATCHES)
    if split and not is_cifar:  # CIFAR batches pick their split by file name, below
        prefix = split.rstrip("/") + "/"
        names = [n for n in names if n.startswith(prefix)]
        if not names:
            raise DataError(f"{label}: no split {split!r} in it")
        tree = _Tree({n[len(prefix) :]: tree.files[n] for n in names}, tree._reader)
        names = tree.names()
    # Strip a single common top-level folder that wraps the content (``cifar-10-batches-py/``,
    # ``mydata/<class>/...``), but not a lone class folder of a one-class ImageFolder.
    while names and all("/" in n for n in names) and len({n.split("/", 1)[0] for n in names}) == 1:
        top = names[0].split("/", 1)[0] + "/"
        inner = [n[len(top) :] for n in names]
        wraps = all("/" in n for n in inner) or any(
            n in (CIFAR_TEST_BATCH, *CIFAR_TRAIN_BATCHES) or n.endswith(".npz") for n in inner
        )
        if not wraps:
            break
        tree = _Tree({n[len(top) :]: tree.files[n] for n in names}, tree._reader)
        names = tree.names()
    if not names:
        raise DataError(f"{label}: no files found")
    return tree, names


def _decode_tree(
    tree: _Tree, split: str | None, sizes: _Sizes, label: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    tree, names = _locate(tree, split, label)
    npz = [n for n in names if n.endswith(".npz") and "/" not in n]
    if len(names) == 1 and npz:
        return _decode_npz(tree.read(npz[0]), f"{label}:{npz[0]}" if npz[0] not in label else label, sizes)
    base = {n for n in names if "/" not in n}
    if CIFAR_TEST_BATCH in base or any(b in base for b in CIFAR_TRAIN_BATCHES):
        sizes.check_image(32, 32, label, "a CIFAR batch")
        images, labels, classes = _decode_cifar_batches(tree, base, split, label)
        sizes.check_resized(len(images), label)
        return _resized(images, sizes.resize), labels, classes
    return _decode_image_folder(tree, names, sizes, label)


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
NPY_MAX_HEADER = 10_000
"""numpy's own default: a longer ``.npy`` header is refused before it is parsed."""


def _npz_headers(blob: bytes, label: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's shape and dtype from its ``.npy`` header, reading nothing else of it."""
    headers = {}
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue  # np.load reads only .npy members as arrays, and only those asked for
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = _NPY_HEADER_READERS.get(version)
                    if read is None:
                        raise ValueError(f"{info.filename}: .npy format version {version} is not supported")
                    shape, _, dtype = read(f, max_header_size=NPY_MAX_HEADER)
                headers[info.filename.removesuffix(".npy")] = (tuple(int(d) for d in shape), dtype)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{label}: unreadable .npz ({exc})"[:300]) from exc
    return headers


def _decode_npz(blob: bytes, label: str, sizes: _Sizes) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    headers = _npz_headers(blob, label)
    declared = sum(math.prod(shape) * max(dtype.itemsize, 1) for shape, dtype in headers.values())
    sizes.check_decoded(declared, label, "its arrays")
    x_shape = headers.get("x", ((),))[0]
    if len(x_shape) == 4:
        sizes.check_image(x_shape[1], x_shape[2], label, f"'x' of shape {x_shape}")
        sizes.check_decoded(3 * math.prod(x_shape[:3]), label, f"'x' of shape {x_shape} as RGB")
        sizes.check_resized(x_shape[0], label)
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{label}: an .npz needs arrays 'x' (uint8 NHWC) and 'y'; found {sorted(z.files)}")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z else None
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{label}: unreadable .npz ({exc})") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{label}: 'x' must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{label}: 'y' must be integer labels, one per image")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n_classes = int(y.max()) + 1 if len(y) else 0
    if y.min(initial=0) < 0:
        raise DataError(f"{label}: negative labels")
    classes = classes or [str(i) for i in range(n_classes)]
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return _resized(images, sizes.resize), torch.from_numpy(y.astype(np.int64)), classes


def _resized(images: torch.Tensor, size: tuple[int, int] | None, chunk: int = 1024) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` scaled to ``size`` (bilinear, antialiased), a chunk at a time; as is when it fits."""
    if size is None or tuple(images.shape[2:]) == tuple(size):
        return images
    import torch.nn.functional as F

    out = torch.empty((images.shape[0], 3, *size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        out[start : start + chunk] = (
            F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
            .round_()
            .clamp_(0, 255)
            .to(torch.uint8)
        )
    return out


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python batches are pickles; only numpy array reconstruction is allowed."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _decode_cifar_batches(
    tree: _Tree, base: set[str], split: str | None, label: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    wanted = [CIFAR_TEST_BATCH] if split == "test" else [b for b in CIFAR_TRAIN_BATCHES if b in base]
    if not wanted or not all(w in base for w in wanted):
        raise DataError(f"{label}: CIFAR batches for split {split or 'train'} not found")
    xs, ys = [], []
    for name in wanted:
        try:
            d = _NumpyOnlyUnpickler(io.BytesIO(tree.read(name)), encoding="bytes").load()
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d.get(b"labels", d.get(b"fine_labels")), dtype=np.int64)
        except Exception as exc:
            raise DataError(f"{label}: unreadable CIFAR batch {name} ({exc})") from exc
        xs.append(x)
        ys.append(y)
    classes = list(CIFAR10_CLASSES)
    if "batches.meta" in base:
        try:
            meta = _NumpyOnlyUnpickler(io.BytesIO(tree.read("batches.meta")), encoding="bytes").load()
            classes = [c.decode() for c in meta[b"label_names"]]
        except Exception:  # labels stay usable with the standard names
            pass
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes


def decode_image(blob: bytes, name: str, sizes: _Sizes, size: tuple[int, int] | None, label: str) -> np.ndarray:
    """One image file to uint8 ``(H, W, 3)``: checked by its declared size before it is decoded, scaled to
    ``sizes.resize`` when asked, and refused when it differs from ``size`` (the first image's) otherwise."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as source:
            w, h = source.size
            sizes.check_image(h, w, label, name)
            im = source.convert("RGB")
            size = sizes.resize or size or (h, w)
            if (h, w) != size:
                if sizes.resize is None:
                    raise DataError(
                        f"{label}: {name} is {h}x{w} but earlier images are {size[0]}x{size[1]}; "
                        "pass an image size to resize"
                    )
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{label}: cannot decode image {name} ({exc})") from exc


def image_folder_files(names: list[str], label: str) -> tuple[list[str], np.ndarray, list[str]]:
    """The images of an ImageFolder layout (``<class>/<image>``) in order, their labels and the class names."""
    files = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and n.count("/") == 1]
    if not files:
        tops = sorted({n.split("/", 1)[0] for n in names if "/" in n})
        if tops and all(n.count("/") >= 2 for n in names if "/" in n):
            raise DataError(f"{label} holds splits {', '.join(tops)}; name one as PATH#{tops[0]}")
        raise DataError(f"{label}: no images found in class folders (expected <class>/<image>.jpg)")
    classes = sorted({n.split("/", 1)[0] for n in files})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n.split("/", 1)[0]] for n in files], dtype=np.int64)
    return files, labels, classes


def _decode_image_folder(
    tree: _Tree, names: list[str], sizes: _Sizes, label: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files, labels, classes = image_folder_files(names, label)
    out: np.ndarray | None = None
    size: tuple[int, int] | None = sizes.resize
    for i, name in enumerate(files):
        if i % 256 == 0:
            sizes.progress(i / len(files))
        arr = decode_image(tree.read(name), name, sizes, size, label)
        size = (arr.shape[0], arr.shape[1])
        if out is None:
            what = f"{len(files)} images of {size[0]}x{size[1]}"
            sizes.check_decoded(len(files) * size[0] * size[1] * 3, label, what)
            out = np.empty((len(files), size[0], size[1], 3), dtype=np.uint8)
        out[i] = arr
    assert out is not None
    images = torch.from_numpy(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(labels), classes
