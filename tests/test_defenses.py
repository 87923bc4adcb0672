"""Baseline defenses (NAD, MM-BD, CLP, EP, UNIT): small, deterministic correctness checks.

Everything runs on tiny models and random images so the file stays well inside CI's budget;
the planted-backdoor cases are constructed by hand (no training), so they cannot flake.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import ImageData, iter_batches
from clipguard.defenses.clipping import Clip, compute_statistics, site_modules
from clipguard.defenses.clp import channel_lipschitz, clp
from clipguard.defenses.common import DefenseResult, conv_bn_pairs
from clipguard.defenses.ep import ep, histogram_entropy
from clipguard.defenses.mmbd import detection_statistics, gamma_fit, max_margin, mmbd_detect, mmbd_mitigate
from clipguard.defenses.nad import (
    BACKDOORBENCH,
    attention_layers,
    attention_loss,
    attention_map,
    nad,
    nad_loss,
    nad_lr,
)
from clipguard.defenses.unit import unit
from clipguard.models import SmallCNN, resolve_spec

CLASSES = tuple(str(i) for i in range(10))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP stalls on a shared, oversubscribed CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_data(n: int, size: int = 32, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageData(images, torch.arange(n) % 10, CLASSES)


def tiny_spec(size: int = 8):
    return resolve_spec("small_cnn", input_size=(size, size))


# --------------------------------------------------------------------------- NAD


def test_attention_map_by_hand() -> None:
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # (N=1, C=2, H=1, W=2)
    am = attention_map(f, p=2)
    expected = torch.tensor([10.0, 4.0]) / math.sqrt(116.0)  # Σ_c F_c² = [1+9, 4+0], L2 norm √116
    assert am.shape == (1, 1, 1, 2)
    assert torch.allclose(am.flatten(), expected, atol=1e-6)
    # p = 1 sums absolute values
    assert torch.allclose(attention_map(-f, p=1).flatten(), torch.tensor([4.0, 2.0]) / math.sqrt(20.0), atol=1e-6)


def test_attention_and_nad_loss_by_hand() -> None:
    fs = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    ft = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # teacher map [1, 0]
    s = torch.tensor([10.0, 4.0]) / math.sqrt(116.0)
    at = ((s[0] - 1.0) ** 2 + s[1] ** 2) / 2
    assert attention_loss(fs, ft) == pytest.approx(float(at), abs=1e-6)
    logits, labels = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([1])
    total = nad_loss(logits, labels, [fs, fs], [ft, fs], betas=[500.0, 1000.0])
    assert float(total) == pytest.approx(float(F.cross_entropy(logits, labels)) + 500.0 * float(at), rel=1e-5)


def test_nad_schedules_of_the_release_and_of_backdoorbench() -> None:
    # the release: lr 0.1 for two epochs, then its fixed 0.01, then 1e-4 from epoch 20
    assert [nad_lr(e, 0.1) for e in (0, 1, 2, 19, 20)] == [0.1, 0.1, 0.01, 0.01, 1e-4]
    # BackdoorBench passes lr 0.01 to the same schedule: 0.01 throughout its 10 epochs, not 0.001
    assert {nad_lr(e, BACKDOORBENCH["lr"]) for e in range(BACKDOORBENCH["epochs"])} == {0.01}
    assert nad_lr(5, 0.001) == 0.001  # the schedule never raises a smaller lr


def test_nad_layer_groups() -> None:
    resnet = resolve_spec("resnet18")
    assert attention_layers(resnet.build(), resnet) == ["layer2", "layer3", "layer4"]
    spec = resolve_spec("small_cnn")
    assert attention_layers(spec.build(), spec) == ["features.2.2", "features.4.2", "features.6.2"]


# --------------------------------------------------------------------------- MM-BD


def linear_model(seed: int, planted: bool, size: int = 8) -> nn.Module:
    """A linear classifier on 3×size×size inputs; ``planted`` adds a huge class-0 weight on a 2×2 patch."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(3 * size * size, 10)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(10, 3 * size * size, generator=g) * 0.1)
        lin.bias.zero_()
        if planted:
            patch = torch.zeros(3, size, size)
            patch[:, -2:, -2:] = 1.0
            lin.weight[0] += 50.0 * patch.flatten()
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_max_margin_increases_monotonically() -> None:
    spec = tiny_spec()
    torch.manual_seed(0)
    for model in (
        linear_model(1, planted=False),
        nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Tanh(), nn.Linear(32, 10)).eval(),
    ):
        for p in model.parameters():
            p.requires_grad_(False)
        _final, history = max_margin(
            model, spec, 3, images=8, steps=60, lr=1e-2, generator=torch.Generator().manual_seed(0)
        )
        steps = torch.tensor(history)
        assert len(history) > 10
        assert bool((steps[1:] - steps[:-1] >= -1e-5).all()), history
        assert history[-1] > history[0]


