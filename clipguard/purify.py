"""``purify``: the one engine entry point behind the CLI, the Celery task and the benchmarks.

Given a suspect checkpoint, its architecture and a training-data reference, it computes
activation bounds, builds the clipped model, exports it, checks the export, and publishes
``purified.pt`` (TorchScript), ``purified.pt2`` (torch.export, when the model exports),
``bounds.safetensors`` and ``report.json`` into ``out``.

The run is a chain of stage functions (``clipguard.stages`` names and times them), each
returning a typed outcome and writing no file: :func:`load_inputs`, :func:`run_pipeline` (the
compute half a benchmark calls on a model and data it holds), :func:`assess` (what the report
measures). :func:`publish` is the one writer: everything goes into a sibling temporary folder
first and is renamed into place at the end, so a failure or a cancellation never leaves a
half-written output behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from clipguard import __version__
from clipguard.attacks import Attack, build_attack
from clipguard.attacks.registry import ATTACKS
from clipguard.bounds import save_bounds
from clipguard.checkpoint import load_weights
from clipguard.data import (
    SAMPLE_SEED,
    ImageData,
    Limits,
    default_cache_dir,
    file_sha256,
    iter_batches,
    load_data,
    normalize,
)
from clipguard.defenses.clipping import (
    SiteStats,
    clipped_model,
    clipped_site_names,
    compute_statistics,
    site_modules,
)
from clipguard.detection import SCREEN_PER_CLASS
from clipguard.devices import describe, resolve_device
from clipguard.errors import Cancelled, ClipguardError, DataError, literal
from clipguard.export import export_program, export_torchscript
from clipguard.lam import lam_problem
from clipguard.lambda_selection import DEFAULT_GRID, DEFAULT_SAMPLES, select_lambda
from clipguard.methods import DEFAULTS, Granularity, Method
from clipguard.metrics import der, evaluate
from clipguard.models import ModelSpec, resolve_spec
from clipguard.report import SCHEMA, publishable, to_json
from clipguard.report_html import write_html
from clipguard.stages import Progress, Stage, plan, timed
from clipguard.verdict import Verdict

ShouldCancel = Callable[[], bool]


DEFAULT_BOUNDS_SAMPLES = DEFAULTS.bounds_samples
"""Kept for callers that import it here (``clipguard.methods.Defaults.bounds_samples`` says why)."""


def default_bounds_samples(granularity: Granularity | str) -> int:
    """The cap used when none is given: ``DEFAULTS.bounds_samples`` per channel, none (0) per element.

    An element's μ and σ rest on one value per image, not one per image and position, so a sample moves
    element bounds more than channel bounds (docs/lab/benchmarks.md)."""
    return DEFAULTS.bounds_samples if granularity == Granularity.CHANNEL else 0


@dataclass
class PurifyOptions:
    """Everything a purification run needs; mirrors ``clipguard purify``'s flags."""

    arch: str
    weights: Path
    data: str
    out: Path
    num_classes: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    lam: float | Literal["auto"] | None = None
    granularity: Granularity = DEFAULTS.granularity
    method: Method = DEFAULTS.method
    device: str = "auto"
    batch_size: int = DEFAULTS.batch_size
    eval_data: str | None = None
    attack: str | Mapping[str, object] | None = None
    """A spec string or saved-attack path (``build_attack``), or an attack record (``Attack.to_dict()``)."""
    attack_files: bool = True
    """False where the attack comes from a request (the service): no file is looked up or read for it."""
    cache_dir: Path | None = None
    overwrite: bool = False
    sweep: bool = True
    detect: bool = False
    bounds_samples: int | None = None
    """At most this many training images for μ and σ; 0: all of them; None: ``default_bounds_samples``."""
    resize: bool = False
    """Scale every image to the architecture's input size; without it, other sizes are refused."""
    data_limits: Limits | None = None
    """Caps on what a data reference may decode to (``clipguard.data.Limits``); None: the defaults."""
    cache_max_bytes: int | None = None
    """Bound on the decoded-data cache folder (least recently used entries go first); None: unbounded."""
    stream: bool | None = None
    """Read a folder's images a batch at a time when used: True always, None when they would decode to more
    than the resident cap (``clipguard.data.Limits.max_resident_bytes``), False never (``clipguard.streaming``)."""
    reactivation_check: bool = False
    """Fine-tune a copy of the purified model briefly and report what it does to ASR (clipguard.reactivation)."""
    extra: dict = field(default_factory=dict)

    def recipe(self) -> Recipe:
        return Recipe(
            method=self.method,
            lam=self.lam,
            granularity=self.granularity,
            batch_size=self.batch_size,
            bounds_samples=self.bounds_samples,
            detect=self.detect,
            unlearn_options=self.extra.get("unlearn"),
        )


