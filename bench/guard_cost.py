"""What guard's unlearning costs, and what a cheaper recipe gives up, beside NAD and MM-BM.

guard (``clipguard purify``'s default) spends most of its time fine-tuning. This benchmark
runs ``guard_pass`` (the function ``purify`` calls) with several ``UnlearnConfig``
variants on the same victims, clips each result at guard's λ = 6, and scores ACC, ASR and
detection against the true poisoned indices. NAD (5% clean training data) and MM-BM (50 clean
test images per class, held out of the evaluation) run once per victim in the same process,
so the speed ratios are side by side.

    python bench/guard_cost.py                                  # cpu profile; the variants below
    python bench/guard_cost.py --reuse --out runs/lambda_sweep   # reuse lambda_sweep's victims
    python bench/guard_cost.py --variants "" "epochs=1" "epochs=1,samples_per_epoch=5000"

A variant is ``key=value`` pairs of :class:`clipguard.unlearning.UnlearnConfig` (empty: the
defaults). Writes ``<out>/guard_cost.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lambda_sweep import ATTACKS, CIFAR10, PROFILES, provenance, victim  # noqa: E402
from table1 import MMBM_PER_CLASS, balanced_indices, clean_training_data, guard_defense  # noqa: E402
from table1 import PROFILES as TABLE1_PROFILES  # noqa: E402

from clipguard.data import default_cache_dir, load_data  # noqa: E402
from clipguard.defenses.common import balanced_subset  # noqa: E402
from clipguard.defenses.mmbd import mmbd_mitigate  # noqa: E402
from clipguard.defenses.nad import nad  # noqa: E402
from clipguard.devices import resolve_device  # noqa: E402
from clipguard.metrics import der, evaluate  # noqa: E402
from clipguard.models import resolve_spec  # noqa: E402
from clipguard.unlearning import UnlearnConfig  # noqa: E402

DEFAULT_VARIANTS = ["", "epochs=1", "samples_per_epoch=5000", "epochs=1,samples_per_epoch=5000", "rounds=1"]


def parse_variant(text: str) -> dict:
    """``"epochs=1,lr=0.02"`` → ``{"epochs": 1, "lr": 0.02}``, typed like ``UnlearnConfig``'s fields."""
    fields = UnlearnConfig.__dataclass_fields__
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown UnlearnConfig field {key!r}; known: {', '.join(fields)}")
        out[key] = type(getattr(UnlearnConfig(), key))(value)
    return out


def run_guard(model, train, test, trigger, spec, device, options: dict, poisoned: set[int]) -> dict:
    """One guard run as Table 1 times it (``table1.guard_defense``), with these unlearning options."""
    timings: dict[str, float] = {}
    result = guard_defense(model, spec, train, device=device, unlearn_options=options, timings=timings)
    r = evaluate(result.model.to(device), test, spec.mean, spec.std, attack=trigger, device=device)
    unlearning = result.info["unlearning"]
    removed = set(unlearning["suspect_indices"]) if unlearning else set()
    return {
        "options": options,
        "seconds": result.seconds,
        "timings": timings,
        "acc": r["acc"],
        "asr": r["asr"],
        "ra": r["ra"],
        "flagged": result.info["detection"]["flagged"],
        "removed": len(removed),
        "removed_poisoned": len(removed & poisoned),
        "poisoned": len(poisoned),
    }


