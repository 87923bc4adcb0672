"""Activation statistics, site discovery and the clipped model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.defenses import clipping
from clipguard.defenses.clipping import (
    Clip,
    RunningMoments,
    SiteStats,
    Tap,
    clipped_model,
    clipped_site_names,
    compute_statistics,
    instrument,
    site_modules,
)
from clipguard.errors import ClipguardError
from clipguard.models import resolve_spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("granularity", ["channel", "element"])
@pytest.mark.parametrize("splits", [[37], [1, 36], [5, 5, 27], [12, 1, 1, 23]])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_moments_match_torch_on_concatenated_activations(
    dtype, granularity, splits, offset, layout, monkeypatch
):
    gen = torch.Generator().manual_seed(len(splits))
    # offset 0: post-ReLU-like maps (the fast sum/norm path); offset 100: mean far above the
    # spread, where float32 sums of squares cancel and the exact path must take over.
    x = (torch.randn(sum(splits), 6, 5, 4, generator=gen, dtype=dtype) * 3 + offset).relu()
    if layout == "channels_last":  # what the CPU statistics pass feeds in; tiny blocks to cross block edges
        x = x.contiguous(memory_format=torch.channels_last)
        monkeypatch.setattr(clipping, "NHWC_CHUNK", 7 * 6)
    mom = RunningMoments(granularity)
    for chunk in torch.split(x, splits):
        mom.update(chunk)
    dims = (0, 2, 3) if granularity == "channel" else (0,)
    want_mean = x.mean(dim=dims, keepdim=True)[0]
    want_var = x.var(dim=dims, keepdim=True)[0]
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(mom.mean, want_mean.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(mom.var(), want_var.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(
        mom.var(correction=0), x.var(dim=dims, keepdim=True, correction=0)[0].double(), rtol=tol, atol=tol
    )
    assert mom.count == x.numel() // mom.mean.numel()


def test_two_dimensional_activations_are_per_feature():
    x = torch.randn(50, 7, dtype=torch.float64)
    mom = RunningMoments("channel")
    for chunk in torch.split(x, 13):
        mom.update(chunk)
    torch.testing.assert_close(mom.var(), x.var(dim=0))


def test_unknown_granularity_is_refused():
    with pytest.raises(ClipguardError, match="granularity"):
        RunningMoments("pixel")


def test_a_module_called_twice_gives_two_sites_with_their_own_statistics():
    model = resolve_spec("torchvision:resnet18", num_classes=10).build().eval()
    gm, names = instrument(model, lambda name, i: Tap())
    assert "layer1.0.relu#0" in names and "layer1.0.relu#1" in names
    assert len(names) == 17 == len(set(names))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(gm(x), model(x))
    stats = compute_statistics(model, lambda: [x])
    first, second = (stats.moments[names.index(f"layer1.0.relu#{k}")] for k in (0, 1))
    assert not torch.allclose(first.mean, second.mean)


def test_sites_cover_every_activation_of_the_registry_models():
    expected = {"resnet18": 17, "preact_resnet18": 16, "vgg16_bn": 13, "small_cnn": 4}
    for arch, count in expected.items():
        _, names = instrument(resolve_spec(arch).build(), lambda name, i: Tap())
        assert len(names) == count, arch


def test_statistics_pass_sees_the_activations_a_hook_would():
    model = resolve_spec("small_cnn").build().eval()
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    seen = []
    model.features[6][2].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    stats = compute_statistics(model, lambda: batches)
    acts = torch.cat(seen)
    last = stats.moments[-1]
    torch.testing.assert_close(last.mean, acts.mean(dim=(0, 2, 3), keepdim=True)[0].double(), rtol=1e-5, atol=1e-6)
    assert stats.samples == 24


def test_clipped_model_applies_min_at_every_site():
    torch.manual_seed(0)
    model = resolve_spec("small_cnn").build().eval()
    x = torch.randn(4, 3, 32, 32)
    stats = compute_statistics(model, lambda: [x])
    # λ large: nothing is cut, the output is the model's own.
    torch.testing.assert_close(clipped_model(model, stats.bounds(1e6))(x), model(x))
    # λ small: every site's output never exceeds its bound.
    bounds = stats.bounds(0.0)
    gm = clipped_model(model, bounds)
    outs = {}
    for name, mod in zip(clipped_site_names(gm), site_modules(gm), strict=True):
        assert isinstance(mod, Clip)
        mod.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, (i[0], o)))
    gm(x)
    for name, (inp, out) in outs.items():
        act = inp.relu() if mod.fuses_relu else inp  # fused sites receive the pre-activation
        torch.testing.assert_close(out, torch.minimum(act, bounds[name]))
        assert (act > bounds[name]).any(), name  # the bound really cut something


@pytest.mark.parametrize("arch", ["small_cnn", "torchvision:resnet18", "torchvision:mobilenet_v3_small"])
def test_fused_relu_clips_equal_clipping_after_the_activation(arch):
    torch.manual_seed(0)
    model = resolve_spec(arch).build().eval()
    x = torch.randn(4, 3, 32, 32)
    bounds = compute_statistics(model, lambda: [x]).bounds(0.5)
    fused = clipped_model(model, bounds)
    unfused, _ = instrument(model, lambda name, i: Clip(bounds[name]))
    kinds = {type(m).__name__ for m in site_modules(fused)}
    assert "ReluClip" in kinds  # plain ReLUs are fused ...
    if arch.endswith("mobilenet_v3_small"):
        assert "Clip" in kinds  # ... Hardswish sites keep a separate clip
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), unfused(x), rtol=0, atol=1e-6)
        if not arch.endswith("mobilenet_v3_small"):  # an untrained MobileNet's logits barely move
            assert (fused(x) - model(x)).abs().max() > 1e-3


def test_bounds_are_mean_plus_lambda_std():
    mom = RunningMoments("channel")
    mom.update(torch.arange(24, dtype=torch.float64).view(2, 3, 2, 2))
    stats = SiteStats(["s"], [mom], 2, "channel")
    b = stats.bounds(2.5)["s"]
    torch.testing.assert_close(b, (mom.mean + 2.5 * mom.std()).float())
    assert b.shape == (3, 1, 1)


def test_bounds_for_unknown_sites_are_refused():
    model = resolve_spec("small_cnn").build()
    with pytest.raises(ClipguardError, match="sites this model does not have"):
        clipped_model(model, {"nope": torch.zeros(1)})


def test_models_without_activations_are_refused():
    with pytest.raises(ClipguardError, match="no activation"):
        instrument(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), lambda n, i: Tap())
