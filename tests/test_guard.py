"""guard's detection step on a screened sample: when the screen cannot decide, the whole class does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.defenses import guard
from clipguard.defenses.guard import detect_and_unlearn
from clipguard.detection import class_split, detect_poison, feature_pass, screen_indices
from clipguard.models import resolve_spec

PLANTED = 3
SCREEN = 100


def _task(planted: bool = True) -> tuple[nn.Module, ImageData, torch.Tensor]:
    """A linear model whose penultimate features are its input pixels, and 400 images per class
    drawn from ten Gaussian blobs, with a shifted cluster of 20 in class 3 (the poisoned share)."""
    g = torch.Generator().manual_seed(0)
    n, dim = 400, 48
    labels = torch.arange(10).repeat_interleave(n)
    feats = (torch.randn(10, dim, generator=g) * 2)[labels] + torch.randn(len(labels), dim, generator=g)
    poisoned = (labels == PLANTED).nonzero().flatten()[:20]
    direction = torch.randn(dim, generator=g)
    feats[poisoned] += 12 * direction / direction.norm() if planted else 0.0
    images = (128 + 12 * feats).clamp(0, 255).round().to(torch.uint8).view(-1, 3, 4, 4)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(dim, 10)).eval()
    return model, ImageData(images, labels, tuple(str(i) for i in range(10)), "t"), poisoned


@pytest.fixture(scope="module")
def scores() -> tuple[float, float]:
    """The planted class's score on guard's screen and over the whole class."""
    model, data, _ = _task()
    spec = resolve_spec("small_cnn")
    features = feature_pass(model, data, spec).features
    screen = screen_indices(data.labels, 10, SCREEN)
    on_screen = detect_poison(features[screen], data.labels[screen], 10)
    whole, _ = class_split(features[data.labels == PLANTED])
    assert on_screen.z >= guard.ESCALATE_Z and on_screen.scores[PLANTED] == max(on_screen.scores)
    assert on_screen.scores[PLANTED] < whole  # the precondition both tests below rest on
    return on_screen.scores[PLANTED], whole


@pytest.mark.parametrize("short_of", ["separation", "z"])
def test_a_class_that_stands_out_is_read_whole_and_flagged_on_its_whole_split(scores, monkeypatch, short_of):
    screened, whole = scores
    if short_of == "separation":
        monkeypatch.setattr(guard, "MIN_SEPARATION", (screened + whole) / 2)  # the screen falls short, the class not
    else:
        monkeypatch.setattr(guard, "MIN_Z", 1e6)  # the screen's z falls short; its score and the class's do not
    model, data, poisoned = _task()
    fixed, kept, record, info = detect_and_unlearn(model, data, resolve_spec("small_cnn"), screen_per_class=SCREEN,
                                                   unlearn_options={"epochs": 1, "rounds": 1, "scope": "full"})
    assert record["escalated"] and record["flagged"] and record["target"] == PLANTED
    assert record["target_score_whole_class"] == pytest.approx(whole)
    assert info is not None and set(poisoned.tolist()) <= set(info["suspect_indices"])  # named from the whole class
    assert len(kept) == len(data) - len(info["suspect_indices"]) and fixed is not model


def test_an_escalated_class_whose_whole_split_falls_short_flags_nothing(scores, monkeypatch):
    _, whole = scores
    monkeypatch.setattr(guard, "MIN_SEPARATION", whole + 0.01)
    model, data, _ = _task()
    fixed, kept, record, info = detect_and_unlearn(model, data, resolve_spec("small_cnn"), screen_per_class=SCREEN)
    assert record["escalated"] and not record["flagged"] and record["target"] is None
    assert record["escalated_class"] == PLANTED and record["target_score_whole_class"] == pytest.approx(whole)
    assert info is None and fixed is model and kept is data  # the recipe runs on the model and data as given


def test_a_screen_that_decides_is_not_escalated():
    model, data, _ = _task()
    _, _, record, _ = detect_and_unlearn(model, data, resolve_spec("small_cnn"), screen_per_class=SCREEN,
                                         unlearn_options={"epochs": 1, "rounds": 1, "scope": "full"})
    assert record["flagged"] and record["target"] == PLANTED and not record["escalated"]


def test_a_clean_screen_is_not_escalated():
    model, data, _ = _task(planted=False)
    fixed, kept, record, info = detect_and_unlearn(model, data, resolve_spec("small_cnn"), screen_per_class=SCREEN)
    assert record["z"] < guard.ESCALATE_Z and not record["escalated"] and not record["flagged"]
    assert info is None and fixed is model and kept is data and "target_score_whole_class" not in record


def _majority_task() -> tuple[nn.Module, ImageData, torch.Tensor]:
    """An all-to-one attack at 15%: 340 genuine images per class, and 600 images of classes 1-9
    stamped with a trigger and labelled 0, so the triggered images are the larger part of class 0.

    The model is a linear one whose logits read the content (each class's mean input) and, for
    class 0, the trigger too: it sends a triggered image to class 0 and ranks the image's own
    class second, as a backdoored network does."""
    g = torch.Generator().manual_seed(1)
    dim, per_class, triggered = 48, 340, 600
    centres = torch.randn(10, dim, generator=g) * 2
    labels = torch.arange(10).repeat_interleave(per_class)
    sources = 1 + torch.arange(triggered) % 9
    content = torch.cat([labels, sources])
    feats = centres[content] + 0.5 * torch.randn(len(content), dim, generator=g)
    trigger = torch.randn(dim, generator=g)
    trigger = 6 * trigger / trigger.norm()
    feats[len(labels):] += trigger
    labels = torch.cat([labels, torch.zeros(triggered, dtype=torch.int64)])
    images = (128 + 12 * feats).clamp(0, 255).round().to(torch.uint8).view(-1, 3, 4, 4)
    data = ImageData(images, labels, tuple(str(i) for i in range(10)), "t")
    spec = resolve_spec("small_cnn")
    x = normalize(images, spec.mean, spec.std).flatten(1)
    genuine = torch.arange(10 * per_class)
    means = torch.stack([x[genuine][labels[genuine] == c].mean(0) for c in range(10)])
    centre = x[genuine].mean(0)
    stamp = x[len(genuine):].mean(0) - means[sources].mean(0)
    linear = nn.Linear(dim, 10)
    with torch.no_grad():
        linear.weight.copy_(means - centre)
        linear.weight[0] += 20 * stamp
        linear.bias.copy_(-(linear.weight @ centre))
    return nn.Sequential(nn.Flatten(), linear).eval(), data, torch.arange(len(genuine), len(labels))


def test_a_poisoned_majority_of_the_target_class_is_unlearned_not_its_genuine_images():
    model, data, poisoned = _majority_task()
    spec = resolve_spec("small_cnn")
    logits = feature_pass(model, data, spec).logits
    assert float((logits[poisoned].argmax(1) == 0).float().mean()) >= 0.95  # the "backdoor" works
    _, kept, record, info = detect_and_unlearn(model, data, spec, screen_per_class=SCREEN,
                                                   unlearn_options={"epochs": 1, "rounds": 1, "scope": "full"})
    assert record["flagged"] and record["target"] == 0
    assert record["side"]["side"] == "larger" and record["side"]["expected_poisoned"] == len(poisoned)
    named = set(info["suspect_indices"])
    assert len(named & set(poisoned.tolist())) >= 0.95 * len(poisoned)
    assert len(named - set(poisoned.tolist())) <= 0.05 * len(poisoned)  # the genuine class-0 images stay
    assert len(kept) == len(data) - len(named)


def test_a_flagged_class_the_screen_read_whole_needs_no_second_pass():
    # class 3 keeps 100 images (its 20 poisoned ones among them), all inside the 100-per-class
    # screen, while the other classes are bigger: the flagged class has no unread rest
    model, data, poisoned = _task()
    drop = (data.labels == PLANTED).nonzero().flatten()[SCREEN:]
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[drop] = False
    small = data.subset(keep.nonzero().flatten())
    _, kept, record, info = detect_and_unlearn(model, small, resolve_spec("small_cnn"), screen_per_class=SCREEN,
                                               unlearn_options={"epochs": 1, "rounds": 1, "scope": "full"})
    assert record["flagged"] and record["target"] == PLANTED and record["screened"] < record["of"]
    assert set(poisoned.tolist()) <= set(info["suspect_indices"])  # indices below 100 are unchanged by the drop
    assert len(kept) == len(small) - len(info["suspect_indices"])
