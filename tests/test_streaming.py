"""Streamed data: a folder read a batch at a time decodes to exactly what the in-memory path holds, runs
the same purification, and fails with a clear error where a step needs every image at once."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipguard.data import Limits, load_data, save_npz
from clipguard.errors import DataError
from clipguard.streaming import StreamedImages

CLASSES = ("cat", "dog", "frog")


def write_folder(root: Path, n: int = 90, size: int = 8, classes: tuple[str, ...] = CLASSES) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    write_folder(tmp_path / "train")
    return tmp_path / "train"


def test_a_streamed_folder_reads_exactly_what_memory_holds(folder):
    whole = load_data(folder, stream=False)
    streamed = load_data(folder, stream=True)
    assert not whole.streamed and streamed.streamed and isinstance(streamed.images, StreamedImages)
    assert (len(streamed), streamed.image_size, streamed.classes) == (len(whole), whole.image_size, whole.classes)
    assert streamed.sha256 == whole.sha256 and torch.equal(streamed.labels, whole.labels)
    idx = torch.randperm(len(whole), generator=torch.Generator().manual_seed(1))[:50]  # over 32: the thread pool
    assert torch.equal(streamed.images[idx], whole.images[idx])
    assert torch.equal(streamed.images[5:17], whole.images[5:17])
    assert torch.equal(streamed.images[3], whole.images[3])
    mask = whole.labels == 1
    assert torch.equal(streamed.images[mask], whole.images[mask])
    part = streamed.subset(idx)
    assert part.streamed and torch.equal(part.images[:], whole.subset(idx).images)
    assert part.sha256 == whole.subset(idx).sha256


def test_a_folder_over_the_resident_cap_streams_by_itself(folder):
    assert not load_data(folder).streamed
    small = Limits(max_resident_bytes=90 * 3 * 8 * 8 - 1)
    assert load_data(folder, limits=small).streamed
    assert not load_data(folder, limits=small, stream=False).streamed
    # the in-memory path's cap on the folder's bytes does not apply to a stream, which never holds them
    assert load_data(folder, limits=Limits(max_total_bytes=1000, max_resident_bytes=0)).streamed
    with pytest.raises(DataError, match="holds more than 1000 bytes"):
        load_data(folder, limits=Limits(max_total_bytes=1000), stream=False)


def test_only_folders_of_class_folders_stream(folder, tmp_path):
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname="train")
    assert not load_data(archive, limits=Limits(max_resident_bytes=0)).streamed  # archives decode whole
    with pytest.raises(DataError, match="only a folder of images can be streamed"):
        load_data(archive, stream=True)
    npz_folder = tmp_path / "npz"
    npz_folder.mkdir()
    save_npz(load_data(folder), npz_folder / "d.npz")
    with pytest.raises(DataError, match="only a folder of class folders"):
        load_data(npz_folder, stream=True)


def test_one_read_is_capped(folder):
    data = load_data(folder, stream=True, limits=Limits(max_batch_bytes=10 * 3 * 8 * 8))
    assert data.images[:10].shape == (10, 3, 8, 8)
    with pytest.raises(DataError, match="asked for 11 streamed images at once"):
        data.images[:11]


def test_a_bad_file_fails_when_it_is_read_with_its_name(folder):
    (folder / "dog" / "0004.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((9, 9, 3), dtype=np.uint8)).save(folder / "cat" / "0003.png")
    data = load_data(folder, stream=True)
    assert data.images[:1].shape == (1, 3, 8, 8)
    files = [p.relative_to(folder).as_posix() for p in data.images._files]  # type: ignore[union-attr]
    with pytest.raises(DataError, match=r"cannot decode image 0004\.png"):
        data.images[[files.index("dog/0004.png")]]
    with pytest.raises(DataError, match=r"0003\.png is 9x9 but earlier images are 8x8"):
        data.images[[files.index("cat/0003.png")]]
    resized = load_data(folder, stream=True, image_size=(8, 8))
    assert resized.images[[files.index("cat/0003.png")]].shape == (1, 3, 8, 8)


def test_steps_that_need_every_image_at_once_say_so(folder, tmp_path):
    data = load_data(folder, stream=True)
    with pytest.raises(DataError, match=r"saving as \.npz needs all 90 images in memory"):
        save_npz(data, tmp_path / "x.npz")
    from clipguard.attacks import build_attack

    with pytest.raises(DataError, match="poisoning needs all 90 images"):
        build_attack("badnets", image_size=(8, 8)).poison(data, rate=0.1, seed=0)


def test_the_pipeline_streams_to_the_same_bounds(tmp_path, model_file):
    """The engine's stages read streamed data through indexing only: the same statistics and bounds.
    (The whole job, publishing included, streamed by a worker: tests/service/test_job_options.py.)"""
    from clipguard.purify import PurifyOptions, Recipe, load_inputs, run_pipeline

    write_folder(tmp_path / "data", n=120, size=32, classes=tuple(f"c{k}" for k in range(10)))
    runs = {}
    for stream in (False, True):
        options = PurifyOptions(
            arch="small_cnn", weights=model_file, data=str(tmp_path / "data"), out=tmp_path, stream=stream, device="cpu"
        )
        inputs = load_inputs(options)
        assert inputs.data.streamed is stream
        runs[stream] = run_pipeline(inputs, Recipe(method="paper"))  # type: ignore[arg-type]
    assert runs[True].statistics == runs[False].statistics
    assert runs[True].bounds.keys() == runs[False].bounds.keys()
    assert all(torch.equal(runs[True].bounds[k], runs[False].bounds[k]) for k in runs[False].bounds)


def test_the_command_line_states_the_resident_cap_it_applies():
    from clipguard.cli import build_parser

    purify = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices["purify"]
    stream = next(a for a in purify._actions if a.dest == "stream")
    assert stream.default is None
    assert f"{Limits().max_resident_bytes >> 20} MiB" in (stream.help or "")
