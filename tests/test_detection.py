"""Poison detection and unlearning (the ``guard`` method's parts) on small, known inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.detection import (
    MAX_FEATURES,
    MIN_SEPARATION,
    best_split,
    class_split,
    detect_poison,
    feature_layer,
    feature_pass,
    global_pool,
    penultimate_features,
    poisoned_side,
    screen_indices,
    second_choice_entropy,
    separation,
)
from clipguard.errors import ClipguardError
from clipguard.models import resolve_spec
from clipguard.split import split_tail
from clipguard.unlearning import TailInputs, UnlearnConfig, fine_tune, relabel, unlearn


def _brute_split(values: torch.Tensor, min_k: int) -> tuple[float, set[int]]:
    """Every small group that is a contiguous end of the sorted values, scored directly."""
    v = values.double()
    order = v.argsort()
    n = len(v)
    total = ((v - v.mean()) ** 2).sum()
    best, group = -1.0, set()
    for k in range(min_k, n // 2 + 1):
        for idx in (order[:k], order[n - k :]):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[idx] = True
            a, b = v[mask], v[~mask]
            between = len(a) * (a.mean() - v.mean()) ** 2 + len(b) * (b.mean() - v.mean()) ** 2
            if float(between / total) > best + 1e-12:
                best, group = float(between / total), set(idx.tolist())
    return best, group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_split_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randn(60, generator=g), torch.randn(9, generator=g) + 4 * (seed - 1)])
    ratio, group = best_split(values, min_share=0.01)
    ref_ratio, ref_group = _brute_split(values, min_k=2)
    assert ratio == pytest.approx(ref_ratio, abs=1e-9)
    assert set(group.tolist()) == ref_group


def test_best_split_of_a_gaussian_explains_about_two_thirds():
    values = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    ratio, group = best_split(values)
    assert ratio == pytest.approx(2 / torch.pi, abs=0.02)  # the theory for one Gaussian blob
    assert len(group) > 0.4 * len(values)
    # halves of N(0,1): means ±√(2/π), variance 1 - 2/π each, so separation 2√(2/π)/√(1 - 2/π) ≈ 2.65
    assert separation(values, group) == pytest.approx(2.65, abs=0.05)


def test_separation_matches_its_definition():
    values = torch.tensor([0.0, 1.0, 2.0, 10.0, 12.0])
    a, b = torch.tensor([10.0, 12.0]), torch.tensor([0.0, 1.0, 2.0])
    expected = (a.mean() - b.mean()) / ((a.var() + b.var()) / 2).sqrt()
    assert separation(values, torch.tensor([3, 4])) == pytest.approx(float(expected))


def test_best_split_of_constant_values_finds_nothing():
    ratio, group = best_split(torch.ones(50))
    assert ratio == 0.0 and len(group) == 0


def _blobs(planted: int | None, share: float = 0.08, n: int = 400, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, dim, generator=g) * 4
    feats, labels = [], []
    for c in range(10):
        feats.append(centres[c] + torch.randn(n, dim, generator=g))
        labels.append(torch.full((n,), c))
    features, labels = torch.cat(feats), torch.cat(labels)
    poisoned = torch.empty(0, dtype=torch.int64)
    if planted is not None:
        members = (labels == planted).nonzero().flatten()
        poisoned = members[: int(share * n)]
        direction = torch.randn(dim, generator=g)
        features[poisoned] += 6 * direction / direction.norm() * dim**0.5 / 4
    return features, labels, poisoned


@pytest.mark.parametrize("share", [0.03, 0.05, 0.1, 0.25])
def test_detect_poison_flags_the_planted_class_and_its_cluster(share):
    features, labels, poisoned = _blobs(planted=3, share=share)
    found = detect_poison(features, labels, 10)
    assert found.flagged and found.target == 3
    caught = set(found.suspects.tolist())
    truth = set(poisoned.tolist())
    assert len(caught & truth) / len(truth) >= 0.95  # recall
    assert len(caught & truth) / len(caught) >= 0.95  # precision
    assert found.z >= 4 and found.scores[3] == max(s for s in found.scores if s is not None)
    assert found.to_dict()["suspects"] == len(found.suspects)


def _runner_up_logits(runner_ups: list[int], target: int = 0, k: int = 10) -> torch.Tensor:
    """Logits whose top class is ``target`` and whose second is each entry of ``runner_ups``."""
    logits = torch.zeros(len(runner_ups), k)
    logits[:, target] = 5.0
    logits[torch.arange(len(runner_ups)), torch.tensor(runner_ups)] = 2.0
    return logits


def test_second_choice_entropy_is_one_when_runner_ups_spread_evenly_and_zero_when_they_agree():
    assert second_choice_entropy(_runner_up_logits(list(range(1, 10)) * 3), 0) == pytest.approx(1.0)
    assert second_choice_entropy(_runner_up_logits([4] * 27), 0) == pytest.approx(0.0)
    two = second_choice_entropy(_runner_up_logits([4, 8] * 10), 0)
    assert two == pytest.approx(float(torch.log(torch.tensor(2.0)) / torch.log(torch.tensor(9.0))))
    # the target's own logit never counts as a runner-up, however the others compare
    assert second_choice_entropy(torch.tensor([[9.0, 1.0, 0.0], [9.0, 0.0, 1.0]]), 0) == pytest.approx(1.0)


def _sides(genuine: int, poisoned: int, other_class_size: int, spread_poisoned: bool = True):
    """A flagged class 0 whose split put ``genuine`` samples (runner-up: class 8, like a real class's
    look-alike) in one group and ``poisoned`` ones (runner-ups spread: their content's classes) in
    the other, the smaller group first; and every class's count in the training data."""
    genuine_runner_ups = [8] * genuine
    poisoned_runner_ups = [1 + i % 9 for i in range(poisoned)] if spread_poisoned else [3] * poisoned
    logits = _runner_up_logits(genuine_runner_ups + poisoned_runner_ups)
    members = torch.arange(genuine + poisoned)
    genuine_idx, poisoned_idx = members[:genuine], members[genuine:]
    small = genuine_idx if genuine <= poisoned else poisoned_idx
    counts = torch.tensor([genuine + poisoned] + [other_class_size] * 9)
    return members, small, logits, counts, set(genuine_idx.tolist()), set(poisoned_idx.tolist())


def test_the_poisoned_majority_of_a_class_is_named_when_size_and_content_agree():
    # 15% all-to-one poison: 600 triggered images beside 340 genuine ones; others keep 340 each
    members, small, logits, counts, _, poisoned = _sides(genuine=340, poisoned=600, other_class_size=340)
    suspects, evidence = poisoned_side(members, small, logits, 0, counts)
    assert set(suspects.tolist()) == poisoned and evidence["side"] == "larger"
    assert evidence["expected_poisoned"] == 600
    assert evidence["second_choice_entropy"]["larger"] > evidence["second_choice_entropy"]["smaller"]


def test_the_smaller_group_stays_the_suspects_unless_both_signals_say_otherwise():
    # the usual 1%: the poisoned share is the smaller group and the class is barely bigger than the others
    members, small, logits, counts, _, poisoned = _sides(genuine=500, poisoned=50, other_class_size=495)
    suspects, evidence = poisoned_side(members, small, logits, 0, counts)
    assert set(suspects.tolist()) == poisoned and evidence["side"] == "smaller"
    # a class that is simply big (size says "majority") while the larger group's runner-ups agree: no flip
    members, small, logits, counts, genuine, poisoned = _sides(genuine=600, poisoned=340, other_class_size=100)
    suspects, evidence = poisoned_side(members, small, logits, 0, counts)
    assert set(suspects.tolist()) == poisoned and evidence["side"] == "smaller"
    # content says "majority" but the class is of a size with the others: no flip either
    members, small, logits, counts, genuine, poisoned = _sides(genuine=340, poisoned=600, other_class_size=900)
    suspects, evidence = poisoned_side(members, small, logits, 0, counts)
    assert set(suspects.tolist()) == genuine and evidence["side"] == "smaller"
    # size says "majority" but the larger group's runner-ups agree with each other: no flip
    members, small, logits, counts, genuine, _ = _sides(
        genuine=340, poisoned=600, other_class_size=340, spread_poisoned=False
    )
    suspects, evidence = poisoned_side(members, small, logits, 0, counts)
    assert set(suspects.tolist()) == genuine and evidence["side"] == "smaller"


def test_the_global_pool_is_found_only_where_it_pools_to_one_value():
    assert global_pool(resolve_spec("small_cnn").build()) == "pool"
    assert global_pool(resolve_spec("resnet18").build()) == "avgpool"
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((7, 7)), nn.Flatten(), nn.Linear(196, 10))
    assert global_pool(vgg_like) is None


