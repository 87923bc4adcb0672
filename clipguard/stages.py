"""The stages of a purification run, in pipeline order: one list for progress, timings and docs.

Why one enum: the engine names its stages in progress callbacks and in the report's ``timings``;
the worker turns them into the job's overall ``percent``; the API docs list them. When those were
separate lists they drifted apart, and a stage the worker's list lacked (guard's) sent the percent
backwards. Everything that names a stage reads it from here, so a new stage is declared once.

A stage's ``weight`` is its rough share of a run's time, relative to the others; a run's percent is
the cumulative weight of the stages it has finished plus the current one's fraction, over the
weights of the stages it runs (:func:`percent`). Weights guide a progress bar, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from enum import StrEnum

from clipguard.methods import DEFAULTS, Method

Progress = Callable[["Stage", float], None]
"""``progress(stage, fraction)`` with fraction in [0, 1] for the current stage."""


class Stage(StrEnum):
    """A stage of :func:`clipguard.purify.purify`, in the order a run passes through them.

    The value is the name progress callbacks, the job API's ``stage`` and the report's ``timings``
    (``<value>_s``) use.
    """

    LOAD = "load"
    DETECT_POISON = "detect_poison"
    CONFIRM = "confirm"
    UNLEARN = "unlearn"
    BOUNDS = "bounds"
    DETECT = "detect"
    SELECT_LAMBDA = "select_lambda"
    CLIP_FRACTION = "clip_fraction"
    EVALUATE = "evaluate"
    REACTIVATION = "reactivation"
    EXPORT = "export"
    PUBLISH = "publish"
    DONE = "done"

    @property
    def label(self) -> str:
        return _INFO[self][0]

    @property
    def weight(self) -> int:
        return _INFO[self][1]

    @property
    def when(self) -> str:
        """Which runs have this stage."""
        return _INFO[self][2]

    @property
    def timing_key(self) -> str:
        """The stage's key in the report's ``timings``."""
        return f"{self.value}_s"


TIMED = tuple(s for s in Stage if s not in (Stage.PUBLISH, Stage.DONE))
"""The stages the report's ``timings`` may hold (as ``<value>_s``), beside the run's ``total_s``.
Publishing is not among them: the report is written before it ends."""


_INFO: dict[Stage, tuple[str, int, str]] = {
    Stage.LOAD: ("load the model and decode the data", 5, "every run"),
    Stage.DETECT_POISON: ("screen the training data for a poisoned group", 15, "`guard`"),
    Stage.CONFIRM: ("confirm candidate classes with trigger tests", 10, "`guard`"),
    Stage.UNLEARN: ("unlearn the confirmed suspects", 15, "`guard`, when a trigger was confirmed"),
    Stage.BOUNDS: ("measure activation statistics (μ, σ)", 20, "every run"),
    Stage.DETECT: ("MM-BD's data-free backdoor verdict", 5, "detection asked for"),
    Stage.SELECT_LAMBDA: ("choose λ from the training data", 10, "`lam` is `auto`"),
    Stage.CLIP_FRACTION: ("measure how much each bound clips", 2, "every run"),
    Stage.EVALUATE: ("ACC/ASR before and after, and the λ sweep", 10, "evaluation data given"),
    Stage.REACTIVATION: ("fine-tune a copy and re-measure ASR", 10, "reactivation check asked for"),
    Stage.EXPORT: ("export TorchScript and torch.export programs", 3, "every run"),
    Stage.PUBLISH: ("write the bounds and reports, publish atomically", 1, "every run"),
    Stage.DONE: ("finished", 0, "every run"),
}


def plan(
    *,
    method: Method | str = DEFAULTS.method,
    detect: bool = False,
    select_lambda: bool = False,
    evaluate: bool = False,
    reactivation: bool = False,
) -> tuple[Stage, ...]:
    """The stages a run with these settings may pass through, in order.

    Guard's unlearning is listed although it runs only when a trigger is confirmed: skipping it
    makes the percent jump forward, never back."""
    skip = set()
    if method != Method.GUARD:
        skip |= {Stage.DETECT_POISON, Stage.CONFIRM, Stage.UNLEARN}
    if not detect:
        skip.add(Stage.DETECT)
    if not select_lambda:
        skip.add(Stage.SELECT_LAMBDA)
    if not evaluate:
        skip.add(Stage.EVALUATE)
    if not reactivation:
        skip.add(Stage.REACTIVATION)
    return tuple(s for s in Stage if s not in skip)


def percent(stage: Stage | str, fraction: float, stages: Iterable[Stage] = tuple(Stage)) -> float | None:
    """How far a run through ``stages`` is, 0 to 100, when ``stage`` is ``fraction`` done.

    ``None`` for a stage not in ``stages`` (a caller keeps its last figure)."""
    stages = tuple(stages)
    try:
        stage = Stage(stage)
    except ValueError:
        return None
    if stage not in stages:
        return None
    total = sum(s.weight for s in stages)
    if stage is Stage.DONE or not total:
        return 100.0
    before = sum(s.weight for s in stages[: stages.index(stage)])
    return 100.0 * (before + stage.weight * min(max(fraction, 0.0), 1.0)) / total


class Tracker:
    """A run's overall percent as its stages report progress: never going back, whatever the reports' order.

    ``ceiling`` scales the figure: a service that still has work after the engine (storing the
    artifacts) keeps the last point for its own success."""

    def __init__(self, stages: Iterable[Stage] = tuple(Stage), ceiling: float = 100.0) -> None:
        self.stages, self.ceiling, self.value = tuple(stages), ceiling, 0.0

    def __call__(self, stage: Stage | str, fraction: float) -> float:
        done = percent(stage, fraction, self.stages)
        if done is not None:
            self.value = max(self.value, round(done * self.ceiling / 100, 1))
        return self.value


@contextmanager
def timed(stage: Stage, timings: MutableMapping[str, float], progress: Progress | None = None) -> Iterator[None]:
    """Time the block into ``timings[stage.timing_key]``, reporting the stage's start and end to ``progress``.

    Only a block that finishes is recorded: a failed or cancelled stage has no duration to report."""
    say = progress or (lambda _stage, _fraction: None)
    say(stage, 0.0)
    start = time.perf_counter()
    yield
    timings[stage.timing_key] = time.perf_counter() - start
    say(stage, 1.0)


def stage_table() -> str:
    """The job stages table of docs/api.md."""
    rows = ["| stage | what it does | runs when | weight |", "|---|---|---|---|"]
    rows += [f"| `{s.value}` | {s.label} | {s.when} | {s.weight} |" for s in Stage]
    return "\n".join(rows) + "\n"


TABLES = {"stages": stage_table}
"""Generated tables, by the name their markers carry: ``<!-- NAME:begin ... -->`` ... ``<!-- NAME:end -->``."""


def with_tables(doc: str) -> str:
    """``doc`` with the text between each pair of generated-table markers rewritten; other text as it was."""
    for name, make in TABLES.items():
        begin, end = f"<!-- {name}:begin (generated by python -m clipguard.stages) -->", f"<!-- {name}:end -->"
        head, found, rest = doc.partition(begin)
        if not found:
            continue
        _, closed, tail = rest.partition(end)
        if not closed:
            raise ValueError(f"the {name} table's end marker is missing")
        doc = f"{head}{begin}\n{make()}{end}{tail}"
    return doc


GENERATED_DOCS = ("docs/api.md",)
"""The documents holding generated tables, relative to the repository root (report.json's ``timings`` are in
docs/report-schema.md, generated from ``clipguard.report.Timings``, whose fields a test keeps equal to ``TIMED``'s)."""


if __name__ == "__main__":  # python -m clipguard.stages [DOC...]: rewrite the generated tables in place
    import sys
    from pathlib import Path

    for arg in sys.argv[1:] or GENERATED_DOCS:
        path = Path(arg)
        path.write_text(with_tables(path.read_text()))