@dataclass
class PurifyResult:
    out: Path
    report: dict


CLIP_FRACTION_SAMPLES = 2048
"""Training images the clip fractions are measured on, at 32x32; larger images take fewer
(:func:`clip_fraction_samples`)."""
MIN_CLIP_FRACTION_SAMPLES = 256


def clip_fraction_samples(image_size: tuple[int, int]) -> int:
    """How many training images measure the clip fractions: as many activation values per site as
    ``CLIP_FRACTION_SAMPLES`` CIFAR-sized images hold, and at least ``MIN_CLIP_FRACTION_SAMPLES`` images.

    Why: the fraction is a diagnostic for the report, and a share estimated over hundreds of millions of
    values does not need more; at 224x224 the fixed count made it the slowest stage of a run, slower than the
    statistics pass it describes (docs/results.md)."""
    h, w = image_size
    return max(MIN_CLIP_FRACTION_SAMPLES, min(CLIP_FRACTION_SAMPLES, CLIP_FRACTION_SAMPLES * 32 * 32 // (h * w)))


EXPORT_CHECK_BATCH = 16


BOUNDS_SAMPLE_SEED = SAMPLE_SEED  # not 0: see clipguard.data.SAMPLE_SEED


def bounds_sample_indices(n: int, max_samples: int | None) -> torch.Tensor | None:
    """Which of ``n`` samples μ and σ are measured on (sorted): ``None`` for all of them, else a
    fixed-seed uniform draw of ``max_samples`` (so the same inputs always give the same bounds)."""
    if max_samples is not None and max_samples < 0:
        raise ClipguardError(f"bounds samples must be 0 (all) or positive, got {max_samples}")
    if not max_samples or n <= max_samples:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(BOUNDS_SAMPLE_SEED))[:max_samples].sort().values


def bounds_sample(data: ImageData, max_samples: int | None) -> ImageData:
    """The images μ and σ are measured on: ``data`` itself, or the draw :func:`bounds_sample_indices` names."""
    pick = bounds_sample_indices(len(data), max_samples)
    return data if pick is None else data.subset(pick)


@dataclass
class Recipe:
    """What the compute half of a run does to a model, apart from where its inputs come from.

    :func:`run_pipeline` takes it, so a benchmark holding a model and data in memory runs the
    same steps a ``purify`` call does (:meth:`PurifyOptions.recipe`)."""

    method: Method = DEFAULTS.method
    lam: float | Literal["auto"] | None = None
    granularity: Granularity = DEFAULTS.granularity
    batch_size: int = DEFAULTS.batch_size
    bounds_samples: int | None = None
    detect: bool = False
    unlearn_options: dict | None = None
    lambda_samples: int | None = None
    """At most this many training images score the λ grid (``select_lambda``'s ``max_samples``); None: its default."""
    screen_per_class: int | None = SCREEN_PER_CLASS

    def check(self) -> float | Literal["auto"]:
        """Refuse settings no run could use; the λ to start from (guard may fall back to the paper's)."""
        if self.method not in Method.__members__.values():
            raise ClipguardError(f"unknown method {self.method!r}; choose one of {', '.join(Method)}")
        if self.granularity not in Granularity.__members__.values():
            raise ClipguardError(f"granularity must be one of {', '.join(Granularity)}")
        lam = DEFAULTS.lam_for(self.method) if self.lam is None else self.lam
        if problem := lam_problem(lam):
            raise ClipguardError(problem)
        return lam


@dataclass
class Inputs:
    """The outcome of :data:`Stage.LOAD`: the suspect model and the decoded data, on ``device``."""

    spec: ModelSpec
    device: torch.device
    model: nn.Module
    data: ImageData
    eval_data: ImageData | None = None
    attack: Attack | None = None


@dataclass
class Cleaned:
    """Guard's outcome: the model to clip and the data its bounds are measured on (the suspect's, for ``paper``)."""

    model: nn.Module
    data: ImageData
    poison: dict | None = None
    unlearning: dict | None = None
    verdict: Verdict | None = None


@dataclass
class Purified:
    """The compute half's outcome: the clipped model and everything that chose its bounds."""

    cleaned: Cleaned
    stats: SiteStats
    statistics: dict
    lam: float
    selection: dict | None
    bounds: dict[str, torch.Tensor]
    clipped: nn.Module
    detection: dict | None = None


@dataclass
class Assessment:
    """What the report measures about the purified model: clipping per site, ACC/ASR, re-activation."""

    fractions: dict[str, float]
    activations: dict[str, np.ndarray]
    evaluation: dict | None = None
    reactivation: dict | None = None


def _silent(_stage: Stage, _fraction: float) -> None:
    pass


def purify(
    options: PurifyOptions,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> PurifyResult:
    """Run the whole purification and publish its artifacts atomically into ``options.out``."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    say = progress or _silent
    out = Path(options.out)
    if not options.overwrite and out.exists() and (out.is_file() or any(out.iterdir())):
        raise ClipguardError(
            literal(f"output folder {out} already exists and is not empty;") + " set {overwrite} to replace it",
            options=True,
        )
    recipe = options.recipe()
    recipe.check()
    inputs = load_inputs(options, say, should_cancel, timings)
    purified = run_pipeline(inputs, recipe, say, should_cancel, timings)
    assessment = assess(inputs, purified, options, say, should_cancel, timings)
    report = publish(options, inputs, purified, assessment, timings, started, say, should_cancel)
    say(Stage.DONE, 1.0)
    return PurifyResult(out=out, report=report)


def stages_of(options: PurifyOptions) -> tuple[Stage, ...]:
    """The stages a run with ``options`` passes through, for an overall percent (:func:`clipguard.stages.percent`)."""
    return plan(
        method=options.method,
        detect=options.detect,
        select_lambda=options.lam == "auto",
        evaluate=bool(options.eval_data),
        reactivation=options.reactivation_check,
    )


def load_inputs(
    options: PurifyOptions,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> Inputs:
    """:data:`Stage.LOAD`: the suspect checkpoint, the training data and (optionally) the evaluation data and attack."""
    spec = resolve_spec(options.arch, options.num_classes, options.mean, options.std)
    device = resolve_device(options.device)

    def loading(start: float, span: float) -> Callable[[float], None]:
        def step(fraction: float) -> None:
            say(Stage.LOAD, start + span * fraction)
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled while loading data")

        return step

    with timed(Stage.LOAD, {} if timings is None else timings, say):
        model = spec.build()
        load_weights(model, options.weights)
        model = model.to(device).eval()

        # Images larger than the model's input are refused before they are decoded (or scaled, with `resize`).
        def load(ref: str, split: str, progress: Callable[[float], None]) -> ImageData:
            return load_data(
                ref,
                default_split=split,
                progress=progress,
                image_size=spec.input_size if options.resize else None,
                max_image_size=spec.input_size,
                cache_dir=options.cache_dir or default_cache_dir(),
                cache_max_bytes=options.cache_max_bytes,
                limits=options.data_limits or Limits(),
                stream=options.stream,
            )

        data = load(options.data, "train", loading(0.0, 0.5))
        _check_input(data, spec, "training data")
        eval_data = None
        if options.eval_data:
            eval_data = load(options.eval_data, "test", loading(0.5, 0.5))
            _check_input(eval_data, spec, "evaluation data")
        attack = (
            eval_attack(options.attack, (eval_data or data).image_size, files=options.attack_files)
            if options.attack
            else None
        )
    return Inputs(spec, device, model, data, eval_data, attack)


def run_pipeline(
    inputs: Inputs,
    recipe: Recipe,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> Purified:
    """The compute half, with no file I/O: guard's pass, the statistics, λ, and the clipped model."""
    timings = {} if timings is None else timings
    lam = recipe.check()
    cleaned = clean(inputs, recipe, say, should_cancel, timings)
    if recipe.method == Method.GUARD and recipe.lam is None and not unlearned_it_all(cleaned):
        lam = DEFAULTS.lam_for(Method.PAPER)  # the clip carries the defense: the paper's recipe, at its λ
    stats, statistics = measure_statistics(inputs, cleaned, recipe, say, should_cancel, timings)
    detection = detect_backdoor(inputs, timings, say) if recipe.detect else None
    selection = None
    if lam == "auto":
        lam, selection = choose_lambda(inputs, cleaned, stats, recipe, say, should_cancel, timings)
    lam = float(lam)
    bounds = stats.bounds(lam)
    clipped = clipped_model(cleaned.model, bounds).to(inputs.device)
    return Purified(cleaned, stats, statistics, lam, selection, bounds, clipped, detection)


def unlearned_it_all(cleaned: Cleaned) -> bool:
    """Whether unlearning removed what was confirmed, so guard's looser λ may follow it.

    Not when nothing was unlearned, and not after an all-to-all confirmation: every class of an all-to-all
    backdoor carries a share of its poison, and only the classes whose share was confirmed were unlearned,
    so the clip still has the rest to catch."""
    if cleaned.unlearning is None:
        return False
    return cleaned.verdict is None or "all_to_all" not in cleaned.verdict.confirmed_kinds


def clean(
    inputs: Inputs,
    recipe: Recipe,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> Cleaned:
    """Guard's stages (find candidates, confirm, unlearn the confirmed; docs/method.md); ``paper`` keeps the suspect."""
    if recipe.method != Method.GUARD:
        return Cleaned(inputs.model, inputs.data)
    from clipguard.defenses.guard import guard_pass

    found = guard_pass(
        inputs.model,
        inputs.data,
        inputs.spec,
        device=inputs.device,
        batch_size=recipe.batch_size,
        screen_per_class=recipe.screen_per_class,
        unlearn_options=recipe.unlearn_options,
        progress=say,
        should_cancel=should_cancel,
        timings=timings,
    )
    return Cleaned(found.model, found.data, found.detection, found.unlearning, found.verdict)


def measure_statistics(
    inputs: Inputs,
    cleaned: Cleaned,
    recipe: Recipe,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[SiteStats, dict]:
    """:data:`Stage.BOUNDS`: μ and σ per site on a fixed sample of the data the bounds are for, and the sample."""
    cap = default_bounds_samples(recipe.granularity) if recipe.bounds_samples is None else recipe.bounds_samples
    with timed(Stage.BOUNDS, {} if timings is None else timings, say):
        sample = bounds_sample(cleaned.data, cap)
        spec, device = inputs.spec, inputs.device
        stats = compute_statistics(
            cleaned.model,
            lambda: iter_batches(sample, recipe.batch_size, spec.mean, spec.std, device),
            granularity=recipe.granularity,
            total=len(sample),
            progress=lambda f: say(Stage.BOUNDS, f),
            should_cancel=should_cancel,
        )
    return stats, {
        "samples": len(sample),
        "of": len(cleaned.data),
        "max_samples": cap or None,
        "seed": BOUNDS_SAMPLE_SEED,
    }


def detect_backdoor(inputs: Inputs, timings: dict[str, float] | None = None, say: Progress = _silent) -> dict:
    """:data:`Stage.DETECT`: MM-BD's data-free verdict on the suspect, "is it backdoored, and towards which class?"."""
    from clipguard.defenses.mmbd import mmbd_detect

    with timed(Stage.DETECT, {} if timings is None else timings, say):
        return {
            "method": "MM-BD (Wang et al., IEEE S&P 2024)",
            **mmbd_detect(inputs.model, inputs.spec, num_classes=inputs.spec.num_classes, device=inputs.device),
        }


def choose_lambda(
    inputs: Inputs,
    cleaned: Cleaned,
    stats: SiteStats,
    recipe: Recipe,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> tuple[float, dict]:
    """:data:`Stage.SELECT_LAMBDA`: λ chosen on the training data, and the sweep that chose it."""
    with timed(Stage.SELECT_LAMBDA, {} if timings is None else timings, say):
        return select_lambda(
            cleaned.model,
            stats,
            cleaned.data,
            inputs.spec,
            device=inputs.device,
            batch_size=recipe.batch_size,
            max_samples=DEFAULT_SAMPLES if recipe.lambda_samples is None else recipe.lambda_samples,
            rule="agreement" if cleaned.unlearning is not None else "class_drop",
            progress=lambda f: say(Stage.SELECT_LAMBDA, f),
            should_cancel=should_cancel,
        )


def assess(
    inputs: Inputs,
    purified: Purified,
    options: PurifyOptions,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
    timings: dict[str, float] | None = None,
) -> Assessment:
    """What the report shows about the purified model; no file I/O."""
    timings = {} if timings is None else timings
    with timed(Stage.CLIP_FRACTION, timings, say):
        fractions, activations = clip_fractions(
            purified.clipped,
            inputs.data,
            inputs.spec,
            device=inputs.device,
            max_samples=clip_fraction_samples(inputs.data.image_size),
            batch_size=options.batch_size,
        )
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled before export")
    evaluation = None
    if inputs.eval_data is not None:
        with timed(Stage.EVALUATE, timings, say):
            evaluation = evaluate_purified(inputs, purified, options, say)
    reactivation = None
    if options.reactivation_check:
        from clipguard.reactivation import reactivation_check

        with timed(Stage.REACTIVATION, timings, say):
            reactivation = reactivation_check(
                purified.clipped,
                purified.cleaned.data,
                inputs.spec,
                eval_data=inputs.eval_data,
                attack=inputs.attack,
                device=inputs.device,
                batch_size=options.batch_size,
                progress=lambda f: say(Stage.REACTIVATION, f),
                should_cancel=should_cancel,
            )
    return Assessment(fractions, activations, evaluation, reactivation)


def evaluate_purified(inputs: Inputs, purified: Purified, options: PurifyOptions, say: Progress = _silent) -> dict:
    """:data:`Stage.EVALUATE`: ACC (and ASR with an attack) before and after on the evaluation data, and the λ sweep."""
    data, spec, attack, device = inputs.eval_data, inputs.spec, inputs.attack, inputs.device
    assert data is not None
    before = evaluate(
        inputs.model, data, spec.mean, spec.std, attack=attack, device=device, batch_size=options.batch_size
    )
    after = evaluate(
        purified.clipped.to(device),
        data,
        spec.mean,
        spec.std,
        attack=attack,
        device=device,
        batch_size=options.batch_size,
    )
    unlearned = purified.cleaned.unlearning is not None
    return {
        "data": {"ref": str(options.eval_data), "sha256": data.sha256, "samples": len(data)},
        "attack": attack.to_dict() if attack is not None else None,
        "before": before,
        "after": after,
        "der": der(before, after) if attack is not None else None,
        "sweep_model": "unlearned" if unlearned else "suspect",
        "sweep": _sweep(
            purified.cleaned.model,
            purified.stats,
            data,
            spec,
            attack,
            device,
            options.batch_size,
            lambda f: say(Stage.EVALUATE, f),
        )
        if options.sweep
        else None,
    }


def build_report(
    options: PurifyOptions,
    inputs: Inputs,
    purified: Purified,
    assessment: Assessment,
    export_checks: dict,
    model_sha: str,
    timings: dict[str, float],
    artifacts: list[str],
) -> dict:
    """report.json's content (before NaN becomes null); ``artifacts`` are the files published beside it."""
    spec, data, verdict = inputs.spec, inputs.data, purified.cleaned.verdict
    return {
        "schema": SCHEMA,
        "clipguard_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": {
            "model": {**spec.to_dict(), "weights": Path(options.weights).name, "sha256": model_sha},
            "data": {
                "ref": str(options.data),
                "sha256": data.sha256,
                "samples": len(data),
                "classes": list(data.classes),
                "image_size": list(data.image_size),
                **({"streamed": True} if data.streamed else {}),
            },
        },
        "method": options.method,
        "verdict": None if verdict is None else verdict.to_dict(),
        "lam": purified.lam,
        "lam_selection": purified.selection,
        "poison_detection": purified.cleaned.poison,
        "unlearning": purified.cleaned.unlearning,
        "granularity": options.granularity,
        "statistics": purified.statistics,
        "sites": [
            {"name": n, "shape": list(purified.bounds[n].shape), "clip_fraction": assessment.fractions[n]}
            for n in purified.stats.names
        ],
        "export": export_checks,
        "evaluation": assessment.evaluation,
        "reactivation": assessment.reactivation,
        "detection": purified.detection,
        "device": describe(inputs.device),
        "torch_version": torch.__version__,
        "timings": timings,
        "artifacts": sorted(artifacts),
    }


def publish(
    options: PurifyOptions,
    inputs: Inputs,
    purified: Purified,
    assessment: Assessment,
    timings: dict[str, float],
    started: float,
    say: Progress = _silent,
    should_cancel: ShouldCancel | None = None,
) -> dict:
    """The one writer: exports, the bounds file, report.json and report.html into a staging folder,
    renamed into ``options.out`` only when all of them are written. Returns the report."""
    out = Path(options.out)
    spec, lam = inputs.spec, purified.lam
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with timed(Stage.EXPORT, timings, say):
            cpu_model = purified.clipped.to("cpu").eval()
            example = normalize(inputs.data.images[:EXPORT_CHECK_BATCH], spec.mean, spec.std)
            export_checks = {
                "torchscript": export_torchscript(
                    cpu_model,
                    example,
                    staging / "purified.pt",
                    metadata={
                        **spec.to_dict(),
                        "lam": lam,
                        "method": options.method,
                        "granularity": options.granularity,
                        "clipguard_version": __version__,
                    },
                )
            }
            export_checks["torch_export"] = export_program(cpu_model, example, staging / "purified.pt2")
        say(Stage.PUBLISH, 0.0)
        model_sha = file_sha256(options.weights)
        save_bounds(
            staging / "bounds.safetensors",
            purified.bounds,
            purified.stats,
            {
                "lam": lam,
                "granularity": options.granularity,
                "method": options.method,
                "samples": purified.stats.samples,
                "arch": spec.arch,
                "model_sha256": model_sha,
                "data_sha256": inputs.data.sha256,
            },
        )
        timings["total_s"] = time.perf_counter() - started
        artifacts = [*(p.name for p in staging.iterdir()), "report.json", "report.html"]
        report = build_report(options, inputs, purified, assessment, export_checks, model_sha, timings, artifacts)
        report = publishable(report)  # checked against clipguard.report.Report, NaN made null: what readers get
        fractions, values = assessment.fractions, assessment.activations
        top = sorted(fractions, key=fractions.__getitem__, reverse=True)[:HISTOGRAM_SITES]
        write_html(
            report,
            staging / "report.html",
            activations={
                n: {"values": values[n], "bound": purified.bounds[n].flatten().numpy()} for n in top if n in values
            },
        )
        (staging / "report.json").write_text(to_json(report))
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled before publishing")
        _publish(staging, out, overwrite=options.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(Stage.PUBLISH, 1.0)
    return report


HISTOGRAM_SITES = 4
SWEEP_SAMPLES = 2000


def _sweep(
    model: nn.Module,
    stats: object,
    data: ImageData,
    spec: ModelSpec,
    attack: object | None,
    device: torch.device,
    batch_size: int,
    progress: Callable[[float], None],
) -> list[dict]:
    """ACC (and ASR) for every λ of the grid: the report's sweep curve.

    Scored on an evenly spaced subset of at most ``SWEEP_SAMPLES`` evaluation images, so the
    curve costs a fraction of the run; the before/after numbers use the whole set.
    """
    if len(data) > SWEEP_SAMPLES:
        data = data.subset(torch.linspace(0, len(data) - 1, SWEEP_SAMPLES).long())
    rows = []
    for i, lam in enumerate(DEFAULT_GRID):
        clipped = clipped_model(model, stats.bounds(lam)).to(device)  # type: ignore[attr-defined]
        r = evaluate(clipped, data, spec.mean, spec.std, attack=attack, device=device, batch_size=batch_size)
        rows.append({"lam": lam, "samples": len(data), **{k: r[k] for k in ("acc", "asr", "asr_all", "ra") if k in r}})
        progress((i + 1) / len(DEFAULT_GRID))
    return rows


def eval_attack(spec: str | Mapping[str, object], image_size: tuple[int, int], *, files: bool = True) -> Attack:
    """The attack ASR is measured with, for images of ``image_size``.

    A record (the object ``clipguard train`` saves, as a job body carries it) is rebuilt from its
    parameters alone: the trigger is regenerated from its seed and must match the recorded sha256, a
    trigger image file is refused (it would be a server path named by a request), and a record made
    for another image size is refused before any trigger is allocated for it.
    """
    if isinstance(spec, str):
        return build_attack(spec, image_size=image_size, files=files)
    record = dict(spec)
    name = record.get("name")
    if name not in ATTACKS:
        raise DataError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    if record.get("image"):
        raise DataError(
            literal(f"{name} attack: a trigger image file is not read from an attack record;")
            + " give {attack} as a saved attack file with its tensors",
            options=True,
        )
    try:
        size = record.setdefault("image_size", list(image_size))
        made_for = tuple(int(v) for v in size) if isinstance(size, list | tuple) else ()
        if len(made_for) != 2:
            raise ValueError("image_size must be two numbers")
        if made_for != tuple(image_size):
            raise DataError(
                f"the {name} trigger was made for {made_for[0]}x{made_for[1]} images, the "
                f"evaluation data are {image_size[0]}x{image_size[1]}"
            )
        return ATTACKS[name].from_state(record, {})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"malformed {name} attack ({type(exc).__name__}: {exc})"[:300]) from exc


def _check_input(data: ImageData, spec: ModelSpec, what: str) -> None:
    """Labels within the model's outputs, and images of the size the architecture takes."""
    h, w = data.image_size
    if spec.fixed_input and (h, w) != tuple(spec.input_size):
        raise DataError(
            literal(
                f"{what} {data.source} has {h}x{w} images but {spec.arch} takes {spec.input_size[0]}x"
                f"{spec.input_size[1]}; resize the data first, or ask for resizing"
            )
            + " ({resize})",
            options=True,
        )
    _check_labels(data, spec, what)


def _check_labels(data: ImageData, spec: ModelSpec, what: str) -> None:
    top = int(data.labels.max()) if len(data) else -1
    if top >= spec.num_classes:
        raise ClipguardError(
            literal(
                f"{what} has labels up to {top} ({len(data.classes)} classes) but the model has "
                f"{spec.num_classes} outputs;"
            )
            + " set {num_classes}",
            options=True,
        )


def clip_fractions(
    clipped: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    *,
    device: torch.device | str,
    max_samples: int,
    batch_size: int,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Per site, the share of activations the bound cuts on a training subsample, and a
    sample of the activation values themselves (for the report's histograms)."""
    counts: dict[str, list[float]] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    hooks = []
    names = clipped_site_names(clipped)
    gen = torch.Generator().manual_seed(0)
    for name, module in zip(names, site_modules(clipped), strict=True):
        counts[name] = [0.0, 0.0]
        samples[name] = []

        def hook(
            mod: nn.Module, inp: tuple, _out: torch.Tensor, c: list = counts[name], keep: list = samples[name]
        ) -> None:
            if hasattr(mod, "upper"):
                x = inp[0].relu() if getattr(mod, "fuses_relu", False) else inp[0]
                c[0] += float((x > mod.upper).sum())
                c[1] += x.numel()
                flat = x.detach().flatten()
                pick = torch.randint(0, flat.numel(), (min(4096, flat.numel()),), generator=gen)
                keep.append(flat[pick.to(flat.device)].float().cpu())

        hooks.append(module.register_forward_hook(hook))
    idx = torch.arange(min(max_samples, len(data)))
    try:
        with torch.inference_mode():
            for x, _ in iter_batches(data, batch_size, spec.mean, spec.std, device, indices=idx):
                clipped(x)
    finally:
        for h in hooks:
            h.remove()
    fractions = {n: (c[0] / c[1] if c[1] else 0.0) for n, c in counts.items()}
    values = {n: torch.cat(v).numpy() for n, v in samples.items() if v}
    return fractions, values


def _publish(staging: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished folder into place; an old output is replaced only after success."""
    if out.exists():
        if not overwrite and (out.is_file() or any(out.iterdir())):
            raise ClipguardError(f"output folder {out} appeared while running; not overwriting it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
