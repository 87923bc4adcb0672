"""guard's decision: candidates are confirmed by a graft test before anything is unlearned."""

from __future__ import annotations

import pytest
import torch

from clipguard.defenses.guard import guard_pass

from .toys import SPEC, task

SCREEN = 100
FAST = {"epochs": 1, "rounds": 1, "scope": "full"}


def test_a_confirmed_backdoor_is_unlearned_and_its_samples_named():
    model, data, poisoned = task()
    result = guard_pass(model, data, SPEC, screen_per_class=SCREEN, unlearn_options=FAST)
    verdict = result.verdict
    assert verdict.status == "backdoor_found" and verdict.classes == [3]
    evidence = next(c for c in verdict.candidates if c["class"] == 3)
    assert evidence["confirmed"] and evidence["kind"] == "all_to_one"
    assert evidence["suspects_graft"]["broad"] > 0.9 and evidence["genuine_graft"]["broad"] < 0.5
    named = set(result.unlearning["suspect_indices"])
    assert set(poisoned[3].tolist()) <= named  # named from the whole class, beyond the 100-per-class screen
    assert len(named - set(poisoned[3].tolist())) <= 2
    assert len(result.data) == len(data) - len(named) and result.model is not model
    assert result.detection["flagged"] and result.detection["target"] == 3


def test_a_separate_cluster_without_a_trigger_is_tested_dismissed_and_nothing_is_unlearned():
    model, data, _ = task(backdoors=(), mode_class=3)
    result = guard_pass(model, data, SPEC, screen_per_class=SCREEN, unlearn_options=FAST)
    assert result.verdict.status == "no_evidence" and result.verdict.classes == []
    tested = next(c for c in result.verdict.candidates if c["class"] == 3)
    assert not tested["confirmed"] and not tested["unresolved"] and tested["whole_class_score"] is not None
    assert tested["warp"] is not None  # its split stood out and no pixel pattern carried anything: a warp was sought
    assert result.unlearning is None and result.model is model and result.data is data
    assert not result.detection["flagged"] and result.detection["target"] is None
    assert "tested and dismissed: class 3 (" in result.verdict.summary


def test_a_candidate_with_partial_evidence_is_inconclusive():
    from clipguard.confirmation import Evidence, Transfer
    from clipguard.defenses.guard import _Candidate, _verdict

    half = Transfer([None] + [0.3] * 9, [None] + [0.0] * 9)
    quiet = Transfer([None] + [0.05] * 9, [None] + [0.0] * 9)
    cand = _Candidate(
        4,
        3.9,
        6.0,
        "its split stands out",
        suspects=torch.arange(30),
        evidence=Evidence(4, 30, 300, half, quiet, False, reason="moves some decisions"),
        unresolved=True,
    )
    verdict = _verdict([cand], 4, 6.0)
    assert verdict.status == "inconclusive" and verdict.classes == []
    assert "class 4 stood out but was not confirmed (moves some decisions)" in verdict.summary
    assert verdict.action == "nothing unlearned; clipped"


def test_clean_data_gives_no_evidence():
    model, data, _ = task(backdoors=())
    result = guard_pass(model, data, SPEC, screen_per_class=SCREEN)
    assert result.verdict.status == "no_evidence" and not any(c["unresolved"] for c in result.verdict.candidates)
    assert result.unlearning is None and result.model is model and result.data is data


def test_two_backdoors_towards_different_classes_are_both_confirmed_and_unlearned():
    model, data, poisoned = task(backdoors=(3, 7))
    result = guard_pass(model, data, SPEC, screen_per_class=SCREEN, unlearn_options=FAST)
    assert result.verdict.status == "backdoor_found" and result.verdict.classes == [3, 7]
    named = set(result.unlearning["suspect_indices"])
    assert set(poisoned[3].tolist()) | set(poisoned[7].tolist()) <= named
    assert result.detection["targets"] == [3, 7] and result.detection["target"] is None


