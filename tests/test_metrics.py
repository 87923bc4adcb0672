"""ACC/ASR/RA/DER conventions on models whose behaviour is known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.attacks import build_attack
from clipguard.data import ImageData
from clipguard.metrics import der, evaluate

K = 10
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # normalisation that keeps pixels in [0, 1]


def _data(n_per_class: int = 20) -> ImageData:
    """Random images whose label is written into pixel (0, 0) of the red channel."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(K).repeat_interleave(n_per_class)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=gen, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 20).to(torch.uint8)
    return ImageData(images, labels, tuple(str(i) for i in range(K)))


class ReadsTheLabelPixel(nn.Module):
    """Perfect on clean data and blind to a bottom-right patch: it only looks at pixel (0, 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = torch.round(x[:, 0, 0, 0] * 255 / 20).long()
        return nn.functional.one_hot(label, K).float()


class Backdoored(ReadsTheLabelPixel):
    """Same, but a white bottom-right corner sends everything to class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        triggered = x[:, :, -3:, -3:].amin(dim=(1, 2, 3)) > 0.99
        logits[triggered] = nn.functional.one_hot(torch.zeros_like(triggered, dtype=torch.long), K)[triggered].float()
        return logits


def test_a_model_that_ignores_the_trigger_has_asr_at_the_base_rate():
    data = _data()
    r = evaluate(ReadsTheLabelPixel(), data, *IDENTITY, attack=build_attack("badnets"))
    assert r["acc"] == 1.0 and r["per_class_acc"] == [1.0] * K
    assert r["asr"] == 0.0  # target-class images are excluded from the primary ASR
    assert r["asr_all"] == pytest.approx(1 / K)  # ... and are the whole floor of the inclusive one
    assert r["ra"] == 1.0
    assert r["asr_samples"] == len(data) - 20


def test_a_backdoored_model_has_full_asr_and_no_robust_accuracy():
    data = _data()
    r = evaluate(Backdoored(), data, *IDENTITY, attack=build_attack("badnets"))
    assert r["acc"] == 1.0 and r["asr"] == 1.0 and r["asr_all"] == 1.0 and r["ra"] == 0.0


def test_all_to_all_targets_are_the_next_class():
    data = _data()
    r = evaluate(ReadsTheLabelPixel(), data, *IDENTITY, attack=build_attack("badnets-all2all"))
    assert r["asr"] == 0.0 and r["asr_samples"] == len(data)  # no image is already "on target"


class SquareToZero(ReadsTheLabelPixel):
    """A TaCT victim that learned the trigger on every class: the square sends any image to class 0."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.square = pattern[:, 21:29, 21:29].float() / 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        triggered = (x[:, :, 21:29, 21:29] - self.square).abs().amax(dim=(1, 2, 3)) < 1e-6
        logits[triggered] = nn.functional.one_hot(torch.zeros_like(triggered, dtype=torch.long), K)[triggered].float()
        return logits


def test_source_specific_asr_counts_the_source_classes_only():
    data = _data()
    tact = build_attack("tact:source=1,2")
    r = evaluate(SquareToZero(tact.pattern), data, *IDENTITY, attack=tact)
    assert r["asr"] == 1.0 and r["asr_samples"] == 40  # classes 1 and 2, 20 images each
    assert r["asr_all"] == 1.0 and r["ra"] == 0.0
    clean = evaluate(ReadsTheLabelPixel(), data, *IDENTITY, attack=tact)
    assert clean["asr"] == 0.0 and clean["asr_all"] == 0.0 and clean["ra"] == 1.0  # target 0 is no source


def test_clean_label_sig_asr_excludes_the_target_class_as_before():
    data = _data()
    r = evaluate(ReadsTheLabelPixel(), data, *IDENTITY, attack=build_attack("sig"))
    assert r["asr_samples"] == len(data) - 20 and r["asr"] == 0.0 and r["asr_all"] == pytest.approx(1 / K)


def test_der_follows_backdoorbench():
    before = {"acc": 0.90, "asr": 0.95}
    assert der(before, {"acc": 0.88, "asr": 0.05}) == pytest.approx((0.90 - 0.02 + 1) / 2)
    assert der(before, {"acc": 0.91, "asr": 0.99}) == pytest.approx(0.5)  # no gain counts as 0, not negative
    assert der(before, before) == 0.5


def test_absent_classes_have_no_accuracy_and_reports_stay_strict_json():
    import json

    from clipguard.report import json_safe

    data = _data()
    only_three = data.subset(torch.nonzero(data.labels < 3).flatten())
    r = evaluate(ReadsTheLabelPixel(), only_three, *IDENTITY)
    assert r["per_class_acc"][:3] == [1.0, 1.0, 1.0] and r["per_class_acc"][3:] == [None] * 7
    assert json.loads(json.dumps(json_safe({"a": float("nan"), "b": [1.0, float("inf")]}), allow_nan=False)) == {
        "a": None,
        "b": [1.0, None],
    }
