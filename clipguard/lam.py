"""The valid range of λ (the clip sits at μ + λσ), one rule for the engine, the CLI and the API.

Why a range and not just "a number": λ ≤ 0 puts the clip at or below each site's mean, which
cuts most of every activation and leaves a model at chance accuracy that still looks like a
successful purification; a huge λ clips nothing and returns the backdoor untouched under a
"purified" name. Both were accepted once and reported as succeeded jobs. ``(0, 100]`` keeps
every λ anyone has used (the ``--lam auto`` grid is 1-10, the paper's recipe 4, guard's 6) with
room to spare: by Chebyshev's inequality a clip 100σ above the mean can cut at most 0.01% of
a site's activations, so nothing above it changes a result. NaN and infinities are refused,
and so are booleans (``true`` is not a λ even where a language treats it as 1).

This module imports nothing but the standard library, so the API process can share the rule
without importing torch.
"""

from __future__ import annotations

import math

LAM_MIN = 0.0
"""Exclusive lower end: λ must be greater than this."""
LAM_MAX = 100.0
"""Inclusive upper end."""
LAM_RANGE_TEXT = f"a number in ({LAM_MIN:g}, {LAM_MAX:g}] or 'auto'"


def lam_problem(value: object) -> str | None:
    """Why ``value`` is not a valid λ (a number in the range, or ``"auto"``), or None when it is."""
    if value == "auto" and isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"λ must be {LAM_RANGE_TEXT}, got {value!r}"[:200]
    if not math.isfinite(value) or not LAM_MIN < value <= LAM_MAX:
        return f"λ must be {LAM_RANGE_TEXT}, got {value!r}"
    return None


def parse_lam(text: str) -> float | str:
    """``--lam`` as typed on a command line: ``"auto"`` or a number in range; ValueError says why not."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"λ must be {LAM_RANGE_TEXT}, got {text!r}"[:200]) from None
    problem = lam_problem(value)
    if problem:
        raise ValueError(problem)
    return value
