"""The graft test that confirms a candidate before guard acts on it."""

from __future__ import annotations

import pytest
import torch

from clipguard.confirmation import GraftTest, Transfer, graft, judge, reference_indices
from clipguard.data import ImageData

from .toys import SPEC, stamp, task


def _images(n: int, seed: int) -> torch.Tensor:
    """Natural-looking variety: every pixel varies a lot from image to image."""
    g = torch.Generator().manual_seed(seed)
    return (128 + 50 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_a_patch_group_grafts_the_patch_itself():
    group, reference, onto = stamp(_images(400, 0)), _images(400, 1), _images(50, 2)
    out = graft(group, reference, onto)
    assert torch.equal(out[:, :, :2, :2], torch.full_like(out[:, :, :2, :2], 255))  # pasted where the group is constant
    rest = (out.float() - onto.float())[:, :, 2:, 2:]
    assert float(rest.abs().mean()) < 8  # elsewhere the image keeps its content (up to sampling noise)


def test_a_blended_group_grafts_the_blend():
    alpha, pattern = 0.3, _images(1, 3)[0].float()
    group = ((1 - alpha) * _images(2000, 0).float() + alpha * pattern).round().to(torch.uint8)
    reference, onto = _images(2000, 1), _images(50, 2)
    expected = (1 - alpha) * onto.float() + alpha * pattern
    assert float((graft(group, reference, onto).float() - expected).abs().mean()) < 3


def test_an_additive_group_grafts_the_addition():
    wave = (20 * torch.sin(torch.arange(8) * 6.28 * 2 / 8)).view(1, 1, 1, 8)
    base = 128 + 20 * torch.randn(2000, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    group = (base + wave).round().clamp(0, 255).to(torch.uint8)
    reference = (
        (128 + 20 * torch.randn(2000, 3, 8, 8, generator=torch.Generator().manual_seed(1))).round().to(torch.uint8)
    )
    onto = reference[:50]
    assert float((graft(group, reference, onto).float() - (onto.float() + wave)).abs().mean()) < 2


def _transfer(to_candidate: list[float | None], redirected: list[float | None] | None = None) -> Transfer:
    return Transfer(to_candidate, redirected if redirected is not None else list(to_candidate))


def test_judge_names_the_kind_of_backdoor_or_none():
    quiet = _transfer([None] + [0.05] * 9)
    assert judge(_transfer([None] + [0.9] * 9), quiet)[0] == "all_to_one"
    assert judge(_transfer([None, 0.95] + [0.02] * 8), quiet)[0] == "source_specific"
    # one look-alike source following a genuine-looking pattern is not enough
    assert judge(_transfer([None, 0.55] + [0.02] * 8), quiet)[0] is None
    # each source sent to a class of its own (k -> k + 1): all-to-all; every source sent to one class: nothing
    each_own = Transfer([None] + [0.1] * 9, [None] + [0.8] * 9, [None] + [(k + 1) % 10 for k in range(1, 10)])
    assert judge(each_own, quiet)[0] == "all_to_all"
    one_look = Transfer([None] + [0.1] * 9, [None] + [0.8] * 9, [None] + [7] * 9)
    assert one_look.redirect == 0.0 and judge(one_look, quiet)[0] is None
    kind, reason = judge(quiet, quiet)
    assert kind is None and "moves few decisions" in reason
    # a genuine group that moves decisions as much is no evidence, however strong the suspects' graft
    loud = _transfer([None] + [0.9] * 9)
    assert judge(loud, _transfer([None] + [0.8] * 9))[0] is None


@pytest.fixture(scope="module")
def backdoored():
    return task(backdoors=(3,))


def test_the_graft_of_a_backdoors_suspects_moves_decisions_and_the_genuine_groups_does_not(backdoored):
    model, data, poisoned = backdoored
    test = GraftTest(model, data.images, data.labels, SPEC)
    genuine = ((data.labels == 3) & ~torch.isin(torch.arange(len(data)), poisoned[3])).nonzero().flatten()
    evidence = test.confirm(data, poisoned[3], genuine, 3)
    assert evidence.confirmed and evidence.kind == "all_to_one" and not evidence.swapped
    assert evidence.suspect_transfer.broad > 0.9 and evidence.genuine_transfer.broad < 0.2
    # the same two groups named the other way round: the trigger is found on the other side
    swapped = test.confirm(data, genuine, poisoned[3], 3)
    assert swapped.confirmed and swapped.swapped and swapped.suspects == len(poisoned[3])


def test_a_natural_mode_is_not_confirmed():
    model, data, _ = task(backdoors=(), mode_class=3)
    test = GraftTest(model, data.images, data.labels, SPEC)
    members = (data.labels == 3).nonzero().flatten()
    evidence = test.confirm(data, members[::5], members[members % 5 != 0], 3)  # the darker fifth, and the rest
    assert not evidence.confirmed and evidence.kind is None and not test.unresolved(evidence)


def test_too_small_a_group_is_not_tested(backdoored):
    model, data, poisoned = backdoored
    evidence = GraftTest(model, data.images, data.labels, SPEC).confirm(data, poisoned[3][:5], poisoned[3][5:], 3)
    assert not evidence.confirmed and evidence.suspect_transfer is None and "too few" in evidence.reason


def test_reference_images_are_a_seeded_draw_of_each_class():
    labels = torch.arange(10).repeat_interleave(50)
    refs = reference_indices(labels, 10, per_class=7)
    assert [len(r) for r in refs] == [7] * 10 and all(bool((labels[r] == c).all()) for c, r in enumerate(refs))
    assert all(torch.equal(a, b) for a, b in zip(refs, reference_indices(labels, 10, per_class=7), strict=True))


class _Stamp:
    """The toy's trigger as an attack object (``apply`` + ``target_labels``), for ASR."""

    def __init__(self, target: int) -> None:
        self.target = target

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return stamp(images)

    def target_labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return torch.full_like(labels, self.target)


def test_the_reactivation_check_tunes_a_copy_and_reports_asr_and_agreement(backdoored):
    from clipguard.reactivation import ReactivationConfig, reactivation_check

    model, data, poisoned = backdoored
    keep = ~torch.isin(torch.arange(len(data)), poisoned[3])
    kept = data.subset(keep.nonzero().flatten())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = ReactivationConfig(samples=200, epochs=2, batch_size=50)
    record = reactivation_check(
        model, kept, SPEC, eval_data=kept.subset(torch.arange(0, len(kept), 3)), attack=_Stamp(3), config=config
    )
    assert record["tuned_on"] == 200 and record["protocol"]["epochs"] == 2
    assert 0.0 <= record["agreement"] <= 1.0 and record["agreement_on"] == "evaluation data"
    assert record["after"]["asr"] > 0.5  # nothing removed this toy's backdoor, so the tuned copy keeps it
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the model itself is untouched
    blind = reactivation_check(model, kept, SPEC, config=config)  # no evaluation data: agreement on unseen images
    assert "after" not in blind and blind["agreement_on"].startswith("training images")


def test_reactivation_settings_out_of_range_are_refused():
    from clipguard.errors import ClipguardError
    from clipguard.reactivation import ReactivationConfig

    with pytest.raises(ClipguardError, match="out of range"):
        ReactivationConfig(lr=0)


def test_a_group_of_look_alikes_is_not_a_trigger_though_its_graft_moves_decisions(backdoored):
    # A clean ResNet-18 had a 19-image group of near-identical class images: grafting their near-constant
    # pixels pasted the class's look onto other images and sent half of them to the class.
    model, data, poisoned = backdoored
    members = ((data.labels == 5) & ~torch.isin(torch.arange(len(data)), poisoned[3])).nonzero().flatten()
    g = torch.Generator().manual_seed(0)
    one = data.images[members[:1]]
    copies = one.repeat(20, 1, 1, 1).short() + torch.randint(-2, 3, (20, *one.shape[1:]), generator=g)
    look_alikes = ImageData(
        torch.cat([data.images, copies.clamp(0, 255).to(torch.uint8)]),
        torch.cat([data.labels, torch.full((20,), 5)]),
        data.classes,
        "look-alikes",
    )
    group = torch.arange(len(data), len(look_alikes))
    test = GraftTest(model, data.images, data.labels, SPEC)
    evidence = test.confirm(look_alikes, group, members, 5)
    assert judge(evidence.suspect_transfer, evidence.genuine_transfer)[0] is not None  # the graft did move them
    assert not evidence.confirmed and "look alike" in evidence.reason, evidence.reason
    assert test.uniform_share(data.images[poisoned[3]], 3) < 0.1  # a patch trigger's group stays varied
