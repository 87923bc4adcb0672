"""clipguard.checkpoint: only weights get in, nothing in an upload ever runs.

The malicious-pickle tests use live payloads: after checking that clipguard refuses the file
and the marker is absent, each test loads the same file the unsafe way and checks that the
marker then appears, so a harmless payload cannot make them pass.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from clipguard.checkpoint import canonicalize, load_weights, read_state_dict, save_weights
from clipguard.errors import CheckpointError
from clipguard.models import SmallCNN, resolve_spec

SPEC = resolve_spec("small_cnn")


def trained_state(seed: int = 0, **kwargs: int) -> dict[str, torch.Tensor]:
    """A SmallCNN state_dict whose weights and BN statistics all differ from a fresh init."""
    torch.manual_seed(seed)
    model = SmallCNN(**kwargs)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if t.ndim == 1 else 0.0))
            else:
                t.fill_(7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def outputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(4, 3, 32, 32))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- accepted


def test_round_trip_through_safetensors(tmp_path: Path) -> None:
    source = SPEC.build()
    source.load_state_dict(trained_state())
    path = tmp_path / "w.safetensors"

    digest = save_weights(source, path)
    assert digest == sha256(path)

    fresh = SPEC.build()
    assert not torch.equal(outputs(fresh), outputs(source))
    load_weights(fresh, read_state_dict(path))
    assert torch.equal(outputs(fresh), outputs(source))
    assert fresh.features[0][1].num_batches_tracked.item() == 7
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_format_comes_from_bytes_not_extension(tmp_path: Path) -> None:
    state = trained_state()
    st_named_pt, pt_named_st = tmp_path / "weights.pt", tmp_path / "weights.safetensors"
    save_file(state, st_named_pt)
    torch.save(state, pt_named_st)
    for path in (st_named_pt, pt_named_st):
        assert read_state_dict(path).keys() == state.keys()


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="plain"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict+epoch"),
        pytest.param(lambda sd: {"model": sd}, id="model"),
        pytest.param(lambda sd: {"net": sd, "optimizer": {"lr": 0.1}}, id="net+optimizer"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="DataParallel"),
        pytest.param(lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}, id="torch.compile"),
        pytest.param(
            lambda sd: {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 9},
            id="nested+prefix",
        ),
    ],
)
def test_zip_torch_save_and_wrappers_accepted(tmp_path: Path, wrap) -> None:
    state = trained_state()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(state), path)
    assert zipfile.is_zipfile(path)

    model = SPEC.build()
    load_weights(model, path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_dtypes_are_cast_to_the_model(tmp_path: Path) -> None:
    state = {k: v.double() if v.is_floating_point() else v.int() for k, v in trained_state().items()}
    model = SPEC.build()
    load_weights(model, state)
    assert all(v.dtype in (torch.float32, torch.int64) for v in model.state_dict().values())
    assert torch.allclose(model.fc.weight, state["fc.weight"].float())


# --------------------------------------------------------------------------- code never runs


class ExecPayload:
    """Unpickling this writes ``marker``: what a real malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _unsafe_load(path: Path, fmt: str) -> None:
    if fmt == "raw_pickle":
        with open(path, "rb") as f:
            pickle.load(f)  # proving the payload is live
    else:
        torch.load(path, weights_only=False)


@pytest.mark.parametrize(
    ("fmt", "payload", "culprit"),
    [
        ("zip", ExecPayload, "builtins.exec"),
        ("zip", SystemPayload, f"{os.system.__module__}.system"),
        ("legacy", ExecPayload, None),
        ("raw_pickle", ExecPayload, None),
    ],
)
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, fmt: str, payload, culprit) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": trained_state(), "evil": payload(marker)}
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)

    for attempt in (
        read_state_dict,
        lambda p: load_weights(SPEC.build(), p),
        lambda p: canonicalize(p, SPEC, tmp_path / "out.safetensors"),
    ):
        with pytest.raises(CheckpointError) as err:
            attempt(path)
        assert not marker.exists()
    message = str(err.value)
    if culprit:
        assert culprit in message and "state_dict" in message
    else:
        assert "legacy" in message and "pickle" in message
    assert "weights_only=False" not in message
    assert not (tmp_path / "out.safetensors").exists()

    _unsafe_load(path, fmt)
    assert marker.exists(), "the payload should have been live"


def test_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(SPEC.build(), path)
    with pytest.raises(CheckpointError, match=r"nn\.Module.*SmallCNN.*model\.state_dict\(\)"):
        read_state_dict(path)


def test_torchscript_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.safetensors"  # extension lies on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(SPEC.build()).save(str(path))
    with pytest.raises(CheckpointError, match="TorchScript archives are refused"):
        read_state_dict(path)


def test_torch_export_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    program = torch.export.export(nn.Linear(3, 2), (torch.randn(1, 3),))
    torch.export.save(program, path)
    with pytest.raises(CheckpointError, match=r"torch\.export \(\.pt2\) archives are refused"):
        read_state_dict(path)