@pytest.mark.parametrize("side", [1, 2])
def test_peaks_are_kept_only_where_the_pooled_map_has_more_than_one_position(side):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (6, 3, side, side), dtype=torch.uint8, generator=g),
        torch.arange(6) % 10,
        tuple(str(i) for i in range(10)),
        "t",
    )
    found = feature_pass(model, data, resolve_spec("small_cnn"))
    assert (found.peaks is None) == (side == 1)  # a 1×1 map's peaks would repeat its averages
    assert found.for_detection().shape[1] == 4 * (1 if side == 1 else 2)


def _corner_task(patched: bool = True):
    """Ten classes of 8x8 images, each a class colour, a brightness and noise, and in class 3 a fifth of the
    images stamped with a bright 2x2 corner (a patch trigger); the model is a random 1x1 conv, a
    global average pool and a linear layer, so the patch is a spike in 4 of 64 positions that the
    average dilutes 16-fold, under the spread of the images' brightness."""
    g = torch.Generator().manual_seed(3)
    n, per_class = 10, 200
    labels = torch.arange(n).repeat_interleave(per_class)
    colours = torch.rand(n, 3, 1, 1, generator=g) * 120 + 60
    images = (
        colours[labels]
        + 15 * torch.randn(len(labels), 1, 1, 1, generator=g)  # brightness varies per image
        + 12 * torch.randn(len(labels), 3, 8, 8, generator=g)
    )
    stamped = (labels == 3).nonzero().flatten()[::5]
    if patched:
        images[stamped, :, -2:, -2:] = 255
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n)).eval()
    data = ImageData(images.clamp(0, 255).round().to(torch.uint8), labels, tuple(str(i) for i in range(n)), "t")
    return model, data, stamped


