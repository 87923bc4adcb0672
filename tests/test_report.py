"""report.json's typed model: real runs validate, the doc is generated from it, old readers survive new fields."""

from __future__ import annotations

import json
import math
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ValidationError

from clipguard.data import ImageData, save_npz
from clipguard.purify import PurifyOptions, purify
from clipguard.report import (
    SCHEMA,
    PoisonDetection,
    Report,
    Unlearning,
    Verdict,
    json_safe,
    markdown,
    publishable,
    read,
)

ROOT = Path(__file__).resolve().parents[1]


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    """Every field the model did not declare, at any depth: what the writer wrote and the schema does not say."""
    found = [f"{path}.{k}" for k in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                found += unknown_fields(item, f"{path}.{name}[{i}]" if isinstance(value, list) else f"{path}.{name}")
    return found


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_file) -> dict[str, Path]:
    """Random 32x32 images for a randomly initialised SmallCNN: every section of a report, none of the cost."""
    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    classes = tuple(f"c{i}" for i in range(10))
    images = torch.randint(0, 256, (200, 3, 32, 32), generator=g, dtype=torch.uint8)
    save_npz(ImageData(images, torch.arange(10).repeat_interleave(20), classes), root / "train.npz")
    # Only class 0, the attack's target: no image counts towards ASR, which is NaN in the engine and null here.
    save_npz(ImageData(images[:40], torch.zeros(40, dtype=torch.int64), classes), root / "test.npz")
    return {"root": root, "weights": model_file, "train": root / "train.npz", "test": root / "test.npz"}


def _run(tiny: dict[str, Path], name: str, **options) -> dict:
    out = tiny["root"] / name
    purify(
        PurifyOptions(
            arch="small_cnn",
            weights=tiny["weights"],
            data=str(tiny["train"]),
            out=out,
            device="cpu",
            cache_dir=tiny["root"] / "cache",
            sweep=False,
            **options,
        )
    )
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("method", ["paper", "guard"])
def test_a_real_report_validates_and_the_model_describes_every_field(tiny, method):
    extra = {"reactivation_check": True} if method == "guard" else {}
    written = _run(tiny, method, method=method, eval_data=str(tiny["test"]), attack="badnets", **extra)
    report = Report.model_validate(written)
    assert report.schema_ == SCHEMA and report.method == method
    assert unknown_fields(report) == []
    assert report.dump() == written  # the file is the model's dump: nothing added, dropped or re-typed
    assert report.evaluation is not None and report.evaluation.before.asr is None  # NaN in the engine, null here
    if method == "guard":
        assert report.verdict is not None and report.poison_detection is not None and report.reactivation is not None
        assert report.verdict.status in ("backdoor_found", "no_evidence", "inconclusive")
        from clipguard.worker.tasks import _summary

        summary = _summary(written)  # what the job's row keeps: the report's own numbers
        assert summary["reactivation"]["after"] == written["reactivation"]["after"]
        assert (
            summary["before"] == written["evaluation"]["before"]
            and summary["verdict"]["status"] == written["verdict"]["status"]
        )
    else:
        assert report.verdict is None and report.poison_detection is None


def test_guards_sections_for_a_confirmed_backdoor_validate():
    from clipguard.defenses.guard import guard_pass

    from .toys import SPEC, task

    model, data, _ = task()
    found = guard_pass(
        model, data, SPEC, screen_per_class=100, unlearn_options={"epochs": 1, "rounds": 1, "scope": "full"}
    )
    verdict = Verdict.model_validate(json_safe(found.verdict.to_dict()))
    detection = PoisonDetection.model_validate(json_safe(found.detection))
    unlearning = Unlearning.model_validate(json_safe(found.unlearning))
    assert verdict.status == "backdoor_found" and verdict.classes == [3]
    confirmed = next(c for c in verdict.candidates if c.class_ == 3)
    assert confirmed.confirmed and confirmed.suspects_graft is not None and confirmed.kind == "all_to_one"
    assert detection.flagged and detection.targets == [3] and unlearning.suspect_indices
    assert [unknown_fields(m) for m in (verdict, detection, unlearning)] == [[], [], []]