def test_gamma_fit_recovers_parameters() -> None:
    x = torch.distributions.Gamma(torch.tensor(3.0), torch.tensor(0.5)).sample((20000,))  # rate 0.5 → scale 2
    shape, scale = gamma_fit(x)
    assert shape == pytest.approx(3.0, rel=0.05)
    assert scale == pytest.approx(2.0, rel=0.05)


def test_detection_statistics_outlier() -> None:
    flagged = detection_statistics([1.0, 1.1, 0.9, 1.2, 1.05, 0.95, 1.15, 1.0, 0.98, 30.0])
    assert flagged["flagged"] and flagged["target"] == 9 and flagged["p_value"] < 1e-6
    calm = detection_statistics([1.0, 1.1, 0.9, 1.2, 1.05, 0.95, 1.15, 1.0, 0.98, 1.12])
    assert not calm["flagged"]


def test_mmbd_flags_planted_backdoor_not_clean_model() -> None:
    spec = tiny_spec()
    bad = mmbd_detect(linear_model(2, planted=True), spec, num_classes=10, images_per_class=10, steps=100)
    assert bad["flagged"] and bad["target"] == 0, bad
    clean = mmbd_detect(linear_model(2, planted=False), spec, num_classes=10, images_per_class=10, steps=100)
    assert not clean["flagged"], clean
    assert bad["statistics"][0] > 10 * max(bad["statistics"][1:])


# --------------------------------------------------------------------------- CLP and EP


def conv_bn_net(channels: int = 32, kernel: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    ).eval()


def test_conv_bn_pairs_follow_the_graph() -> None:
    pairs = conv_bn_pairs(resolve_spec("preact_resnet18").build())
    # PreAct blocks apply BN *before* each conv and conv2 feeds the residual add: the real pairs are
    # conv1→bn2 inside blocks, plus the stem conv into the first block's bn1. Module order would
    # wrongly pair every conv2 with the next block's bn1.
    names = [(c, b) for c, _, b, _ in pairs]
    assert names[0] == ("conv1", "layer1.0.bn1")
    assert len(names) == 9 and all(c.endswith(".conv1") and b.endswith(".bn2") for c, b in names[1:])
    assert len(conv_bn_pairs(resolve_spec("resnet18").build())) == 20


def test_clp_prunes_exactly_the_planted_channel() -> None:
    torch.manual_seed(0)
    model = conv_bn_net()
    with torch.no_grad():
        model[0].weight[7] *= 50.0
        model[1].bias.fill_(0.1)
    scores = channel_lipschitz(model[0], model[1])
    assert int(scores.argmax()) == 7
    result = clp(model, tiny_spec(), u=3.0)
    bn = result.model[1]
    assert torch.nonzero(bn.weight == 0).flatten().tolist() == [7]
    assert torch.nonzero(bn.bias == 0).flatten().tolist() == [7]
    assert result.info["pruned_channels"] == 1
    assert bool((model[1].weight != 0).all()), "the victim itself must not be modified"