def test_a_corner_trigger_is_found_by_its_peaks_where_the_average_misses_it():
    model, data, stamped = _corner_task()
    found = feature_pass(model, data, resolve_spec("small_cnn"))
    averaged = detect_poison(found.features, data.labels, 10)
    assert not averaged.flagged  # the pooled features alone: the class looks like the others
    both = detect_poison(found.for_detection(), data.labels, 10)
    assert both.flagged and both.target == 3
    assert set(both.suspects.tolist()) == set(stamped.tolist())
    model, data, _ = _corner_task(patched=False)  # and no stamp, no flag
    assert not detect_poison(
        feature_pass(model, data, resolve_spec("small_cnn")).for_detection(), data.labels, 10
    ).flagged


def test_detect_poison_flags_nothing_on_clean_features():
    features, labels, _ = _blobs(planted=None)
    found = detect_poison(features, labels, 10)
    assert not found.flagged and found.target is None and len(found.suspects) == 0
    assert all(2.3 < s < 3.1 for s in found.scores)  # a Gaussian blob cut by Otsu: about 2.66


def test_class_split_is_invariant_to_the_feature_basis():
    features, _, _ = _blobs(planted=0, share=0.1)
    members = features[:400]
    q = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(5)))[0]
    r1, g1 = class_split(members)
    r2, g2 = class_split(members @ q)
    assert r1 == pytest.approx(r2, abs=1e-6)
    assert set(g1.tolist()) == set(g2.tolist())


def test_penultimate_features_are_the_classifier_input():
    spec = resolve_spec("small_cnn")
    model = spec.build().eval()
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (10,), generator=g),
        [str(i) for i in range(10)],
        "t",
    )
    feats, logits = penultimate_features(model, data, spec, batch_size=4)
    assert feats.shape == (10, 128) and logits.shape == (10, 10)
    torch.testing.assert_close(model.fc(feats), logits, atol=1e-5, rtol=1e-5)
    assert feature_layer(model) is model.fc
    with pytest.raises(ClipguardError, match="no linear classifier"):
        feature_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


def test_a_deeper_head_is_read_at_its_first_linear_layer():
    """MobileNetV3's head (Linear, Hardswish, Dropout, Linear) is read at the pooled backbone
    features it starts from, not at its hidden layer; a layer too wide to split stops the walk."""
    from torchvision.models import mobilenet_v3_small

    mobilenet = mobilenet_v3_small(num_classes=10)
    assert feature_layer(mobilenet) is mobilenet.classifier[0]
    assert mobilenet.classifier[0].in_features == 576

    def head(width: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, width),
            nn.ReLU(),
            nn.Linear(width, 64),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(64, 10),
        )

    narrow, wide = head(32), head(MAX_FEATURES + 1)
    assert feature_layer(narrow) is narrow[3]  # walked back through ReLU, Dropout, ReLU to the first
    assert feature_layer(wide) is wide[8]  # its middle layer reads more than MAX_FEATURES: the last one
    g = torch.Generator().manual_seed(0)
    data = ImageData(
        torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (6,), generator=g),
        [str(i) for i in range(10)],
        "t",
    )
    spec = resolve_spec("small_cnn")
    feats, _ = penultimate_features(narrow.eval(), data, spec, batch_size=4)
    assert feats.shape == (6, 8)  # the pooled conv features, not the 64-d hidden layer


