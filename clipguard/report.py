"""``report.json``'s schema: one pydantic model per section, the only description of the format.

Why a model and not the dict alone: the report is assembled from pieces several modules write
(the guard pass, λ selection, evaluation, the export checks, the reactivation check), and read by
the CLI, the worker, the HTML page and the benchmarks. A typed model makes a writer's mistake
fail when the report is published instead of when a reader meets it, gives readers attributes
instead of ``.get(`` chains, and is what ``docs/report-schema.md`` is generated from
(``python -m clipguard.report --markdown``), so the page cannot drift from the code.

The writers keep building plain dicts; :func:`publishable` validates one through :class:`Report`
once, at publish time, and returns what ``report.json`` holds. It is also the one place where
NaN and infinities become ``null`` (an accuracy over zero images is NaN; strict JSON parsers and
PostgreSQL refuse the bare tokens), which is why the fields that can meet one are nullable.

Every model allows fields it does not know (``extra="allow"``): a reader built for this version
reads a newer writer's report that added a field, and keeps the field when it re-dumps the
report, so nothing a newer writer said is lost on the way through an older reader. The writer's
own completeness is kept by a test that finds no unknown field in a real run's report.
Validation is strict (no string-to-number or bool-to-int coercion), so a wrong type is an error.
:mod:`clipguard.report_html` renders the same record as HTML.
"""

from __future__ import annotations

import enum
import json
import math
import sys
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipguard.methods import DEFAULTS, Granularity, Method

SCHEMA = "clipguard.report/1"
"""The version this code writes and reads (``Report.schema_``); see the versioning rules in :data:`VERSIONING`."""


def json_safe(value: object) -> object:
    """NaN and infinities become ``None`` and tuples lists: what ``json.dumps(allow_nan=False)`` accepts."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class Section(BaseModel):
    """Base of every part of the report: strict types, unknown fields kept (see the module docstring)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


Share = float
"""A fraction in [0, 1] (accuracies, rates), never a percentage."""


# --------------------------------------------------------------------------- inputs


class ModelInput(Section):
    """The suspect model: its architecture as the registry knows it, and which weights file."""

    arch: str = Field(
        description="Registry architecture (`resnet18`, `preact_resnet18`, `vgg16_bn`, `small_cnn`, "
        "`torchvision:<name>`)."
    )
    num_classes: int = Field(description="Number of model outputs.")
    input_size: list[int] = Field(description="Input height and width the architecture expects.")
    mean: list[float] = Field(description="Per-channel normalisation mean applied to `[0, 1]` images.")
    std: list[float] = Field(description="Per-channel normalisation standard deviation.")
    weights: str = Field(description="File name (no directory) of the suspect checkpoint.")
    sha256: str = Field(description="Hex SHA-256 of the checkpoint file's bytes.")


class DataInput(Section):
    """The training data the bounds come from."""

    ref: str = Field(description="The data reference as given (`path`, `path#split`).")
    sha256: str = Field(
        description="Hex digest identifying the reference: SHA-256 of the file's bytes (for a "
        "directory, of its file names, sizes and modification times) plus the split and "
        "image size. Equal digests mean the same input; not a hash of the decoded images."
    )
    samples: int = Field(description="Number of training images loaded.")
    classes: list[str] = Field(description="Class names, index = label.")
    image_size: list[int] = Field(description="Height and width of the images.")
    streamed: bool | None = Field(
        None,
        description="Present (`true`) when the images were read a batch at a time as stages needed them rather "
        "than decoded whole (a folder larger than the resident cap, or `--stream`).",
    )


class Inputs(Section):
    """What was purified."""

    model: ModelInput = Field(description="The suspect model.")
    data: DataInput = Field(description="The training data.")


# --------------------------------------------------------------------------- guard: candidates, verdict