def baselines(label, model, spec, train, info, test, trigger, mmbm_clean, before, args, device) -> dict:
    """NAD on 5% clean training data and MM-BM on the held-out clean test images, as bench/table1.py runs them."""
    clean = clean_training_data(train, info)
    clean5 = clean.subset(
        torch.randperm(len(clean), generator=torch.Generator().manual_seed(args.seed))[
            : max(10, round(0.05 * len(train)))
        ]
    )
    mmbm_options = TABLE1_PROFILES[args.profile]["mmbd_mitigate"]  # as Table 1 runs MM-BM on this profile
    runs = {
        "nad": lambda: nad(model, spec, clean5, device=device, seed=args.seed),
        "mmbd": lambda: mmbd_mitigate(model, spec, mmbm_clean, device=device, seed=args.seed, **mmbm_options),
    }
    out = {}
    for name, run in runs.items():
        result = run()
        r = evaluate(result.model.to(device), test, spec.mean, spec.std, attack=trigger, device=device)
        out[name] = {"seconds": result.seconds, "acc": r["acc"], "asr": r["asr"], "ra": r["ra"], "der": der(before, r)}
        print(f"[{label}] {name}: {json.dumps(out[name])}", flush=True)
        model.to(device).eval()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=["smoke", "cpu", "gpu"], default="cpu")
    ap.add_argument("--attacks", nargs="*", default=None, help="spec[@rate,epochs] (default: lambda_sweep's)")
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    ap.add_argument("--data", default=str(CIFAR10))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lambda_sweep")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="reuse victims already in --out")
    ap.add_argument("--no-baselines", action="store_true", help="skip NAD and MM-BM")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants]
    prof = PROFILES[args.profile]
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = resolve_spec(prof["arch"])
    test = load_data(f"{args.data}#test", cache_dir=default_cache_dir())
    mmbm_clean = balanced_subset(test, MMBM_PER_CLASS, 0)
    reserved = set(balanced_indices(test, MMBM_PER_CLASS, 0))
    rest = torch.tensor([i for i in range(len(test)) if i not in reserved], dtype=torch.int64)
    test = test.subset(rest[:: prof["stride"]])
    entries = []
    for attack in args.attacks or [a for a in ATTACKS[args.profile] if a != "wanet"]:
        model, trigger, train, info, _epochs, _ = victim(attack, prof, args, device)
        before = evaluate(model, test, spec.mean, spec.std, attack=trigger, device=device)
        poisoned = set((info.get("poisoning") or {}).get("indices") or [])
        entry = {"attack": attack, "before": {k: before[k] for k in ("acc", "asr", "ra")}, "baselines": {}, "guard": []}
        print(f"[{attack}] victim: {json.dumps(entry['before'])}", flush=True)
        if not args.no_baselines:
            entry["baselines"] = baselines(
                attack, model, spec, train, info, test, trigger, mmbm_clean, before, args, device
            )
        for options in variants:
            row = run_guard(model, train, test, trigger, spec, device, options, poisoned)
            row["der"] = der(before, row)
            entry["guard"].append(row)
            print(f"[{attack}] guard {options or 'defaults'}: {json.dumps(row)}", flush=True)
        entries.append(entry)
    result = {**provenance(args.profile, device, len(test)), "entries": entries}
    (args.out / "guard_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"guard's cost ({result['profile']} profile) on {result['device']}, {result['threads']} threads, "
        f"{result['date']}; {result['test_samples']} test images.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| victim | defense | ACC | ASR | DER | caught / poisoned (removed) | time s "
        "| detect / unlearn / bounds s | NAD / this | MM-BM / this |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["entries"]:
        b = e["before"]
        lines.append(f"| {e['attack']} | none | {100 * b['acc']:.1f} | {100 * b['asr']:.1f} | | | | | | |")
        base = e["baselines"]
        for name, row in base.items():
            lines.append(
                f"| | {name} | {100 * row['acc']:.1f} | {100 * row['asr']:.1f} | {100 * row['der']:.1f} "
                f"| | {row['seconds']:.1f} | | | |"
            )
        for row in e["guard"]:
            t = row["timings"]
            opts = ",".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
            ratio = {n: f"{base[n]['seconds'] / row['seconds']:.2f}x" if n in base else "-" for n in ("nad", "mmbd")}
            lines.append(
                f"| | guard {opts} | {100 * row['acc']:.1f} | {100 * row['asr']:.1f} | {100 * row['der']:.1f} "
                f"| {row['removed_poisoned']}/{row['poisoned']} ({row['removed']}) | {row['seconds']:.1f} | "
                f"{t.get('detect_poison_s', 0):.1f} / {t.get('unlearn_s', 0):.1f} / {t['bounds_s']:.1f} | "
                f"{ratio['nad']} | {ratio['mmbd']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
