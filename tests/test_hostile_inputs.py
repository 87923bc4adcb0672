"""Hostile and careless input to the engine: every size is bounded before it is allocated, λ has one
range, attack records never name files, and only regular files are read.

The service tests (tests/service/test_hostile_limits.py) send the same input through the API.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipguard.attacks import Blend, WaNet, build_attack
from clipguard.data import Limits, load_data, trim_cache
from clipguard.errors import ClipguardError, DataError
from clipguard.lam import parse_lam
from clipguard.models import resolve_spec
from clipguard.purify import PurifyOptions, eval_attack, purify

CLI = [sys.executable, "-m", "clipguard.cli"]


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return buf.getvalue()


def image_tar(path: Path, size: tuple[int, int], count: int = 4) -> Path:
    blob = png(size)
    with tarfile.open(path, "w") as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"{('cat', 'dog')[i % 2]}/{i}.png")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    return path


def npz_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npz whose 'x' header declares ``shape`` (uint8) but holds no data: a few hundred bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    labels = io.BytesIO()
    np.save(labels, np.zeros(2, dtype=np.int64))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", b"\x93NUMPY\x01\x00" + header.getvalue()[8:])
        zf.writestr("y.npy", labels.getvalue())
    return path


# ------------------------------------------------------------------ λ


@pytest.mark.parametrize("lam", [-1.0, 0.0, 1e308, float("nan"), float("inf"), True, 100.5])
def test_purify_refuses_a_lambda_outside_its_range_before_any_work(lam, model_file, tmp_path):
    with pytest.raises(ClipguardError, match=r"λ must be a number in \(0, 100\]"):
        purify(
            PurifyOptions(
                arch="small_cnn", weights=model_file, data=str(tmp_path / "missing.npz"), out=tmp_path / "out", lam=lam
            )
        )


def test_the_cli_refuses_a_bad_lambda_with_one_line(tmp_path, model_file):
    for text in ("-1", "0", "1e308", "nan", "inf", "1e400", "abc"):
        proc = subprocess.run(
            [
                *CLI,
                "purify",
                "--arch",
                "small_cnn",
                "--weights",
                str(model_file),
                "--data",
                "x.npz",
                "--out",
                str(tmp_path / "o"),
                "--lam",
                text,
            ],
            capture_output=True,
            text=True,
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "λ must be a number in (0, 100] or 'auto'" in last, (text, proc.stderr)
    assert parse_lam("auto") == "auto" and parse_lam("100") == 100.0 and parse_lam(" 3.5 ") == 3.5


# ------------------------------------------------------------------ decoded sizes


def test_images_larger_than_the_models_input_are_refused_before_decoding(tmp_path):
    """24 blank 4096x4096 PNGs (1.2 MB of tar) decoded to 1.2 GB for a 32x32 model, then asked conv2d for 51 GB."""
    archive = image_tar(tmp_path / "huge.tar", (4096, 4096), count=24)
    assert archive.stat().st_size < 2 << 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"huge\.tar: .* is 4096x4096, larger than the model's 32x32 input"):
        load_data(archive, max_image_size=(32, 32))
    # Refused from the first image's header: not even one 48 MB image was decoded.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 40 * 1024


def test_a_mismatched_image_size_fails_purify_naming_the_data_unless_resizing_is_asked(tmp_path, model_file):
    archive = image_tar(tmp_path / "big.tar", (64, 64), count=8)
    options = PurifyOptions(
        arch="small_cnn",
        weights=model_file,
        data=str(archive),
        out=tmp_path / "out",
        lam=4.0,
        method="paper",
        cache_dir=tmp_path / "cache",
        sweep=False,
    )
    with pytest.raises(DataError, match=r"big\.tar.* is 64x64, larger than the model's 32x32 input.*resize"):
        purify(options)
    small = image_tar(tmp_path / "small.tar", (16, 16), count=8)
    options.data = str(small)
    with pytest.raises(DataError, match=r"small\.tar has 16x16 images but small_cnn takes 32x32"):
        purify(options)
    options.data, options.resize = str(archive), True
    result = purify(options)
    assert result.report["inputs"]["data"]["image_size"] == [32, 32]


def test_a_torchvision_model_takes_smaller_images_but_not_larger(tmp_path):
    spec = resolve_spec("torchvision:resnet18")
    assert not spec.fixed_input and spec.input_size == (224, 224)
    assert load_data(image_tar(tmp_path / "c.tar", (32, 32)), max_image_size=spec.input_size).image_size == (32, 32)
    with pytest.raises(DataError, match="larger than the model's 224x224 input"):
        load_data(image_tar(tmp_path / "l.tar", (256, 256)), max_image_size=spec.input_size)


def test_an_npz_is_refused_from_its_header_when_it_decodes_past_the_cap(tmp_path):
    """599 KB of np.savez_compressed decoded to 614 MB; a header declaring 10^9 images became a MemoryError."""
    x = np.zeros((200_000, 32, 32, 3), dtype=np.uint8)
    np.savez_compressed(tmp_path / "blank.npz", x=x, y=np.zeros(len(x), dtype=np.int64))
    del x
    assert (tmp_path / "blank.npz").stat().st_size < 1 << 20
    with pytest.raises(DataError, match=r"blank\.npz: its arrays would decode to \d+ bytes, over the cap of 100000000"):
        load_data(tmp_path / "blank.npz", limits=Limits(max_decoded_bytes=100_000_000))
    liar = npz_declaring(tmp_path / "liar.npz", (10**9, 32, 32, 3))
    with pytest.raises(DataError, match=r"liar\.npz: .* over the cap"):
        load_data(liar)
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((100, 32, 32, 3), dtype=np.uint8), y=np.zeros(100, dtype=np.int64))
    with pytest.raises(DataError, match="100 images resized to 224x224 would decode to 15052800 bytes"):
        load_data(small, image_size=(224, 224), limits=Limits(max_decoded_bytes=1_000_000))  # scaling up counts


def test_an_image_folder_that_would_decode_past_the_cap_is_refused_before_allocating(tmp_path):
    archive = image_tar(tmp_path / "many.tar", (32, 32), count=40)
    with pytest.raises(DataError, match=r"40 images of 32x32 would decode to 122880 bytes, over the cap of 100000"):
        load_data(archive, limits=Limits(max_decoded_bytes=100_000))


# ------------------------------------------------------------------ attacks


def test_attack_records_never_open_a_file_and_are_bounded_before_allocating(tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    record = {
        "name": "blend",
        "alpha": 0.2,
        "target": 0,
        "mode": "all_to_one",
        "seed": 0,
        "image": str(secret),
        "image_size": [32, 32],
    }
    with pytest.raises(DataError, match="trigger image file is not read"):
        eval_attack(record, (32, 32))
    answers = []
    for path in (secret, tmp_path / "nope.png", "/etc/passwd"):  # existing or not: the same answer, no oracle
        with pytest.raises(DataError) as refused:
            eval_attack({**record, "image": str(path)}, (32, 32))
        answers.append(str(refused.value))
    assert len(set(answers)) == 1
    huge = {**record, "image": None, "image_size": [100_000, 100_000]}
    with pytest.raises(DataError, match="made for 100000x100000 images, the evaluation data are 32x32"):
        eval_attack(huge, (32, 32))
    with pytest.raises(ClipguardError, match="over the 16777216-pixel cap"):
        Blend(image_size=(100_000, 100_000))
    with pytest.raises(ClipguardError, match="at most the image side 32"):
        WaNet(k=100_000)
    good = Blend(seed=3).to_dict()
    assert eval_attack(good, (32, 32)).to_dict() == good


def test_a_spec_from_a_request_is_never_looked_up_as_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "badnets").write_text(json.dumps({"name": "blend"}))  # a file named like an attack
    assert build_attack("badnets", files=False).name == "badnets"
    with pytest.raises(ClipguardError, match="option image names a file"):
        build_attack("blend:image=secret.png", files=False)
    with pytest.raises(ClipguardError, match="unknown attack"):
        build_attack("x.json", files=False)


# ------------------------------------------------------------------ files that are not files


def test_a_fifo_is_refused_at_once_not_read_forever(tmp_path):
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_data(fifo)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(60)  # only so a regression fails instead of hanging the suite
    if thread.is_alive():
        with open(fifo, "wb"):  # release the blocked reader
            pass
        pytest.fail("load_data blocked on a FIFO")
    assert isinstance(outcome[0], DataError) and "not a regular file" in str(outcome[0])


# ------------------------------------------------------------------ quarantine cost


def test_checking_a_tiny_upload_against_a_huge_architecture_builds_nothing(tmp_path):
    """A 68-byte upload declared torchvision:vit_l_16 made the quarantine build the whole network (1.85 GB)."""
    tiny = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(1)}, str(tiny))
    assert tiny.stat().st_size < 100
    script = (
        "import resource, sys; from clipguard.app.quarantine import _child\n"
        "out = _child({'upload': sys.argv[1], 'arch': sys.argv[2], 'num_classes': 10, 'mean': None, 'std': None,"
        " 'out': sys.argv[3], 'cpu_s': 300, 'memory_bytes': 16 * 1024**3, 'file_bytes': 2**20})\n"
        "print(out['reason'][:60], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    peaks = {}
    for arch in ("small_cnn", "torchvision:vit_l_16"):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tiny), arch, str(tmp_path / "out.st")],
            capture_output=True,
            text=True,
            check=True,
        )
        reason, _, peak = proc.stdout.strip().rpartition(" ")
        assert reason.startswith("checkpoint does not fit"), proc.stdout
        peaks[arch] = int(peak)
    # ViT-L/16 holds 1.2 GB of parameters; checked on the meta device it costs its module objects only.
    assert peaks["torchvision:vit_l_16"] - peaks["small_cnn"] < 400 * 1024, peaks


# ------------------------------------------------------------------ the decoded-data cache


def test_the_cache_is_trimmed_least_recently_used_first(tmp_path):
    cache = tmp_path / "cache"
    refs = []
    for i in range(3):
        x = np.full((50, 32, 32, 3), i, dtype=np.uint8)
        np.savez(tmp_path / f"d{i}.npz", x=x, y=np.zeros(50, dtype=np.int64))
        refs.append(tmp_path / f"d{i}.npz")
    load_data(refs[0], cache_dir=cache)
    entry = next(cache.iterdir())
    one = entry.stat().st_size
    os.utime(entry, (1, 1))  # long unused
    load_data(refs[1], cache_dir=cache)
    load_data(refs[0], cache_dir=cache)  # a hit makes it recent again
    load_data(refs[2], cache_dir=cache, cache_max_bytes=2 * one + one // 2)
    assert len(list(cache.glob("*.pt"))) == 2 and entry.exists()  # d1's entry, the least recently used, went
    assert trim_cache(cache, 0) >= 2 * one and not list(cache.glob("*.pt"))
    # An entry larger than the whole cap is not written at all.
    load_data(refs[0], cache_dir=cache, cache_max_bytes=one // 2)
    assert not list(cache.glob("*.pt"))
