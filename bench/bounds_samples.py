"""How many training images the μ+λσ statistics need: bounds from random subsets against the full pass.

The statistics pass is the recipe's whole cost and a third of guard's. This benchmark computes
the per-channel statistics once on all the (poisoned) training data and then on random subsets
of ``--sizes`` images (``--repeats`` draws each), clips at the recipe's λ = 4 and, after
``guard_pass``, at guard's λ = 6, and reports ACC, ASR, the largest relative change of
any bound against the full pass, and the pass's time.

    python bench/bounds_samples.py --reuse --out runs/lambda_sweep    # lambda_sweep's cpu victims
    python bench/bounds_samples.py --reuse --out runs/lambda_sweep --granularity element --methods paper
    python bench/bounds_samples.py --profile smoke --out /tmp/bs

Writes ``<out>/bounds_samples.json`` (``bounds_samples-element.json`` for element granularity) and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lambda_sweep import ATTACKS, CIFAR10, PROFILES, provenance, victim  # noqa: E402

from clipguard.data import ImageData, default_cache_dir, iter_batches, load_data  # noqa: E402
from clipguard.defenses.clipping import clipped_model, compute_statistics  # noqa: E402
from clipguard.defenses.guard import guard_pass  # noqa: E402
from clipguard.devices import resolve_device  # noqa: E402
from clipguard.metrics import evaluate  # noqa: E402
from clipguard.models import resolve_spec  # noqa: E402

LAMS = {"paper": 4.0, "guard": 6.0}


def stats_on(model, data: ImageData, spec, device, granularity: str) -> tuple[object, float]:
    t = time.perf_counter()
    stats = compute_statistics(
        model, lambda: iter_batches(data, 512, spec.mean, spec.std, device), granularity=granularity
    )
    return stats, time.perf_counter() - t


def max_rel_change(full: dict, sub: dict) -> float:
    """Largest |bound_sub − bound_full| / max(|bound_full|, 1e-3) over every channel of every site."""
    return max(float(((sub[k] - v).abs() / v.abs().clamp_min(1e-3)).max()) for k, v in full.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--granularity", choices=["channel", "element"], default="channel")
    ap.add_argument("--methods", nargs="+", choices=sorted(LAMS), default=sorted(LAMS))
    ap.add_argument("--data", default=str(CIFAR10))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lambda_sweep")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prof = PROFILES[args.profile]
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = resolve_spec(prof["arch"])
    test = load_data(f"{args.data}#test", cache_dir=default_cache_dir())
    test = test.subset(torch.arange(0, len(test), prof["stride"]))
    entries = []
    for attack in args.attacks or [a for a in ATTACKS[args.profile] if a != "wanet"]:
        model, trigger, train, _info, _epochs, _ = victim(attack, prof, args, device)
        fixed, kept, unlearning = model, train, None
        if "guard" in args.methods:
            passed = guard_pass(model, train, spec, device=device)
            fixed, kept, unlearning = passed.model, passed.data, passed.unlearning
        for method, net, data in (("paper", model, train), ("guard", fixed, kept)):
            if method not in args.methods or (method == "guard" and unlearning is None):
                continue
            lam = LAMS[method]
            full, full_s = stats_on(net, data, spec, device, args.granularity)
            full_bounds = full.bounds(lam)
            rows = []
            for size in [*args.sizes, len(data)]:
                for rep in range(args.repeats if size < len(data) else 1):
                    if size < len(data):
                        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(1000 * rep + size))
                        stats, secs = stats_on(net, data.subset(pick[:size]), spec, device, args.granularity)
                    else:
                        stats, secs = full, full_s
                    bounds = stats.bounds(lam)
                    r = evaluate(
                        clipped_model(net, bounds).eval(), test, spec.mean, spec.std, attack=trigger, device=device
                    )
                    row = {
                        "size": min(size, len(data)),
                        "repeat": rep,
                        "seconds": secs,
                        "acc": r["acc"],
                        "asr": r["asr"],
                        "max_rel_change": max_rel_change(full_bounds, bounds),
                    }
                    rows.append(row)
                    print(f"[{attack}] {method} λ={lam:g} {json.dumps(row)}", flush=True)
            entries.append(
                {
                    "attack": attack,
                    "method": method,
                    "lam": lam,
                    "granularity": args.granularity,
                    "data": len(data),
                    "rows": rows,
                }
            )
    result = {**provenance(args.profile, device, len(test)), "entries": entries}
    name = "bounds_samples.json" if args.granularity == "channel" else f"bounds_samples-{args.granularity}.json"
    (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        f"Bounds from subsets ({result['profile']} profile) on {result['device']}, {result['date']}; "
        f"{result['test_samples']} test images. Command: `{result['command']}`",
        "",
        "| victim | method | images | ACC (min-max) | ASR (min-max) | max bound change | pass s |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in result["entries"]:
        sizes = sorted({r["size"] for r in e["rows"]})
        for size in sizes:
            rows = [r for r in e["rows"] if r["size"] == size]

            def span(key: str, rows: list = rows) -> str:
                lo, hi = min(100 * r[key] for r in rows), max(100 * r[key] for r in rows)
                return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"

            change = max(r["max_rel_change"] for r in rows)
            secs = sum(r["seconds"] for r in rows) / len(rows)
            lines.append(
                f"| {e['attack']} | {e['method']} λ={e['lam']:g} {e['granularity']} | {size} "
                f"| {span('acc')} | {span('asr')} | {100 * change:.1f}% | {secs:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
