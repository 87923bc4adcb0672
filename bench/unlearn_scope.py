"""Tail-only against whole-network unlearning: ACC/ASR after guard and after the reactivation check.

guard unlearns by fine-tuning the network's tail only (docs/method.md). Does fine-tuning all of it keep a
removed backdoor from coming back under the reactivation check's short fine-tune? Runs guard twice per
victim folder of ``bench/generalize.py --train-only`` (``scope`` tail, then full), with the check on:

    python bench/generalize.py --profile families --only blend-noise,sig-dirty,wanet-12pct --seeds 0 \\
        --train-only --out runs/sl
    python bench/unlearn_scope.py runs/sl/test-stride4.npz runs/sl/blend-noise runs/sl/sig-dirty runs/sl/wanet-12pct

Prints one JSON line per run and a markdown table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.purify import PurifyOptions, purify  # noqa: E402
from clipguard.train import attack_path  # noqa: E402

SCOPES = ("tail", "full")


def main(test: str, folders: list[str]) -> None:
    rows = []
    for folder in map(Path, folders):
        weights = folder / "victim.safetensors"
        arch = json.loads(weights.with_name(weights.name + ".json").read_text()).get("arch") or "small_cnn"
        for scope in SCOPES:
            t = time.perf_counter()
            report = purify(
                PurifyOptions(
                    arch=arch,
                    weights=weights,
                    data=str(folder / "train.npz"),
                    out=folder / f"guard-{scope}",
                    eval_data=test,
                    attack=str(attack_path(weights)),
                    device="cpu",
                    sweep=False,
                    overwrite=True,
                    reactivation_check=True,
                    extra={"unlearn": {"scope": scope}},
                )
            ).report
            ev, again = report["evaluation"], (report.get("reactivation") or {}).get("after") or {}
            row = {
                "victim": folder.name,
                "scope": scope,
                "verdict": report["verdict"]["status"],
                "before": [ev["before"]["acc"], ev["before"]["asr"]],
                "after": [ev["after"]["acc"], ev["after"]["asr"]],
                "retuned_asr": again.get("asr"),
                "unlearn_s": report["timings"].get("unlearn_s"),
                "total_s": round(time.perf_counter() - t, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| victim | scope | verdict | ACC / ASR before | after | re-tuned ASR | unlearn s |")
    print("|---|---|---|---|---|---|---|")
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        print(
            f"| {r['victim']} | {r['scope']} | {r['verdict']} | {pct(r['before'][0])} / {pct(r['before'][1])} | "
            f"{pct(r['after'][0])} / {pct(r['after'][1])} | {pct(r['retuned_asr'])} | {r['unlearn_s'] or 0:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