def test_histogram_entropy() -> None:
    two_spikes = torch.tensor([[0.0, 1.0] * 50])
    assert float(histogram_entropy(two_spikes)[0]) == pytest.approx(math.log(2), abs=1e-6)
    gauss = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    assert float(histogram_entropy(gauss)[0]) > 3.0  # ≈ 1.42 + ln(1/0.1)


def test_ep_prunes_planted_low_entropy_channel() -> None:
    g = torch.Generator().manual_seed(0)
    n, size = 256, 8
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    images[:, 2] = ((torch.arange(n) % 2) * 255).to(torch.uint8)[:, None, None]  # channel 2: all-0 or all-255
    data = ImageData(images, torch.arange(n) % 10, CLASSES)
    model = conv_bn_net(kernel=1)
    with torch.no_grad():
        w = torch.randn(32, 3, 1, 1, generator=g)
        w[:, 2] = 0.0
        w[11] = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)  # channel 11 only sees the binary "trigger"
        model[0].weight.copy_(w)
    result = ep(model, tiny_spec(size), data, u=3.0, batch=256)
    assert result.info["layers"]["1"]["pruned"] == [11]
    assert float(result.model[1].weight[11].detach()) == 0.0 and float(result.model[1].bias[11].detach()) == 0.0


# --------------------------------------------------------------------------- UNIT


def test_unit_bounds_start_at_mu_plus_4_sigma_and_only_shrink() -> None:
    torch.manual_seed(0)
    spec = resolve_spec("small_cnn")
    model = SmallCNN(width=8).eval()
    data = random_data(60)
    result = unit(model, spec, data, steps=8, lr=1e-2)
    train = data.subset(torch.tensor(result.info["train_indices"]))
    stats = compute_statistics(model, lambda: iter_batches(train, 64, spec.mean, spec.std), granularity="element")
    expected = stats.bounds(4.0)
    init = result.info["init_bounds"]
    assert set(init) == set(expected)
    for name in expected:
        assert torch.allclose(init[name], expected[name], atol=1e-5)
    clips = [m for m in site_modules(result.model) if isinstance(m, Clip)]
    assert len(clips) == len(expected)
    for clip in clips:
        assert bool((clip.upper <= init[clip.site_name] + 1e-6).all())
    assert result.info["best_total_bound"] <= result.info["init_total_bound"] + 1e-6


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["nad", "mmbd", "clp", "ep", "unit"])
def test_defense_end_to_end(name: str) -> None:
    torch.manual_seed(0)
    spec = resolve_spec("small_cnn")
    model = SmallCNN(width=8).eval()
    data = random_data(64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if name == "nad":
        result = nad(model, spec, data, teacher_epochs=1, epochs=1, batch_size=32)
    elif name == "mmbd":
        result = mmbd_mitigate(model, spec, data, epochs=2, batch_size=32)
        verdict = mmbd_detect(model, spec, num_classes=10, images_per_class=4, steps=5)
        assert 0.0 <= verdict["p_value"] <= 1.0 and len(verdict["statistics"]) == 10
    elif name == "clp":
        result = clp(model, spec)
    elif name == "ep":
        result = ep(model, spec, data, batch=64)
    else:
        result = unit(model, spec, data, steps=3)
    assert isinstance(result, DefenseResult)
    assert not result.model.training
    with torch.no_grad():
        logits = result.model(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 10) and bool(torch.isfinite(logits).all())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{name} modified the victim's {k}"


def test_mmbm_default_sites() -> None:
    from clipguard.defenses.common import site_shapes
    from clipguard.defenses.mmbd import RESNET18_SITES, default_sites

    resnet = resolve_spec("resnet18")
    shapes = site_shapes(resnet.build().eval(), torch.randn(1, 3, 32, 32))
    assert default_sites(resnet, list(shapes)) == list(RESNET18_SITES)
    assert [shapes[s][0] for s in RESNET18_SITES] == [64, 64, 128]
    small = resolve_spec("small_cnn")
    names = list(site_shapes(small.build().eval(), torch.randn(1, 3, 32, 32)))
    assert default_sites(small, names) == names[:2]