class Graft(Section):
    """How one group's graft moved the model's decisions (`clipguard.confirmation.Transfer`)."""

    to_candidate: list[float | None] = Field(
        description="Per class: share of its reference images newly predicted as the candidate (`null`: the "
        "candidate itself)."
    )
    broad: Share = Field(description="Median of `to_candidate` over the source classes.")
    strongest: Share = Field(description="Largest `to_candidate` of any source class.")
    redirect: Share = Field(
        description="Median share of a source class sent to one other class of its own (the all-to-all signal)."
    )
    destinations: list[int | None] = Field(
        description="Per class: the class its redirected images went to (`null` where nothing moved, or for the "
        "candidate)."
    )


class Warp(Section):
    """The warp search's numbers (`clipguard.confirmation.WarpTest`), when the graft could not decide."""

    success: Share = Field(description="Share of other classes' images the best smooth warp sends to the class.")
    pixels: float = Field(description="Largest displacement the warp may make, in pixels.")
    controls: dict[str, Share] | None = Field(
        None,
        description="The same search's success for ordinary classes, by class (as a string); "
        "absent when the candidate's own search found too little to compare.",
    )
    toward_suspects: Share | None = Field(
        None,
        description="With `controls`: share of warped images moved towards the suspects rather "
        "than the genuine group in the model's features.",
    )


class Side(Section):
    """Which group of a class's split is taken as poisoned (`clipguard.detection.poisoned_side`)."""

    side: Literal["smaller", "larger"] = Field(
        description="`smaller` (the usual case) or `larger` (the poisoned samples outnumber the class's genuine ones)."
    )
    expected_poisoned: int = Field(
        description="The class's count minus the median of the others' (what an all-to-one attack adds)."
    )
    second_choice_entropy: dict[str, float | None] = Field(
        description="Per group (`smaller`, `larger`): entropy of the model's best non-target class as a share of "
        "`log(classes − 1)`."
    )


class Candidate(Section):
    """One class put to the test: why, its split scores, and the graft (and warp) evidence."""

    class_: int = Field(alias="class", description="The candidate class.")
    why_tested: str = Field(
        description="Why it became a candidate: its split stands out, its small group's "
        "pattern moves decisions, or both."
    )
    screen_score: float = Field(description="Its split's separation on the screened sample.")
    z: float = Field(
        description="That score's distance above the other classes' median, in robust standard deviations."
    )
    whole_class_score: float | None = Field(description="The separation once the whole class was read.")
    side: Side | None = Field(description="Which group of the whole-class split was taken as poisoned.")
    unresolved: bool = Field(description="Not confirmed, yet not dismissed: makes the verdict `inconclusive`.")
    suspects: int | None = Field(
        None, description="Samples in the suspect group (present with the graft evidence, as are the fields below)."
    )
    genuine: int | None = Field(None, description="Samples in the genuine group.")
    confirmed: bool | None = Field(None, description="Whether the suspects were shown to carry a trigger.")
    kind: Literal["all_to_one", "source_specific", "all_to_all", "warp"] | None = Field(
        None, description="The backdoor's kind when confirmed."
    )
    reason: str | None = Field(None, description="The evidence in one sentence.")
    swapped: bool | None = Field(
        None,
        description="The trigger was on the group detection had taken "
        "for the genuine one; `suspects` counts that group.",
    )
    suspects_graft: Graft | None = Field(None, description="The suspects' graft.")
    genuine_graft: Graft | None = Field(None, description="The genuine group's graft (the control).")
    warp: Warp | None = Field(None, description="The warp search, when it ran.")


class Verdict(Section):
    """What the run concluded, how sure, and what it did about it (`clipguard.verdict`)."""

    status: Literal["backdoor_found", "no_evidence", "inconclusive"] = Field(
        description="`backdoor_found`: a candidate's suspects were shown to carry a trigger; `inconclusive`: "
        "something stood out but was not confirmed (nothing is unlearned on its account); "
        "`no_evidence`: nothing stood out, or every candidate was dismissed."
    )
    classes: list[int] = Field(description="The confirmed target classes (empty unless `backdoor_found`).")
    summary: str = Field(description="One line: what was found, with the evidence in words.")
    action: str = Field(description="What the run did because of the verdict (unlearned, or clipped only).")
    candidates: list[Candidate] = Field(description="Every class put to the test, strongest first.")