def minimal() -> dict:
    """The smallest report a paper run without evaluation writes."""
    return {
        "schema": SCHEMA,
        "clipguard_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "inputs": {
            "model": {
                "arch": "small_cnn",
                "num_classes": 10,
                "input_size": [32, 32],
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "weights": "w.safetensors",
                "sha256": "ab",
            },
            "data": {"ref": "d.npz", "sha256": "cd", "samples": 4, "classes": ["a", "b"], "image_size": [32, 32]},
        },
        "method": "paper",
        "verdict": None,
        "lam": 4.0,
        "lam_selection": None,
        "poison_detection": None,
        "unlearning": None,
        "granularity": "channel",
        "statistics": {"samples": 4, "of": 4, "max_samples": 5000, "seed": 1},
        "sites": [{"name": "relu", "shape": [8, 1, 1], "clip_fraction": 0.01}],
        "export": {
            "torchscript": {
                "format": "torchscript",
                "method": "script",
                "batch": 4,
                "max_abs_diff": 0.0,
                "tolerance": 1e-5,
                "ok": True,
            },
            "torch_export": {"format": "torch.export", "ok": False, "error": "Unsupported: x"},
        },
        "evaluation": {
            "data": {"ref": "t.npz", "sha256": "ef", "samples": 2},
            "attack": None,
            "before": {"samples": 2, "acc": 0.5, "per_class_acc": [1.0, 0.0]},
            "after": {"samples": 2, "acc": float("nan"), "per_class_acc": [None, float("inf")]},
            "der": None,
        },
        "reactivation": None,
        "detection": None,
        "device": "cpu (2 threads)",
        "torch_version": "2.0",
        "timings": {"load_s": 0.1, "total_s": 1.0},
        "artifacts": ["purified.pt", "report.json"],
    }


def test_a_report_from_a_newer_writer_with_fields_this_reader_does_not_know_is_read_and_keeps_them():
    newer = minimal()
    newer["provenance"] = {"host": "x"}
    newer["evaluation"]["before"]["calibration_error"] = 0.03
    newer["timings"]["warmup_s"] = 0.5
    report = read(json.dumps(publishable(newer)))
    assert report.evaluation is not None and report.evaluation.before.acc == 0.5
    assert report.model_extra == {"provenance": {"host": "x"}}
    assert report.timings.model_extra == {"warmup_s": 0.5}
    assert report.dump()["evaluation"]["before"]["calibration_error"] == 0.03


def test_a_report_of_another_schema_version_is_refused():
    assert typing.get_args(Report.model_fields["schema_"].annotation) == (SCHEMA,)  # writes what it reads
    with pytest.raises(ValidationError, match="schema"):
        read(json.dumps(publishable(minimal()) | {"schema": "clipguard.report/2"}))


def test_non_finite_numbers_become_null_once_and_wrong_types_fail():
    dumped = publishable(minimal())
    assert dumped["evaluation"]["after"]["acc"] is None and dumped["evaluation"]["after"]["per_class_acc"] == [
        None,
        None,
    ]
    json.dumps(dumped, allow_nan=False)  # strict JSON
    assert "asr" not in dumped["evaluation"]["before"]  # absent stays absent: not turned into null
    for path, wrong in (
        (("lam",), float("nan")),
        (("statistics", "samples"), "4"),
        (("method",), "mmbd"),
        (("sites", 0, "clip_fraction"), None),
    ):
        bad = minimal()
        *parents, last = path
        target = bad
        for key in parents:
            target = target[key]
        target[last] = wrong
        with pytest.raises(ValidationError):
            publishable(bad)
    assert math.isnan(minimal()["evaluation"]["after"]["acc"])  # the writer's dict is not changed in place


def test_the_schema_doc_is_generated_from_the_model():
    committed = (ROOT / "docs" / "report-schema.md").read_text()
    assert committed == markdown(), "regenerate: python -m clipguard.report --markdown > docs/report-schema.md"
    for section in (
        "`verdict`",
        "`verdict.candidates[]`",
        "`reactivation`",
        "`lam_selection`",
        "`unlearning`",
        "`evaluation`",
        "`sites[]`",
        "`export`",
        "`timings`",
        "`detection`",
        "`poison_detection`",
    ):
        assert any(line.startswith(f"## {section}") for line in committed.splitlines()), section


def test_the_workers_summary_reads_the_typed_report():
    from clipguard.worker.tasks import _summary

    report = publishable(minimal())
    summary = _summary(report)
    assert summary["lam"] == 4.0 and summary["after"]["acc"] is None and summary["before"]["acc"] == 0.5
    assert summary["timings"] == {"load": 0.1, "total": 1.0} and summary["bounds_images_per_s"] is None
    assert summary["verdict"] is None and summary["reactivation"] is None  # a paper run has neither
    json.dumps(summary, allow_nan=False)
    from clipguard.report import Summary

    assert Summary.model_validate(summary).model_dump(mode="json") == summary  # what the API declares it is


def test_the_cli_summary_reads_the_typed_report(tmp_path):
    from clipguard.cli import summary

    text = summary(publishable(minimal()), tmp_path)
    assert "purified small_cnn with λ=4 (paper, channel) on 4 samples" in text
    assert "ACC 50.0% -> n/a" in text and "ASR" not in text


def test_the_timings_model_has_a_field_for_every_timed_stage_and_no_other():
    from clipguard.report import Timings
    from clipguard.stages import TIMED

    assert set(Timings.model_fields) == {s.timing_key for s in TIMED} | {"total_s"}
