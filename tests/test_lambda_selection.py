"""``--lam auto``: the two rules choose differently exactly where they should.

A hand-built network with one "trigger" unit makes the arithmetic checkable. 30 of 330 training
samples carry a trigger pixel and the target label 0; their trigger unit fires at 1000 and
outweighs their clean unit (600). Clipping the trigger unit at μ + λσ (μ ≈ 91, σ ≈ 287)
undoes the trigger for λ = 1 and 1.5 (bound 378, 522 < 600) and not from λ = 2 (666). No clean
sample changes its prediction at any λ on the grid.

* ``class_drop`` (the paper's recipe, a model that may still carry a backdoor): the lost
  predictions all sit in class 0, the class it sets aside, so λ = 1 is accepted.
* ``agreement`` (guard, the backdoor already unlearned): 30 / 330 = 9% of decisions change at
  λ = 1 and 1.5, over the 2% tolerance, so it picks λ = 2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.data import ImageData, iter_batches
from clipguard.defenses.clipping import compute_statistics
from clipguard.lambda_selection import select_lambda
from clipguard.models import ModelSpec

SPEC = ModelSpec("hand_built", 3, (4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
TRIGGER, CLASS_1, CLASS_2 = 0, 1, 2  # flattened pixel positions (channel 0, row 0)


def hand_built() -> nn.Module:
    first, second = nn.Linear(48, 3), nn.Linear(3, 3)
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_(), second.weight.zero_()
        first.weight[0, TRIGGER], first.weight[1, CLASS_1], first.weight[2, CLASS_2] = 1000.0, 600.0, 600.0
        second.weight.copy_(torch.eye(3))
        second.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))  # class 0 wins when nothing fires
    return nn.Sequential(nn.Flatten(), first, nn.ReLU(), second).eval()


def training_data() -> ImageData:
    images = torch.zeros(330, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(330, dtype=torch.int64)
    flat = images.view(330, -1)
    flat[100:200, CLASS_1] = 255
    labels[100:200] = 1
    flat[200:300, CLASS_2] = 255
    labels[200:300] = 2
    flat[300:315, CLASS_1] = 255  # triggered samples: clean content of class 1 or 2, trigger, label 0
    flat[315:330, CLASS_2] = 255
    flat[300:330, TRIGGER] = 255
    return ImageData(images, labels, ("a", "b", "c"), "hand-built")


@pytest.mark.parametrize(("rule", "expected"), [("class_drop", 1.0), ("agreement", 2.0)])
def test_each_rule_takes_the_smallest_lambda_it_accepts(rule, expected):
    model, data = hand_built(), training_data()
    stats = compute_statistics(model, lambda: iter_batches(data, 128, SPEC.mean, SPEC.std, "cpu"))
    lam, evidence = select_lambda(model, stats, data, SPEC, rule=rule)
    assert lam == expected and evidence["chosen"] == expected and evidence["criterion"] == rule
    rows = evidence["sweep"]
    assert [r["accepted"] for r in rows] == [False] * (len(rows) - 1) + [True]  # stops at the first accepted
    first = rows[0]  # λ = 1: exactly the 30 triggered samples change their decision
    assert first["agreement"] == pytest.approx(300 / 330)
    assert first["most_affected_class"] == 0 and first["mean_drop_others"] == 0.0
    assert first["drop_by_class"][0] == pytest.approx(30 / 130)


def test_unknown_rules_are_refused():
    model, data = hand_built(), training_data()
    stats = compute_statistics(model, lambda: iter_batches(data, 128, SPEC.mean, SPEC.std, "cpu"))
    with pytest.raises(ValueError, match="rule must be one of"):
        select_lambda(model, stats, data, SPEC, rule="vibes")


def brute_force_choice(model, stats, data, rule, tolerance=0.02) -> float:
    """The rule applied to full predictions at every λ: what the early-stopping sweep must reproduce."""
    from clipguard.defenses.clipping import clipped_model
    from clipguard.lambda_selection import DEFAULT_GRID, accuracy_by_class
    from clipguard.metrics import predict

    ref = predict(model, data, SPEC.mean, SPEC.std)
    base = accuracy_by_class(ref, data.labels, 3)
    for lam in DEFAULT_GRID:
        pred = predict(clipped_model(model, stats.bounds(lam)), data, SPEC.mean, SPEC.std)
        drops = sorted(b - a for a, b in zip(accuracy_by_class(pred, data.labels, 3), base, strict=True))
        value = sum(drops[:-1]) / 2 if rule == "class_drop" else float((pred != ref).float().mean())
        if value <= tolerance:
            return lam
    return max(DEFAULT_GRID)


@pytest.mark.parametrize("rule", ["class_drop", "agreement"])
def test_the_sweep_stops_scoring_a_lambda_once_it_cannot_pass_and_still_chooses_the_same(rule):
    """Scoring stops at the first batch after which the rule could no longer accept a λ; that saves
    most of the work on a hard-clipped grid, and the choice equals the full computation's."""
    torch.manual_seed(2)  # a random net whose hard clips change many decisions, as a trained one's do
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(128, 3),
    ).eval()
    images = torch.randint(0, 256, (600, 3, 4, 4), dtype=torch.uint8)
    probe = ImageData(images, torch.zeros(600, dtype=torch.int64), ("a", "b", "c"), "random")
    from clipguard.metrics import predict

    labels = predict(model, probe, SPEC.mean, SPEC.std)  # the model is right on its training data
    labels[:12] = (labels[:12] + 1) % 3  # except a few, as any real model
    data = ImageData(images, labels, ("a", "b", "c"), "random")
    stats = compute_statistics(model, lambda: iter_batches(data, 128, SPEC.mean, SPEC.std, "cpu"))
    lam, evidence = select_lambda(model, stats, data, SPEC, rule=rule, batch_size=20)
    assert lam == brute_force_choice(model, stats, data, rule)
    rows = evidence["sweep"]
    assert rows[-1]["samples"] == 600 and rows[-1]["accepted"]
    stopped = [r for r in rows if r["samples"] < 600]
    assert stopped and not any(r["accepted"] for r in stopped)