class PoisonDetection(Section):
    """What guard's spectral split found (`clipguard.detection`, `clipguard.defenses.guard`)."""

    method: str = Field(description='`"spectral split of penultimate features"`.')
    flagged: bool = Field(description="Whether a backdoor was confirmed (the verdict's `backdoor_found`).")
    target: int | None = Field(description="The confirmed class when there is exactly one, else `null`.")
    suspects: int = Field(
        description="The split's suspect count on the screen; after unlearning, the confirmed classes' suspects."
    )
    scores: list[float | None] = Field(
        description="Per class, the separation of the two groups of its split of penultimate features (one "
        "Gaussian blob: about 2.66); `null` for a class with too few samples."
    )
    z: float = Field(
        description="The top score's distance above the other classes' median, in robust standard deviations."
    )
    min_separation: float = Field(description="Score a class's split must reach to stand out.")
    min_z: float = Field(description="`z` a class's split must reach to stand out.")
    peaks: bool = Field(
        description="Whether the split also read the spatial maximum of the pooled feature map "
        "(catches a patch the average dilutes)."
    )
    screened: int = Field(description="Training samples the first pass read (a class-balanced seeded draw).")
    of: int = Field(description="Training samples there were.")
    candidates: list[Candidate] = Field(description="The classes put to the test (as in `verdict.candidates`).")
    targets: list[int] = Field(description="The confirmed classes (the verdict's `classes`).")


class UnlearnRound(Section):
    round: int = Field(description="Round number, from 1.")
    suspects: int = Field(description="Suspects relabelled in this round.")
    flipped_added: int | None = Field(
        None, description="Samples whose target prediction flipped and joined the next round."
    )


class UnlearnConfig(Section):
    """The fine-tune's recipe (`clipguard.unlearning.UnlearnConfig`)."""

    epochs: int = Field(description="Epochs per round.")
    lr: float = Field(description="Learning rate.")
    batch_size: int
    rounds: int = Field(description="Rounds; samples whose prediction flipped in one join the next.")
    samples_per_epoch: int = Field(description="Clean samples drawn per epoch (every suspect always takes part).")
    seed: int
    scope: Literal["tail", "full"] = Field(description="What was asked for; `unlearning.scope` says what ran.")
    tail_share: float = Field(description="Smallest share of the parameters the tail must hold.")
    max_cache_mb: int = Field(description="Limit on the cached tail inputs; past it the whole network is trained.")


class Unlearning(Section):
    """The fine-tune that unlearned the confirmed classes' suspects; the purified weights differ from the input's."""

    config: UnlearnConfig = Field(description="The fine-tune's recipe.")
    scope: Literal["tail", "full"] = Field(
        description="What was trained: the part after `cut` on cached body outputs, or every layer on the images."
    )
    cut: str | None = Field(None, description="`tail` only: the traced node where the frozen body ends.")
    rounds: list[UnlearnRound] = Field(description="Per round.")
    suspects: int = Field(description="Final suspect count; the bounds are computed without these samples.")
    scope_note: str | None = Field(
        None, description="Why the whole network was trained when the config asked for the tail."
    )
    suspect_indices: list[int] = Field(
        description="The final suspects: positions in the training data as loaded, "
        "ascending. The samples to inspect, or drop before retraining."
    )


# --------------------------------------------------------------------------- λ, statistics, sites, export


class LamSweepRow(Section):
    lam: float = Field(description="λ tried.")
    samples: int = Field(
        description="Images scored at this λ (fewer than the sweep's when the rule could no longer accept it)."
    )
    train_acc: Share = Field(description="Training accuracy of the clipped model.")
    agreement: Share = Field(
        description="Share of samples on which the clipped model predicts what the unclipped one does."
    )
    drop_by_class: list[float | None] = Field(
        description="Per training label: unclipped accuracy minus clipped (positive = lost)."
    )
    most_affected_class: int = Field(description="Label with the largest drop, left out of `class_drop`.")
    mean_drop_others: float = Field(description="Mean drop over the other classes.")
    accepted: bool = Field(description="Whether the rule accepts this λ.")