def test_a_confirmed_class_the_screen_read_whole_needs_no_second_pass():
    # class 3 keeps 80 genuine images and its 20 poisoned ones: all of it inside the 100-per-class screen
    model, data, poisoned = task()
    members = (data.labels == 3).nonzero().flatten()
    genuine = members[~torch.isin(members, poisoned[3])]
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[genuine[80:]] = False
    small = data.subset(keep.nonzero().flatten())
    result = guard_pass(model, small, SPEC, screen_per_class=SCREEN, unlearn_options=FAST)
    assert result.verdict.status == "backdoor_found" and result.detection["screened"] < result.detection["of"]
    kept_positions = keep.nonzero().flatten()
    named = set(kept_positions[torch.tensor(result.unlearning["suspect_indices"])].tolist())
    assert set(poisoned[3].tolist()) <= named


def test_a_poisoned_majority_of_the_target_class_is_unlearned_not_its_genuine_images():
    # 400 triggered images beside class 0's 200 genuine ones: the triggered images are the larger group
    model, data, by_target = task(backdoors=(0,), poisoned_per_target=400, per_class=200)
    poisoned = by_target[0]
    result = guard_pass(model, data, SPEC, screen_per_class=SCREEN, unlearn_options=FAST)
    assert result.verdict.status == "backdoor_found" and result.verdict.classes == [0]
    entry = next(c for c in result.verdict.candidates if c["class"] == 0)
    # the split's smaller group was the genuine images: the graft found the trigger on the larger one
    assert entry["suspects"] == len(poisoned) and (entry["swapped"] or entry["side"]["side"] == "larger")
    named = set(result.unlearning["suspect_indices"])
    assert len(named & set(poisoned.tolist())) >= 0.95 * len(poisoned)
    assert len(named - set(poisoned.tolist())) <= 0.05 * len(poisoned)  # the genuine class-0 images stay
    assert len(result.data) == len(data) - len(named)


@pytest.mark.parametrize("backdoored", [True, False])
def test_the_report_record_lists_every_candidate_with_its_evidence(backdoored):
    model, data, _ = task(backdoors=(3,) if backdoored else (), mode_class=None if backdoored else 3)
    record = guard_pass(model, data, SPEC, screen_per_class=SCREEN, unlearn_options=FAST).detection
    (entry,) = [c for c in record["candidates"] if c["class"] == 3]
    assert entry["confirmed"] is backdoored and entry["screen_score"] > 0 and entry["why_tested"]
    for group in ("suspects_graft", "genuine_graft"):
        assert set(entry[group]) >= {"broad", "strongest", "redirect", "to_candidate"}
        assert entry[group]["to_candidate"][3] is None and len(entry[group]["to_candidate"]) == 10


def test_guard_keeps_the_papers_lambda_unless_unlearning_removed_what_was_confirmed():
    """λ = 6 follows unlearning only when what was confirmed was unlearned whole: after an all-to-all
    confirmation the classes not confirmed still carry their share of the poison, so the clip keeps λ = 4."""
    from torch import nn

    from clipguard.purify import Cleaned, unlearned_it_all
    from clipguard.verdict import Verdict

    def cleaned(unlearning: dict | None, *kinds: str) -> Cleaned:
        candidates = [{"class": i, "confirmed": True, "kind": k} for i, k in enumerate(kinds)]
        candidates.append({"class": 9, "confirmed": False, "kind": None})
        verdict = Verdict("backdoor_found" if kinds else "no_evidence", [], "", "", candidates)
        return Cleaned(nn.Identity(), None, unlearning=unlearning, verdict=verdict)  # type: ignore[arg-type]

    assert not unlearned_it_all(cleaned(None))
    assert unlearned_it_all(cleaned({"suspects": 10}, "all_to_one"))
    assert unlearned_it_all(cleaned({"suspects": 10}, "warp", "source_specific"))
    assert not unlearned_it_all(cleaned({"suspects": 10}, "all_to_all", "all_to_all"))
    assert not unlearned_it_all(cleaned({"suspects": 10}, "all_to_one", "all_to_all"))
