"""Exports are drop-in replacements: same input, same logits as the eager clipped model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipguard.defenses.clipping import (
    Clip,
    ReluClip,
    clipped_model,
    compute_statistics,
    export_form,
    instrument,
    site_modules,
)
from clipguard.errors import ExportError
from clipguard.export import export_program, export_torchscript, load_exported
from clipguard.models import resolve_spec


@pytest.fixture(scope="module")
def clipped():
    torch.manual_seed(0)
    model = resolve_spec("small_cnn").build().eval()
    x = torch.randn(16, 3, 32, 32)
    stats = compute_statistics(model, lambda: [x])
    return model, clipped_model(model, stats.bounds(0.5)), x


def test_torchscript_export_matches_eager_and_carries_metadata(clipped, tmp_path):
    model, gm, x = clipped
    check = export_torchscript(gm, x[:8], tmp_path / "p.pt", metadata={"arch": "small_cnn", "mean": [0.1, 0.2, 0.3]})
    assert check["ok"] and check["max_abs_diff"] <= 1e-5 and check["method"] == "script"
    loaded, meta = load_exported(tmp_path / "p.pt")
    assert meta["mean"] == [0.1, 0.2, 0.3]
    with torch.inference_mode():
        # Another batch size than the one checked, and the clipping really changes the output.
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=1e-5)
        assert (gm(x) - model(x)).abs().max() > 1e-3


def test_torch_export_program_matches_eager(clipped, tmp_path):
    _, gm, x = clipped
    check = export_program(gm, x[:4], tmp_path / "p.pt2")
    assert check["ok"], check
    loaded, _ = load_exported(tmp_path / "p.pt2")
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=1e-5)  # dynamic batch dimension


def test_a_diverging_export_is_an_error_and_leaves_no_file(clipped, tmp_path):
    _, gm, x = clipped

    class Flaky(torch.nn.Module):
        """Scripts to different code than it runs eagerly, like a model with a Python-only branch."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = gm

        @torch.jit.unused
        def eager_shift(self) -> float:
            return 1.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.jit.is_scripting():
                return self.inner(x)
            return self.inner(x) + self.eager_shift()

    with pytest.raises(ExportError, match="differs"):
        export_torchscript(Flaky(), x[:4], tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists()


def test_a_full_disk_is_an_export_error_not_a_crash(tmp_path):
    """/dev/full answers every write with ENOSPC: the export fails with the reason, the process lives on."""
    target = tmp_path / "purified.pt"
    target.symlink_to("/dev/full")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    with pytest.raises(ExportError, match="No space left"):
        export_torchscript(model, torch.randn(2, 3, 8, 8), target)
    assert Path("/dev/full").exists()


class _Shared(torch.nn.Module):
    """A ReLU whose input another branch reads too: it must not be overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.relu2 = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu2(self.relu(y) + y)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "shared"])
def test_the_exported_clipped_model_computes_min_of_activation_and_bound(arch, tmp_path):
    torch.manual_seed(0)
    model = _Shared().eval() if arch == "shared" else resolve_spec(arch).build().eval()
    x = torch.randn(8, 3, 32, 32)
    bounds = compute_statistics(model, lambda: [x]).bounds(0.5)
    gm = clipped_model(model, bounds)
    form = export_form(gm)
    flags = [m.inplace for m in site_modules(form) if isinstance(m, ReluClip)]
    # In place wherever the pre-activation is private (every site of these victims), never otherwise.
    assert flags == ([False, True] if arch == "shared" else [True] * len(flags)) and flags
    assert not any(m.inplace for m in site_modules(gm) if isinstance(m, ReluClip))  # the engine's copy is untouched
    reference, _ = instrument(model, lambda name, i: Clip(bounds[name]))  # ReLU, then min(a, bound)
    export_torchscript(gm, x, tmp_path / "p.pt")
    loaded, _ = load_exported(tmp_path / "p.pt")
    before = x.clone()
    with torch.inference_mode():
        want = reference(x)
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=1e-6)
        torch.testing.assert_close(form(x), want, rtol=0, atol=1e-6)
    assert torch.equal(x, before)  # the caller's batch is never overwritten
    with torch.enable_grad():  # with autograd the sites take the out-of-place clamp, same values
        torch.testing.assert_close(gm(x.requires_grad_()), want, rtol=0, atol=1e-6)