class LamSelection(Section):
    """Evidence for `--lam auto` (`clipguard.lambda_selection`)."""

    rule: str = Field(description="The selection rule in words, with its tolerance.")
    criterion: Literal["class_drop", "agreement"] = Field(
        description="`class_drop` (the paper's recipe, or guard with nothing unlearned) or `agreement` (guard "
        "after unlearning: nothing may break)."
    )
    tolerance: float = Field(description="The rule's tolerance (a share).")
    samples: int = Field(description="Training images the sweep measured on (a seeded random subset).")
    train_acc_before: Share = Field(description="Training accuracy of the unclipped model on those images.")
    grid: list[float] = Field(description="The λ values the rule may try, ascending.")
    sweep: list[LamSweepRow] = Field(description="One row per λ tried, ascending; stops at the first accepted.")
    chosen: float = Field(description="The λ chosen (top-level `lam`): the first accepted, else the grid's largest.")


class Statistics(Section):
    """The images μ and σ were measured on."""

    samples: int = Field(description="How many.")
    of: int = Field(description="How many were eligible (the training data less guard's final suspects).")
    max_samples: int | None = Field(description="The cap (`--bounds-samples`); `null` for none.")
    seed: int = Field(description="Seed of the random subset taken when `of` exceeds the cap.")


class Site(Section):
    name: str = Field(
        description="Module path of the activation call (`layer1.0.relu1`, `#k` for its k-th call), "
        "or the FX node name. Matches the keys in `bounds.safetensors`."
    )
    shape: list[int] = Field(
        description="Shape of the bound tensor: `[C, 1, 1]` per channel, `[C, H, W]` per "
        "element, `[F]` for a 2-D activation."
    )
    clip_fraction: Share = Field(
        description="Share of the site's activations above their bound on up to 2048 training images (fewer "
        "for images larger than 32x32, at least 256: `clipguard.purify.clip_fraction_samples`)."
    )


class ExportCheck(Section):
    """One exported file and the check that it computes what the eager clipped model does."""

    format: Literal["torchscript", "torch.export"]
    ok: bool = Field(description="`max_abs_diff <= tolerance` (TorchScript: always `true`, a failure aborts).")
    method: Literal["script", "trace"] | None = Field(None, description="TorchScript: how it was made.")
    batch: int | None = Field(None, description="Images in the check batch.")
    max_abs_diff: float | None = Field(
        None, description="Largest absolute logit difference between the reloaded file and the eager model."
    )
    tolerance: float | None = Field(None, description="Largest difference accepted.")
    error: str | None = Field(
        None, description="torch.export: why the model did not export (then no `batch`, `max_abs_diff`, `tolerance`)."
    )


class Export(Section):
    torchscript: ExportCheck = Field(description="`purified.pt`; always present.")
    torch_export: ExportCheck = Field(description="`purified.pt2`, best effort: the file exists only when `ok`.")


# --------------------------------------------------------------------------- evaluation, reactivation


class Metrics(Section):
    """ACC (and with an attack ASR and RA) of one model on the evaluation data (`clipguard.metrics.evaluate`)."""

    samples: int = Field(description="Evaluation images.")
    acc: Share | None = Field(description="Clean accuracy (`null` over zero images).")
    per_class_acc: list[Share | None] = Field(
        description="Clean accuracy per true label; `null` for a label with no images."
    )
    asr: Share | None = Field(
        None,
        description="With an attack, as are the fields below: attack success rate "
        "over the images whose label is not their target; `null` when there "
        "are none.",
    )
    asr_all: Share | None = Field(None, description="ASR over all images the attack claims.")
    ra: Share | None = Field(None, description="Robust accuracy on the images `asr` counts.")
    asr_samples: int | None = Field(None, description="Images counted in `asr` and `ra`.")


