"""report.html: self-contained, escaped, complete when the data is there, sane when it is not.

The sample report mirrors what ``purify()`` writes for a ResNet-18 (17 clip sites) with
``--lam auto --eval-data --attack badnets``; building it by hand keeps these tests in
milliseconds instead of running a purification.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipguard import report_html
from clipguard.report_html import render_html, write_html

PNG = 'src="data:image/png;base64,'
EVIL = "<script>alert(1)</script>"

RESNET18_SITES = [
    "relu",
    *(f"layer{stage}.{block}.relu{k}" for stage in (1, 2, 3, 4) for block in (0, 1) for k in (1, 2)),
]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def sample_report() -> dict:
    """A plausible report.json for ResNet-18 / CIFAR-10 / BadNets with λ chosen automatically."""
    channels = [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    fractions = [
        0.0011,
        0.0024,
        0.0019,
        0.0031,
        0.0027,
        0.0036,
        0.0042,
        0.0039,
        0.0051,
        0.0062,
        0.0071,
        0.0083,
        0.0097,
        0.0125,
        0.0164,
        0.0218,
        0.0347,
    ]
    per_before = [0.948, 0.967, 0.905, 0.861, 0.941, 0.889, 0.957, 0.955, 0.962, 0.956]
    per_after = [0.941, 0.965, 0.897, 0.852, 0.936, 0.881, 0.952, 0.950, 0.958, 0.955]
    sel_grid = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0]
    sel_rows = []
    for lam, agree, tacc, crit in (
        (1.0, 0.612, 0.598, 0.241),
        (1.5, 0.803, 0.789, 0.118),
        (2.0, 0.912, 0.897, 0.061),
        (2.5, 0.958, 0.941, 0.033),
        (3.0, 0.979, 0.962, 0.016),
    ):
        sel_rows.append(
            {
                "lam": lam,
                "samples": 512 if lam == 1.0 else 5000,
                "train_acc": tacc,
                "agreement": agree,
                "drop_by_class": [crit] * 9 + [0.4],
                "most_affected_class": 0,
                "mean_drop_others": crit,
                "accepted": crit <= 0.02,
            }
        )
    eval_sweep = [
        {"lam": lam, "acc": acc, "asr": asr}
        for lam, acc, asr in (
            (1.0, 0.6412, 0.0081),
            (1.5, 0.8233, 0.0094),
            (2.0, 0.8988, 0.0107),
            (2.5, 0.9213, 0.0115),
            (3.0, 0.9287, 0.0123),
            (3.5, 0.9311, 0.0241),
            (4.0, 0.9326, 0.0876),
            (5.0, 0.9337, 0.4512),
            (6.0, 0.9340, 0.8833),
            (8.0, 0.9341, 0.9962),
            (10.0, 0.9341, 1.0),
        )
    ]
    return {
        "schema": "clipguard.report/1",
        "clipguard_version": "0.1.0",
        "created": "2025-06-02T11:58:41+00:00",
        "inputs": {
            "model": {
                "arch": "resnet18",
                "num_classes": 10,
                "input_size": [32, 32],
                "mean": [0.4914, 0.4822, 0.4465],
                "std": [0.247, 0.2435, 0.2616],
                "weights": "badnets-resnet18.safetensors",
                "sha256": "9f2c4e1b7a03d58e6c21f0a4b9d7e3c5a8f61d2b4c9e0f7a3b5d8c1e6f2a4b7c",
            },
            "data": {
                "ref": "/data/cifar10-poisoned.npz",
                "sha256": "41d8cd98f00b204e9800998ecf8427e0b1c2d3e4f5a6b7c8",
                "samples": 50000,
                "classes": CLASSES,
                "image_size": [32, 32],
            },
        },
        "method": "paper",
        "lam": 3.0,
        "lam_selection": {
            "rule": "smallest λ whose mean per-class training-accuracy drop, excluding the most "
            "affected class, is at most 0.020",
            "tolerance": 0.02,
            "samples": 5000,
            "train_acc_before": 0.9902,
            "grid": sel_grid,
            "sweep": sel_rows,
            "chosen": 3.0,
        },
        "granularity": "channel",
        "sites": [
            {"name": n, "shape": [c, 1, 1], "clip_fraction": f}
            for n, c, f in zip(RESNET18_SITES, channels, fractions, strict=True)
        ],
        "export": {
            "torchscript": {
                "format": "torchscript",
                "method": "script",
                "batch": 16,
                "max_abs_diff": 2.384e-07,
                "tolerance": 1e-05,
                "ok": True,
            },
            "torch_export": {
                "format": "torch.export",
                "batch": 16,
                "max_abs_diff": 4.768e-07,
                "tolerance": 1e-05,
                "ok": True,
            },
        },
        "evaluation": {
            "data": {
                "ref": "/data/cifar10-test.npz",
                "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4",
                "samples": 10000,
            },
            "attack": {
                "name": "badnets",
                "target": 0,
                "mode": "all_to_one",
                "poisoning": "static",
                "image_size": [32, 32],
                "size": 3,
                "pattern": "white",
                "position": "29,29",
                "value": 255,
            },
            "before": {
                "samples": 10000,
                "acc": 0.9341,
                "per_class_acc": per_before,
                "asr": 1.0,
                "asr_all": 1.0,
                "ra": 0.0,
                "asr_samples": 9000,
            },
            "after": {
                "samples": 10000,
                "acc": 0.9287,
                "per_class_acc": per_after,
                "asr": 0.0123,
                "asr_all": 0.1111,
                "ra": 0.9046,
                "asr_samples": 9000,
            },
            "der": 0.9912,
            "sweep": eval_sweep,
        },
        "device": "cuda:0 (NVIDIA H100 80GB HBM3)",
        "torch_version": "2.14.1+cu128",
        "timings": {
            "load_s": 3.42,
            "bounds_s": 11.87,
            "select_lambda_s": 9.63,
            "clip_fraction_s": 0.81,
            "export_s": 4.15,
            "evaluate_s": 2.96,
            "total_s": 32.91,
        },
        "artifacts": ["bounds.safetensors", "purified.pt", "purified.pt2", "report.json"],
    }


def sample_activations(report: dict, n_sites: int = 4, seed: int = 0) -> dict[str, dict]:
    """ReLU-like samples (half zeros, a long tail) and per-channel bounds for the most-clipped sites."""
    rng = np.random.default_rng(seed)
    sites = sorted(report["sites"], key=lambda s: -s["clip_fraction"])[:n_sites]
    out = {}
    for s in sites:
        c = s["shape"][0]
        vals = np.maximum(rng.normal(0.0, 1.0, 4000), 0) * rng.gamma(2.0, 0.6, 4000)
        vals[:40] = rng.uniform(6, 12, 40)  # a trigger-driven tail
        out[s["name"]] = {"values": vals.astype(np.float32), "bound": rng.normal(2.6, 0.5, c).clip(0.5)}
    return out


def minimal_report() -> dict:
    """What a fixed-λ run without --eval-data writes, with the optional parts left out."""
    r = sample_report()
    r["lam"] = 4.0
    r["lam_selection"] = None
    r["evaluation"] = None
    return r


def count_png(page: str) -> int:
    return page.count(PNG)


@pytest.fixture(scope="module", autouse=True)
def low_dpi() -> Iterator[None]:
    """Page structure does not depend on resolution; rasterising at a third of it keeps the suite fast."""
    saved, report_html.DPI = report_html.DPI, 48
    yield
    report_html.DPI = saved


@pytest.fixture(scope="module")
def full_page(low_dpi: None) -> str:
    report = sample_report()
    return render_html(report, sample_activations(report, n_sites=2))  # 2 keep the test fast


def test_self_contained(full_page: str) -> None:
    assert "http://" not in full_page and "https://" not in full_page
    assert "<script" not in full_page.lower() and "<link" not in full_page.lower()
    assert "url(" not in full_page
    srcs = re.findall(r'src="[^"]{0,40}', full_page)
    assert srcs and all(s.startswith(PNG) for s in srcs)


def test_before_after_numbers(full_page: str) -> None:
    # ACC, ASR, RA, ASR (all), DER, and the changes in percentage points
    for text in (
        "93.41%",
        "92.87%",
        "100.00%",
        "1.23%",
        "0.00%",
        "90.46%",
        "11.11%",
        "99.12%",
        "-0.54 pp",
        "-98.77 pp",
        "+90.46 pp",
        "-88.89 pp",
    ):
        assert text in full_page, text
    # header facts, hashes shortened with the full hash kept in the tooltip
    assert "9f2c4e1b7a03…" in full_page and 'title="9f2c4e1b7a03d58e' in full_page
    assert "resnet18" in full_page and "NVIDIA H100" in full_page and "0.1.0" in full_page
    assert all(name in full_page for name in RESNET18_SITES)


def test_a_lambda_the_sweep_stopped_scoring_early_says_so(full_page: str) -> None:
    assert "no (certain after 512 images)" in full_page  # λ = 1 was given up after one batch
    assert full_page.count("certain after") == 1


def test_one_png_per_plot(full_page: str) -> None:
    # before/after bars, evaluation λ sweep, selection evidence, clip fractions, histograms
    assert count_png(full_page) == 5
    assert count_png(full_page) == full_page.count("<img ")
    report = sample_report()
    del report["evaluation"]["sweep"]
    report["lam_selection"] = None
    assert count_png(render_html(report)) == 2  # bars, clip fractions


def test_minimal_report_renders() -> None:
    page = render_html(minimal_report())
    assert count_png(page) == 1  # clip fractions only
    assert "ACC / ASR" not in page and "Choosing λ" not in page and "Per-class" not in page
    assert "Export checks" in page and "Timings" in page and "No evaluation" in page
    bare = render_html({"schema": "clipguard.report/1", "lam": 4.0, "evaluation": None, "lam_selection": None})
    assert count_png(bare) == 0 and "<h1>" in bare


def test_evaluation_without_attack_and_broken_values() -> None:
    report = minimal_report()
    report["sites"] = []
    report["evaluation"] = {
        "data": {"ref": "test", "samples": 10},
        "attack": None,
        "der": None,
        "before": {"acc": 0.5, "per_class_acc": [float("nan"), 0.5]},
        "after": {"acc": 0.25, "per_class_acc": [0.5]},
    }
    report["export"]["torch_export"] = {"format": "torch.export", "ok": False, "error": "Unsupported: <op>"}
    page = render_html(report)
    assert "50.00%" in page and "25.00%" in page and "ASR" in page  # ASR only in the "no ASR" note
    assert "Unsupported: &lt;op&gt;" in page and "failed" in page
    assert count_png(page) == 1


def test_escapes_user_strings() -> None:
    report = minimal_report()
    report["sites"][3]["name"] = EVIL
    report["sites"][4]["name"] = "odd$math$^{name"  # would be mathtext in a matplotlib label
    report["inputs"]["data"]["ref"] = f'/tmp/"{EVIL}'
    report["inputs"]["data"]["classes"][2] = EVIL
    report["evaluation"] = {
        "before": {"acc": 0.9, "per_class_acc": [0.9] * 10},
        "after": {"acc": 0.8, "per_class_acc": [0.8] * 10},
        "attack": {"name": EVIL},
    }
    acts = {EVIL: {"values": np.abs(np.linspace(-2, 5, 500)), "bound": np.full(8, 3.0)}}
    page = render_html(report, acts)
    assert EVIL not in page and "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "/tmp/&quot;&lt;script&gt;" in page
    assert count_png(page) == 3  # bars, clip fractions, histogram


def test_write_html_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = minimal_report()
    report["sites"] = report["sites"][:2]
    target = tmp_path / "report.html"
    target.write_text("old")
    write_html(report, target)
    assert os.listdir(tmp_path) == ["report.html"]
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report_html.os, "replace", boom)
    before = target.read_text(encoding="utf-8")
    with pytest.raises(OSError):
        write_html(copy.deepcopy(report), target)
    assert os.listdir(tmp_path) == ["report.html"] and target.read_text(encoding="utf-8") == before


def test_detection_verdict_is_shown_and_escaped():
    from clipguard.report_html import render_html

    page = render_html(
        {
            "detection": {
                "method": "MM-BD",
                "flagged": True,
                "p_value": 0.012,
                "target": "<b>0</b>",
                "statistics": [9.5, 2.0, 2.5],
            }
        }
    )
    assert "backdoor suspected" in page and "p = 0.012" in page
    assert "<b>0</b>" not in page and "&lt;b&gt;0&lt;/b&gt;" in page
    assert "9.50" in page
    assert "Is this model backdoored?" not in render_html({"detection": None})


def test_poison_section_says_when_detection_screened_a_sample():
    found = {
        "flagged": True,
        "target": 0,
        "targets": [0],
        "z": 12.0,
        "scores": [4.1, 2.7, 2.8],
        "suspects": 839,
        "screened": 10000,
        "of": 50000,
    }
    page = render_html({"poison_detection": found, "unlearning": {"suspects": 839, "rounds": []}})
    assert "a class-balanced sample of 10,000 of the 50,000 training samples" in page
    assert "839 training samples relabelled and unlearned" in page
    whole = render_html({"poison_detection": {**found, "screened": 3000, "of": 3000}, "unlearning": None})
    assert "class-balanced sample" not in whole and "Nothing was unlearned" in whole


def _candidate(confirmed: bool, unresolved: bool = False) -> dict:
    graft = {
        "broad": 0.97 if confirmed else 0.05,
        "strongest": 1.0 if confirmed else 0.1,
        "redirect": 0.9,
        "to_candidate": [None, 0.9],
    }
    return {
        "class": 3,
        "why_tested": "its split stands out",
        "screen_score": 7.38,
        "z": 46.6,
        "whole_class_score": 7.5,
        "suspects": 303,
        "confirmed": confirmed,
        "unresolved": unresolved,
        "kind": "all_to_one" if confirmed else None,
        "suspects_graft": graft,
        "genuine_graft": {"broad": 0.07, "strongest": 0.1, "redirect": 0.07, "to_candidate": [None, 0.1]},
    }


@pytest.mark.parametrize(
    ("status", "confirmed", "unresolved", "words", "outcome"),
    [
        ("backdoor_found", True, False, "Backdoor found", "confirmed"),
        ("inconclusive", False, True, "Inconclusive", "not confirmed"),
        ("no_evidence", False, False, "No evidence of a backdoor", "dismissed"),
    ],
)
def test_the_verdict_leads_the_report_with_each_candidates_evidence(status, confirmed, unresolved, words, outcome):
    verdict = {
        "status": status,
        "classes": [3] if confirmed else [],
        "summary": "class 3 <b>x</b>",
        "action": "unlearned",
        "candidates": [_candidate(confirmed, unresolved)],
    }
    page = render_html({"verdict": verdict, "evaluation": None, "poison_detection": {"scores": [2.7]}})
    assert page.index("<h2>Verdict</h2>") < page.index("Poisoned training data")
    assert words in page and "class 3 &lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert f">{outcome}</span>" in page and "7.38" in page and "303" in page
    assert ("97% / 100%" in page) is confirmed
    assert "<h2>Verdict</h2>" not in render_html({"verdict": None})


def test_the_reactivation_check_is_reported():
    again = {
        "protocol": {"epochs": 5, "lr": 0.01, "batch_size": 64},
        "tuned_on": 1000,
        "agreement": 0.93,
        "agreement_samples": 2500,
        "agreement_on": "evaluation data",
        "after": {"acc": 0.71, "asr": 0.04},
    }
    page = render_html({"reactivation": again})
    assert "Does the backdoor come back?" in page and "5 epochs on 1000 training images" in page
    assert "ASR 4.0%" in page and "93.0%" in page
