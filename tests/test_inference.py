"""The fast read-only copies the statistics and feature passes run on: same numbers, no side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard import inference
from clipguard.data import ImageData, iter_batches, normalize
from clipguard.defenses.clipping import compute_statistics
from clipguard.defenses.mmbd import mmbd_mitigate
from clipguard.detection import feature_pass
from clipguard.inference import fast_copy, fast_input, fold_batchnorm, pieces
from clipguard.metrics import predict
from clipguard.models import resolve_spec
from clipguard.split import split_tail


def _trained_looking(arch: str) -> nn.Module:
    """A registry model whose BatchNorms hold non-trivial running statistics and affine weights,
    so folding them is a real rescaling (fresh ones are the identity)."""
    torch.manual_seed(0)
    model = resolve_spec(arch).build().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.3, 3.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def _images(n: int, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        tuple(str(i) for i in range(10)),
        "t",
    )


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "vgg16_bn"])
def test_folded_copy_has_no_batchnorm_and_computes_what_the_model_does(arch):
    model = _trained_looking(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # every conv → BN pair folded
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_model_that_cannot_be_traced_is_copied_unfolded():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y  # data-dependent: torch.fx cannot trace it

    model = Branchy().eval()
    copy = fold_batchnorm(model)
    assert copy is not model and isinstance(copy.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), model(x))


def test_only_cpu_passes_are_rewritten():
    model = _trained_looking("small_cnn")
    assert fast_copy(model, "cuda") is model  # on a GPU the model runs as given
    cpu = fast_copy(model, "cpu")
    assert cpu is not model
    assert cpu.get_submodule("features.0.0").weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    assert fast_input(x, "cpu").is_contiguous(memory_format=torch.channels_last)
    assert fast_input(x, "cuda") is x


@pytest.fixture
def small_pieces(monkeypatch):
    """Cut every CPU batch into pieces of 5, so these small tests cross piece boundaries
    (16-image batches become 5 + 5 + 5 + 1)."""
    monkeypatch.setattr(inference, "CPU_PIECE", 5)


def test_pieces_cut_a_cpu_batch_only(small_pieces):
    x = torch.randn(12, 3, 4, 4)
    cut = pieces(x, "cpu")
    assert [len(p) for p in cut] == [5, 5, 2]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in cut)
    torch.testing.assert_close(torch.cat(cut), x, rtol=0, atol=0)
    (whole,) = pieces(x, "cuda")  # a GPU takes the batch whole, as given
    assert whole.shape == x.shape and whole.data_ptr() == x.data_ptr() and whole.is_contiguous()


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_fast_statistics_give_the_bounds_of_the_exact_pass(arch, small_pieces):
    model = _trained_looking(arch)
    spec = resolve_spec(arch)
    data = _images(48 if arch == "small_cnn" else 16)
    exact = compute_statistics(model, lambda: iter_batches(data, 16, spec.mean, spec.std), fast=False)
    fast = compute_statistics(model, lambda: iter_batches(data, 16, spec.mean, spec.std))
    assert fast.names == exact.names and fast.samples == exact.samples == len(data)
    want, got = exact.bounds(4.0), fast.bounds(4.0)
    for name in exact.names:
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=float(1e-4 * scale))


def test_fast_feature_pass_reads_the_features_and_tail_inputs_of_the_model(small_pieces):
    model = _trained_looking("small_cnn")
    spec = resolve_spec("small_cnn")
    data = _images(40, seed=1)
    split = split_tail(model)
    assert split is not None
    found = feature_pass(model, data, spec, split=split, max_cache_bytes=2**30, batch_size=16)
    x = normalize(data.images, spec.mean, spec.std)
    with torch.no_grad():
        inner = split.body(x)
        torch.testing.assert_close(found.logits, model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(found.features, model.pool(model.features(x)).flatten(1), rtol=1e-4, atol=1e-4)
        # and the per-channel peak of the map the global pool averages, across piece boundaries
        torch.testing.assert_close(found.peaks, model.features(x).amax((2, 3)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(found.for_detection(), torch.cat([found.features, found.peaks], 1))
    assert found.tail_inputs is not None and found.tail_inputs.is_contiguous()  # the fine-tune's usual layout
    torch.testing.assert_close(found.tail_inputs, inner, rtol=1e-4, atol=1e-4)


def test_predictions_in_pieces_are_the_models(small_pieces):
    model = _trained_looking("small_cnn")
    spec = resolve_spec("small_cnn")
    data = _images(23, seed=2)
    with torch.no_grad():
        want = model(normalize(data.images, spec.mean, spec.std)).argmax(1)
    assert torch.equal(predict(model, data, spec.mean, spec.std, batch_size=16), want)


def test_mmbm_learns_the_same_bounds_in_pieces(monkeypatch):
    """MM-BM's gradient summed over pieces is its batch's gradient: the same bounds either way."""
    spec = resolve_spec("small_cnn")
    model = _trained_looking("small_cnn")
    data = _images(40, seed=3)
    with torch.no_grad():  # MM-BM learns on the clean images the model gets right: make those all of them
        data.labels[:] = model(normalize(data.images, spec.mean, spec.std)).argmax(1)

    def learnt(piece: int) -> dict[str, float]:
        monkeypatch.setattr(inference, "CPU_PIECE", piece)
        # bounds that start inside the activations' range, so the fit term's gradient is not zero
        return mmbd_mitigate(model, spec, data, epochs=3, batch_size=16, init=0.5, c0=0.05).info["bound_mean"]

    whole, cut = learnt(10_000), learnt(3)
    assert whole.keys() == cut.keys()
    for site, bound in whole.items():
        assert abs(bound - 0.5) > 0.05  # the bounds moved from their start, so the comparison means something
        assert abs(cut[site] - bound) < 1e-4 * max(1.0, abs(bound)), site