class EvalSweepRow(Section):
    """The clipped model's metrics at one λ (as in `evaluation.before`), on the sweep's subset."""

    lam: float = Field(description="λ of the clip.")
    samples: int | None = Field(None, description="Images scored (an evenly spaced subset of at most 2000).")
    acc: Share | None = Field(None, description="Clean accuracy.")
    asr: Share | None = Field(None, description="With an attack, as are the fields below: ASR.")
    asr_all: Share | None = None
    ra: Share | None = None


class EvalData(Section):
    ref: str = Field(description="The reference as given.")
    sha256: str = Field(description="Reference digest, as for `inputs.data`.")
    samples: int = Field(description="Evaluation images.")


class Evaluation(Section):
    """ACC/ASR before and after, with `--eval-data`."""

    data: EvalData = Field(description="The evaluation data.")
    attack: dict[str, Any] | None = Field(
        description="The trigger as `Attack.to_dict()` writes it (`name`, `target`, `mode`, `poisoning`, "
        "`image_size` and the attack's own parameters, which differ per attack: an open object); "
        "`null` without `--attack`."
    )
    before: Metrics = Field(description="The suspect model.")
    after: Metrics = Field(description="The purified model.")
    der: Share | None = Field(description="Defense effectiveness rate; `null` without an attack (or with no ASR).")
    sweep_model: Literal["suspect", "unlearned"] | None = Field(
        None, description="The model the sweep clipped: the unlearned one after guard's fine-tune."
    )
    sweep: list[EvalSweepRow] | None = Field(
        None, description="ACC/ASR at every λ of the grid on a subset of the evaluation data; `null` with `--no-sweep`."
    )


class ReactivationProtocol(Section):
    """The fine-tune's settings (`clipguard.reactivation.ReactivationConfig`)."""

    samples: int = Field(description="Training images drawn for the fine-tune (at most; the suspects excluded).")
    epochs: int
    lr: float = Field(description="Learning rate.")
    batch_size: int
    seed: int = Field(description="Seed of the draw, the order and the flips.")


class Reactivation(Section):
    """A brief fine-tune of the purified model on clean data, and what it did (`clipguard.reactivation`)."""

    protocol: ReactivationProtocol = Field(description="The fine-tune's settings.")
    tuned_on: int = Field(description="Training images the copy was fine-tuned on (the suspects excluded).")
    agreement: Share | None = Field(
        description="Share of `agreement_on` on which the re-tuned copy predicts what the purified model predicts."
    )
    agreement_on: str = Field(
        description="Where agreement was measured: the evaluation data, or training images the fine-tune did not use."
    )
    agreement_samples: int = Field(description="Images agreement was measured on.")
    after: Metrics | None = Field(None, description="With `--eval-data`: the re-tuned copy's metrics.")


class MMBDNull(Section):
    """The Gamma distribution fitted to the statistics of all classes but the most suspicious."""

    shape: float
    scale: float
    shift: float = Field(description="Added to every statistic before the fit, when some were not positive.")


class MMBDDetection(Section):
    """MM-BD's data-free verdict (`--detect`; `clipguard.defenses.mmbd`)."""

    method: str = Field(description='`"MM-BD (Wang et al., IEEE S&P 2024)"`.')
    defense: str = Field(description='`"mmbd_detect"`.')
    statistics: list[float] = Field(description="Per class, the largest margin the optimisation reached.")
    target: int = Field(description="The class with the largest statistic (the most suspicious).")
    null: MMBDNull = Field(description="The Gamma null fitted to the other classes.")
    p_value: float | None = Field(description="Chance of a statistic this large among clean classes, under the null.")
    alpha: float = Field(description="Significance level.")
    flagged: bool = Field(description="`p_value <= alpha`.")
    images_per_class: int = Field(description="Random images each class's optimisation starts from.")
    max_steps: int = Field(description="Most optimisation steps per class.")
    steps_taken: list[int] = Field(description="Steps each class's optimisation took.")
    seconds: float = Field(description="Time the detection took.")


