"""Cutting a network into a frozen body and a trainable tail (what guard's unlearning trains)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clipguard.defenses.clipping import trace
from clipguard.errors import ClipguardError
from clipguard.models import resolve_spec
from clipguard.split import cut_points, split_at, split_tail


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "preact_resnet18", "vgg16_bn"])
def test_tail_of_body_is_the_model_and_shares_its_weights(arch: str) -> None:
    spec = resolve_spec(arch)
    torch.manual_seed(0)
    model = spec.build().eval()
    split = split_tail(model)
    assert split is not None and split.tail_share >= 0.5
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.body(x)), model(x), rtol=1e-5, atol=1e-5)
    model_params = {id(p) for p in model.parameters()}
    tail_params = {id(p) for p in split.tail.parameters()}
    assert tail_params and tail_params <= model_params  # training the tail trains the model itself
    # a later cut would leave the tail less than half the network
    later = [p for p in cut_points(trace(model)) if p.name != split.cut]
    names = [p.name for p in cut_points(trace(model))]
    for point in later[names.index(split.cut) :]:
        assert split_at(model, point.name).tail_share < 0.5, point.name


def test_resnet18_is_cut_at_a_stage_boundary_never_inside_a_block() -> None:
    model = resolve_spec("resnet18").build().eval()
    split = split_tail(model)
    assert split is not None
    names = {p.name for p in cut_points(trace(model))}
    seen = {}
    model.layer3.register_forward_hook(lambda _m, _i, out: seen.setdefault("layer3", out))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(split.body(x), seen["layer3"])  # the tail is layer4 and the classifier
    assert not any(n.startswith("layer4_0_conv") or n.startswith("layer4_0_bn") for n in names)  # skip crosses these


class _Skip(nn.Module):
    """All of its weight sits before a skip connection that spans the whole network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv(x) + x).mean((2, 3)))


def test_no_split_when_the_tail_would_hold_too_little() -> None:
    model = _Skip()
    assert [p.name for p in cut_points(trace(model))] == ["add", "mean", "fc"]  # the input crosses the conv
    assert split_tail(model) is None
    assert split_tail(model, min_share=0.3) is None
    split = split_tail(model, min_share=0.05)  # the last point with the classifier after it
    assert split is not None and split.cut == "mean" and split.tail_share == pytest.approx(8 / 92)


def test_bad_arguments_are_refused() -> None:
    model = resolve_spec("small_cnn").build()
    with pytest.raises(ClipguardError, match="tail share must be in"):
        split_tail(model, min_share=0.0)
    with pytest.raises(ClipguardError, match="no cut point named 'nope'"):
        split_at(model, "nope")
