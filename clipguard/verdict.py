"""The verdict a purification run states: what was found, how sure, and what was done about it.

Why a verdict of three values and not a flag: a purifier that states a guess as a fact is
worse than none. ``backdoor_found`` is said only for a candidate whose suspects were shown to
carry a trigger (:mod:`clipguard.confirmation`); ``inconclusive`` when something stood out but
could not be confirmed (nothing is unlearned on its account); ``no_evidence`` when nothing
stood out at all. The one-line :attr:`Verdict.summary` is what the CLI prints and the HTML
report leads with; :attr:`Verdict.candidates` holds the numbers behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["backdoor_found", "no_evidence", "inconclusive"]
STATUSES: tuple[str, ...] = ("backdoor_found", "no_evidence", "inconclusive")
WORDS = {"backdoor_found": "backdoor found", "no_evidence": "no evidence of a backdoor", "inconclusive": "inconclusive"}


@dataclass
class Verdict:
    status: Status
    classes: list[int]
    """The confirmed backdoor target classes (empty unless ``backdoor_found``)."""
    summary: str
    action: str
    """What the run did because of the verdict (unlearned, or clipped only)."""
    candidates: list[dict] = field(default_factory=list)
    """Per class put to the test: its split scores and the graft evidence (:meth:`Evidence.to_dict`)."""

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "classes": self.classes,
            "summary": self.summary,
            "action": self.action,
            "candidates": self.candidates,
        }

    @property
    def confirmed_kinds(self) -> set[str]:
        """The kinds of backdoor confirmed (``all_to_one``, ``source_specific``, ``all_to_all``, ``warp``)."""
        return {str(c["kind"]) for c in self.candidates if c.get("confirmed") and c.get("kind")}

    @property
    def line(self) -> str:
        """The status in words and the summary, as the CLI prints it."""
        return f"{WORDS[self.status]}: {self.summary}"