class Timings(Section):
    """Seconds per stage; a stage that did not run is absent (other keys may appear: readers keep them)."""

    load_s: float | None = Field(None, description="Building the model, loading weights and data.")
    detect_poison_s: float | None = Field(None, description="guard: the feature pass and the per-class splits.")
    confirm_s: float | None = Field(None, description="guard: confirming the candidates.")
    unlearn_s: float | None = Field(None, description="guard, confirmed backdoors: the fine-tune.")
    bounds_s: float | None = Field(None, description="The pass for μ and σ.")
    detect_s: float | None = Field(None, description="MM-BD (`--detect`).")
    select_lambda_s: float | None = Field(None, description="The λ sweep (`--lam auto`).")
    clip_fraction_s: float | None = Field(None, description="Measuring `sites[].clip_fraction`.")
    export_s: float | None = Field(None, description="TorchScript and torch.export with their checks.")
    evaluate_s: float | None = Field(None, description="Evaluation before and after, and the sweep.")
    reactivation_s: float | None = Field(None, description="The reactivation check.")
    total_s: float | None = Field(None, description="The whole run up to writing the report.")


# --------------------------------------------------------------------------- the report


class Report(Section):
    """`report.json`: what was purified, with what, how, and (with test data) with what effect."""

    schema_: Literal["clipguard.report/1"] = Field(
        alias="schema", description="The schema version; a report of another version is refused."
    )
    clipguard_version: str = Field(description="Version of clipguard that wrote the report.")
    created: str = Field(description="When the report was written: ISO 8601, UTC, seconds.")
    inputs: Inputs = Field(description="What was purified: the model and the training data.")
    method: Method = Field(
        strict=False,  # the value, "guard" or "paper", as report.json holds it
        description="`guard` (detect, confirm and unlearn the poisoned samples, then clip) or `paper` (clip the "
        "model as given). See [method.md](method.md).",
    )
    verdict: Verdict | None = Field(description="guard only (`null` for paper).")
    lam: float = Field(
        description=f"The λ used, given or chosen by `--lam auto`. Default {DEFAULTS.lam_for(Method.GUARD):.1f} for "
        f"guard when it unlearned what it confirmed, else {DEFAULTS.lam_for(Method.PAPER):.1f} (the paper's; also "
        "after an all-to-all confirmation)."
    )
    lam_selection: LamSelection | None = Field(description="`--lam auto` only.")
    poison_detection: PoisonDetection | None = Field(description="guard only.")
    unlearning: Unlearning | None = Field(description="guard, when a backdoor was confirmed.")
    granularity: Granularity = Field(
        strict=False, description="One bound per channel (pooled over space) or one per activation."
    )
    statistics: Statistics = Field(description="The images μ and σ were measured on.")
    sites: list[Site] = Field(description="One per clip site, in execution order.")
    export: Export = Field(description="The checks of the exported artifacts.")
    evaluation: Evaluation | None = Field(description="With `--eval-data` only.")
    reactivation: Reactivation | None = Field(description="With `--reactivation-check` only.")
    detection: MMBDDetection | None = Field(description="With `--detect` only.")
    device: str = Field(description="Where the run computed (`cuda:0 (NVIDIA H100 80GB HBM3)`, `cpu (2 threads)`).")
    torch_version: str = Field(description="`torch.__version__` of the run.")
    timings: Timings = Field(description="Seconds per stage.")
    artifacts: list[str] = Field(description="File names published in the output folder, sorted.")

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        """The one place NaN and infinities become null (and tuples lists), before any field is checked."""
        return json_safe(data)

    def dump(self) -> dict:
        """The JSON-ready dict ``report.json`` holds: unknown fields kept, fields the writer left out left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def publishable(report: dict) -> dict:
    """``report`` checked against :class:`Report` (a wrong type raises ``ValidationError``) and made JSON-safe."""
    return Report.model_validate(report).dump()


def to_json(report: dict) -> str:
    """``report.json``'s text for a :func:`publishable` dict."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def read(text: str | bytes) -> Report:
    """A report from ``report.json``'s text; fields this version does not know are kept, not refused."""
    return Report.model_validate_json(text)