def test_archive_named_like_a_marker_folder_is_still_accepted(tmp_path: Path) -> None:
    # torch.save names the archive's top folder after the file: "code/data.pkl", "models/data.pkl".
    for stem in ("code", "models"):
        path = tmp_path / f"{stem}.pt"
        torch.save(trained_state(), path)
        assert read_state_dict(path).keys() == trained_state().keys()


# --------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("fmt", ["zip", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 12])
def test_truncated_files_raise_checkpoint_error(tmp_path: Path, fmt: str, keep: float) -> None:
    path = tmp_path / "w"
    if fmt == "zip":
        torch.save(trained_state(), path)
    else:
        save_file(trained_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a checkpoint"),
        (b"hello world, not weights", "not a checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a checkpoint"),
    ],
)
def test_non_checkpoints_are_refused(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_state_dict(path)


def test_missing_file_and_foreign_zip(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "nope.pt")
    path = tmp_path / "archive.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match=r"no data\.pkl"):
        read_state_dict(path)


# --------------------------------------------------------------------------- wrong weights


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"num_classes": 100}, "fc.weight: checkpoint has (100, 128), SmallCNN expects (10, 128)"),
        ({"width": 16}, "features.0.0.weight: checkpoint has (16, 3, 3, 3), SmallCNN expects (32, 3, 3, 3)"),
    ],
)
def test_shape_mismatch_names_key_and_both_shapes(kwargs: dict, expected: str) -> None:
    with pytest.raises(CheckpointError) as err:
        load_weights(SPEC.build(), trained_state(**kwargs))
    assert expected in str(err.value)


def test_wrong_architecture_names_missing_and_unexpected(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    save_file(trained_state(), path)
    out = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError) as err:
        canonicalize(path, resolve_spec("resnet18"), out)
    message = str(err.value)
    assert "does not fit resnet18" in message
    assert "missing conv1.weight" in message and "unexpected features.0.0.weight" in message
    assert not out.exists()


def test_missing_and_unexpected_keys_are_named() -> None:
    state = trained_state()
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"missing fc\.bias; unexpected head\.weight"):
        load_weights(SPEC.build(), state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e300])
def test_non_finite_weights_are_refused(bad: float) -> None:
    state = trained_state()
    state["features.2.0.weight"] = state["features.2.0.weight"].double()  # 1e300 overflows in float32
    state["features.2.0.weight"][0, 0, 0, 0] = bad
    model = SPEC.build()
    before = outputs(model)
    with pytest.raises(CheckpointError, match=r"features\.2\.0\.weight contains NaN or infinite"):
        load_weights(model, state)
    assert torch.equal(outputs(model), before)  # nothing was half-loaded


def test_integer_buffer_given_as_float_is_refused() -> None:
    state = trained_state()
    state["features.0.1.num_batches_tracked"] = torch.tensor(3.0)
    with pytest.raises(CheckpointError, match=r"num_batches_tracked: checkpoint has dtype torch\.float32"):
        load_weights(SPEC.build(), state)


def test_non_tensor_inside_state_dict_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {**trained_state(), "step": 5}, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="entry step is a int, not a tensor"):
        read_state_dict(path)


# --------------------------------------------------------------------------- canonical output


def test_canonicalize_writes_equal_safetensors(tmp_path: Path) -> None:
    state = trained_state()
    src = tmp_path / "upload.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, src)
    out = tmp_path / "canon.safetensors"

    digest = canonicalize(src, SPEC, out)
    assert digest == sha256(out)
    loaded = load_file(out)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"arch": "small_cnn", "num_classes": "10"}

    again = tmp_path / "again.safetensors"
    assert canonicalize(out, SPEC, again) == digest  # canonical: same weights, same bytes


def test_canonicalize_failure_leaves_nothing(tmp_path: Path) -> None:
    state = trained_state()
    state["fc.weight"][0, 0] = float("nan")
    src = tmp_path / "bad.safetensors"
    save_file(state, src)
    out = tmp_path / "canon.safetensors"
    with pytest.raises(CheckpointError, match=r"fc\.weight"):
        canonicalize(src, SPEC, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_save_weights_is_byte_reproducible_with_metadata(tmp_path: Path) -> None:
    # safetensors writes __metadata__ in HashMap order (safetensors#584); we sort it.
    state = trained_state()
    metadata = {f"key{i}": f"value {i}" for i in range(8)}
    digests = {save_weights(state, tmp_path / f"{i}.safetensors", metadata) for i in range(4)}
    assert len(digests) == 1
    with safe_open(tmp_path / "0.safetensors", framework="pt") as f:
        assert f.metadata() == metadata


def test_save_weights_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(trained_state(seed=1), path)
    save_weights(trained_state(seed=2), path)
    assert torch.equal(load_file(path)["fc.weight"], trained_state(seed=2)["fc.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