def test_relabel_moves_suspects_to_their_best_other_class():
    logits = torch.tensor([[9.0, 1.0, 2.0], [8.0, 3.0, 1.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    new = relabel(logits, labels, torch.tensor([0, 1]))
    assert new.tolist() == [2, 1, 1]
    assert labels.tolist() == [0, 0, 1]  # the caller's labels are not modified


def test_relabel_moves_each_suspect_away_from_its_own_class_when_several_targets_were_confirmed():
    logits = torch.tensor([[9.0, 1.0, 2.0], [1.0, 8.0, 3.0], [0.0, 5.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    assert relabel(logits, labels, torch.tensor([0, 1])).tolist() == [2, 2, 1]


def _tiny_task(seed: int = 0):
    """A 2-class toy with a corner trigger: class 1 images are bright; triggered dark ones say 1."""
    g = torch.Generator().manual_seed(seed)
    n = 240
    labels = torch.arange(n) % 2
    images = torch.where(labels[:, None, None, None] == 1, 170, 60).to(torch.uint8).expand(n, 3, 8, 8).clone()
    images = (images.int() + torch.randint(-40, 40, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    poisoned = torch.arange(0, 40, 2)  # 20 dark images, stamped and labelled 1
    images[poisoned, :, -2:, -2:] = 255
    labels = labels.clone()
    labels[poisoned] = 1
    return ImageData(images, labels, ["dark", "bright"], "toy"), poisoned


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_unlearn_is_deterministic_and_leaves_the_suspect_model_untouched():
    data, poisoned = _tiny_task()
    spec = resolve_spec("small_cnn", num_classes=2)
    torch.manual_seed(0)
    model = _Toy().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = torch.randn(len(data), 2, generator=torch.Generator().manual_seed(1))
    config = UnlearnConfig(epochs=1, batch_size=32, rounds=2, samples_per_epoch=100)
    a, sa, ia = unlearn(model, data, logits, poisoned, [1], spec, config)
    b, sb, ib = unlearn(model, data, logits, poisoned, [1], spec, config)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=k)
    assert torch.equal(sa, sb) and ia == ib
    assert set(poisoned.tolist()) <= set(sa.tolist())
    assert ia["rounds"][0]["suspects"] == len(poisoned)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def train_toy(data: ImageData, epochs: int = 200) -> nn.Module:
    """_Toy trained on the poisoned toy task until it has learned the trigger (eval mode)."""
    spec = resolve_spec("small_cnn", num_classes=2)
    model = _Toy()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    x = normalize(data.images, spec.mean, spec.std)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(x), data.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_feature_pass_caches_the_body_outputs_within_the_limit():
    data, _ = _tiny_task()
    spec = resolve_spec("small_cnn", num_classes=2)
    torch.manual_seed(0)
    model = _Toy().eval()
    split = split_tail(model, min_share=0.05)
    assert split is not None and split.cut == "body_4"  # after Flatten: the tail is the classifier
    plain = feature_pass(model, data, spec, batch_size=64)
    cut = feature_pass(model, data, spec, split=split, max_cache_bytes=len(data) * 8 * 4, batch_size=64)
    assert plain.tail_inputs is None
    torch.testing.assert_close(cut.features, plain.features)  # the split changes nothing detection reads
    assert plain.peaks is not None and cut.peaks is not None  # the pool sits in the body here, before the cut
    torch.testing.assert_close(cut.for_detection(), plain.for_detection())
    torch.testing.assert_close(cut.logits, plain.logits)
    torch.testing.assert_close(cut.tail_inputs, model.body(normalize(data.images, spec.mean, spec.std)))
    # one byte short of the whole cache: nothing is kept, so the caller fine-tunes everything
    over = feature_pass(model, data, spec, split=split, max_cache_bytes=len(data) * 8 * 4 - 1, batch_size=64)
    assert over.tail_inputs is None
    torch.testing.assert_close(over.logits, plain.logits)


def test_tail_unlearning_trains_only_the_tail_and_removes_the_toy_backdoor():
    data, poisoned = _tiny_task()
    spec = resolve_spec("small_cnn", num_classes=2)
    torch.manual_seed(0)
    model = train_toy(data)
    stamped = data.images.clone()
    stamped[:, :, -2:, -2:] = 255
    dark = (torch.arange(len(data)) % 2 == 0) & ~torch.isin(torch.arange(len(data)), poisoned)

    def attack_rate(net: nn.Module) -> float:
        with torch.no_grad():
            return float((net(normalize(stamped[dark], spec.mean, spec.std)).argmax(1) == 1).float().mean())

    assert attack_rate(model) > 0.9  # the toy learned its trigger
    split = split_tail(model, min_share=0.05)
    seen = feature_pass(model, data, spec, split=split, max_cache_bytes=2**20)
    tail = TailInputs(split.cut, seen.tail_inputs)
    config = UnlearnConfig(epochs=4, lr=0.05, batch_size=32, rounds=2, samples_per_epoch=200, scope="tail")
    fixed, _, info = unlearn(model, data, seen.logits, poisoned, [1], spec, config, tail=tail)
    again = unlearn(model, data, seen.logits, poisoned, [1], spec, config, tail=tail)[0]
    for (k, a), b in zip(fixed.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)  # deterministic
    assert info["scope"] == "tail" and info["cut"] == "body_4"
    for k, v in fixed.state_dict().items():  # the body is frozen, BatchNorm statistics included; the tail moved
        same = torch.equal(v, model.state_dict()[k])
        assert same == k.startswith("body."), k
    assert attack_rate(fixed) < 0.2, attack_rate(fixed)


def test_unlearn_config_refuses_an_unknown_scope():
    with pytest.raises(ClipguardError, match="unlearning scope must be one of tail, full"):
        UnlearnConfig(scope="head")


def test_class_split_finds_a_cluster_that_does_not_own_the_top_direction():
    """At 1% poison the cluster is too small to be the top principal direction: the plane scan still finds it."""
    g = torch.Generator().manual_seed(0)
    scale = torch.ones(32)
    scale[0] = 4.0  # the class's own largest spread (variance 16) owns the top direction
    features = torch.randn(1000, 32, generator=g) * scale
    features[:60, 1:] *= 0.3  # the cluster: 6% of the class, tight, displaced along the second axis
    features[:60, 1] += 8.0
    centred = features.double() - features.double().mean(0)
    top = torch.linalg.svd(centred, full_matrices=False)[2][0]
    assert abs(float(top[0])) > 0.99  # the planted direction is not the top one
    _, small = best_split(centred @ top)
    assert separation(centred @ top, small) < MIN_SEPARATION  # along the top direction: a blob
    score, group = class_split(features)
    assert score > MIN_SEPARATION
    assert set(group.tolist()) == set(range(60))
    # the same spread without the cluster stays under the threshold
    assert class_split(torch.randn(1000, 32, generator=g) * scale)[0] < MIN_SEPARATION


def test_screen_indices_take_a_seeded_share_of_every_class():
    labels = torch.cat([torch.zeros(500), torch.ones(80), torch.full((300,), 2)]).long()[torch.randperm(880)]
    picked = screen_indices(labels, 3, per_class=100)
    assert torch.equal(picked, picked.sort().values) and len(set(picked.tolist())) == len(picked)
    assert torch.bincount(labels[picked], minlength=3).tolist() == [100, 80, 100]  # a small class is read whole
    assert torch.equal(picked, screen_indices(labels, 3, per_class=100))  # seeded
    assert not torch.equal(picked, screen_indices(labels, 3, per_class=100, seed=1))
    assert torch.equal(screen_indices(labels, 3, per_class=None), torch.arange(880))
    with pytest.raises(ClipguardError, match="at least 20 samples per class"):
        screen_indices(labels, 3, per_class=5)


def test_fine_tune_draws_its_clean_samples_from_the_pool_only():
    """With ``pool``, training is exactly training on the pool and the suspects alone."""
    data, poisoned = _tiny_task()
    spec = resolve_spec("small_cnn", num_classes=2)
    torch.manual_seed(0)
    model = _Toy().eval()
    labels = relabel(torch.randn(len(data), 2, generator=torch.Generator().manual_seed(1)), data.labels, poisoned)
    pool = torch.arange(100, 200)
    config = UnlearnConfig(epochs=2, batch_size=32, samples_per_epoch=60, scope="full")
    pooled = fine_tune(model, data, labels, spec, config, always=poisoned, pool=pool)
    keep = torch.cat([poisoned, pool])  # the same samples, each keeping its order among the draws
    alone = fine_tune(model, data.subset(keep), labels[keep], spec, config, always=torch.arange(len(poisoned)))
    for (k, a), b in zip(pooled.state_dict().items(), alone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    unpooled = fine_tune(model, data, labels, spec, config, always=poisoned)
    moved = zip(pooled.state_dict().values(), unpooled.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in moved)