# --------------------------------------------------------------------------- the report at a glance


class SummaryVerdict(Section):
    """The verdict without its evidence."""

    status: Literal["backdoor_found", "no_evidence", "inconclusive"] = Field(description="As `verdict.status`.")
    classes: list[int] = Field(description="As `verdict.classes`.")


class SummaryReactivation(Section):
    """The reactivation check's outcome without its protocol."""

    after: Metrics | None = Field(None, description="As `reactivation.after`.")
    agreement: Share | None = Field(None, description="As `reactivation.agreement`.")


class Summary(Section):
    """What a client wants at a glance (a job's ``summary`` in the API): λ, ACC/ASR, the verdict, the check."""

    lam: float = Field(description="λ of the published clip.")
    before: Metrics | None = Field(None, description="The uploaded model on the evaluation data.")
    after: Metrics | None = Field(None, description="The purified model on the evaluation data.")
    der: float | None = Field(None, description="Defense effectiveness rating, with an attack.")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, keyed by stage name.")
    bounds_images_per_s: float | None = Field(None, description="Speed of the μ/σ pass.")
    verdict: SummaryVerdict | None = Field(None, description="guard's verdict.")
    reactivation: SummaryReactivation | None = Field(None, description="With the reactivation check.")


def summarize(report: Report) -> Summary:
    """The report at a glance; what the worker stores as a job's summary and the API serves."""
    ev, verdict, again = report.evaluation, report.verdict, report.reactivation
    images, seconds = report.inputs.data.samples, report.timings.bounds_s
    return Summary(
        lam=report.lam,
        before=ev.before if ev else None,
        after=ev.after if ev else None,
        der=ev.der if ev else None,
        timings={
            k.removesuffix("_s"): v
            for k, v in report.timings.model_dump(exclude_unset=True).items()
            if isinstance(v, float | int)
        },
        bounds_images_per_s=images / seconds if images and seconds else None,
        verdict=SummaryVerdict(status=verdict.status, classes=verdict.classes) if verdict else None,
        reactivation=SummaryReactivation(after=again.after, agreement=again.agreement) if again else None,
    )


# --------------------------------------------------------------------------- docs/report-schema.md

INTRO = f"""\
# `report.json` schema: `{SCHEMA}`

<!-- Generated by `python -m clipguard.report --markdown > docs/report-schema.md` from the models in
clipguard/report.py; edit those, not this page (a test compares the two). -->

Every `clipguard purify` run writes `report.json` next to `purified.pt` and `bounds.safetensors`. It is
the machine-readable record of what was purified, with what, how, and (when test data was given) with
what effect; `report.html` is the same record rendered for people. `purify()` builds the report and
checks it against `clipguard.report.Report` before publishing it, so this page, generated from that
model, describes what the code writes. Python readers can load it with `clipguard.report.read(text)`.
"""

VERSIONING = f"""\
## Versioning

The top-level `schema` field names the version: `"{SCHEMA}"`.

* **Adding** a field (at any depth) keeps the version. Readers must ignore fields they do not know
  (`clipguard.report` keeps them: every model allows extra fields and dumps them again).
* **Removing or renaming** a field, or changing its type or meaning, bumps the version
  (`clipguard.report/2`). Readers should check `schema` and refuse, or fall back, on a version they do
  not know.
* Fields marked *optional* may be absent; fields marked *nullable* are present, possibly with `null`.
  Readers should treat an absent field like `null`.

Numbers are JSON numbers. Shares (accuracies, rates, fractions) are in `[0, 1]`, never percentages.
The file is strict JSON: a figure that is not a finite number (an accuracy over zero images, such as
the ASR when every evaluation image belongs to the target class) is written as `null`, never `NaN`.
"""

METRICS = """\
## Metric conventions

They follow BackdoorBench (`utils/metric.py`) so numbers compare with the literature; the code is
`clipguard/metrics.py`.

* **ACC**: clean accuracy on the evaluation data.
* **ASR**: triggered images whose true label is **not** the attack's target, share classified as the
  target. This is the primary number: a model that ignores the trigger scores near 0. All-to-all
  attacks count every image against the label `(y + 1) mod K`; a source-specific attack (TaCT) counts
  only its source classes' images, as backdoor-toolbox does.
* **ASR (all)** (`asr_all`): the same over **all** triggered images, target-class images included, as
  some papers report; it has a floor near 1/K on a repaired model, so compare like with like.
* **RA**: robust accuracy, triggered non-target images still classified as their true label.
* **DER**: defense effectiveness rate, `[max(0, ΔASR) − max(0, ΔACC) + 1] / 2` with
  `ΔASR = ASR_before − ASR_after` and `ΔACC = ACC_before − ACC_after`. 0.5 means no change; 1.0 means
  ASR fell from 100% to 0% at no accuracy cost.
* The target of each image comes from the attack (`target_labels`): one class for all-to-one attacks,
  `(label + 1) mod K` for all-to-all ones, as in BackdoorBench; "target class" above means each image's
  own target.
"""


def _type_words(annotation: Any, anchors: dict[type, str], *, top: bool = True) -> str:
    """A type in words, with a link to a nested model's section; ``top``: the field's own nullability is said apart."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        words = [_type_words(a, anchors, top=top) for a in args if a is not type(None)]
        return " or ".join(words + ([] if top or type(None) not in args else ["null"]))
    if origin is Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{json.dumps(m.value)}`" for m in annotation)
    if origin is list:
        return f"array of {_type_words(args[0], anchors, top=False)}"
    if origin is dict:
        return "object" if args[1] is Any else f"object of {_type_words(args[1], anchors, top=False)}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[object](#{anchors[annotation]})"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, "any")


def _nested(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The models inside a field's type, each with what follows the field's name in its path (``[]``, ``.*``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [(m, "[]" + s) for m, s in _nested(args[0])]
    if origin is dict:
        return [(m, ".*" + s) for m, s in _nested(args[1])]
    return [pair for a in args for pair in _nested(a)]


def _sections() -> dict[type[BaseModel], list[str]]:
    """Every model in the report, depth first, with the JSON paths it is met at (a shared model, such as the
    before/after metrics, at each of its places under its parent's first path)."""
    paths: dict[type[BaseModel], list[str]] = {Report: [""]}

    def visit(model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            for inner, suffix in _nested(info.annotation):
                parent = paths[model][0]
                path = f"{parent}.{info.alias or name}{suffix}".lstrip(".")
                if inner in paths:
                    paths[inner].append(path)
                else:
                    paths[inner] = [path]
                    visit(inner)

    visit(Report)
    return paths


def _doc(model: type[BaseModel]) -> str:
    own = model.__dict__.get("__doc__")
    return " ".join(own.split()) if own else ""


def markdown() -> str:
    """``docs/report-schema.md``: the prose above and one table per model, from the field types and descriptions."""
    sections = _sections()
    anchors = {
        m: "top-level" if m is Report else paths[0].replace(".", "-").replace("[]", "").replace("*", "")
        for m, paths in sections.items()
    }
    parts = [INTRO, VERSIONING]
    for model, paths in sections.items():
        title = "Top level" if model is Report else ", ".join(f"`{p}`" for p in paths)
        lines = [f'<a id="{anchors[model]}"></a>', "", f"## {title}", ""]
        if _doc(model):
            lines += [_doc(model), ""]
        lines += ["| Field | Type | Meaning |", "|---|---|---|"]
        for name, info in model.model_fields.items():
            kind = _type_words(info.annotation, anchors)
            if not info.is_required():
                kind += ", optional"
            elif type(None) in typing.get_args(info.annotation):
                kind += ", nullable"
            meaning = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{info.alias or name}` | {kind} | {meaning} |")
        parts.append("\n".join(lines) + "\n")
    parts.append(METRICS)
    return "\n".join(parts)


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m clipguard.report --markdown > docs/report-schema.md")
    sys.stdout.write(markdown())
