"""ACC/ASR over λ and granularity for BadNets, Blend and WaNet, and where ``--lam auto`` lands.

For each attack a victim is trained once (``clipguard.train.train_victim``, the same
function as ``clipguard train``), its bounds are computed once per granularity, and every
λ on the grid is scored on the test set; then ``select_lambda`` (the function behind
``--lam auto``) picks λ from the poisoned training data alone and is compared with the
best fixed λ chosen with hindsight (max DER).

    python bench/lambda_sweep.py --profile cpu     # small_cnn on real CIFAR-10, < 30 min on 2 cores
    python bench/lambda_sweep.py --profile gpu     # resnet18, full CIFAR-10, 1% poison
    python bench/lambda_sweep.py --profile smoke   # a couple of minutes, proves the plumbing

Writes ``<out>/lambda_sweep.json`` and prints a markdown table.
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

from clipguard.attacks import load_attack  # noqa: E402
from clipguard.checkpoint import load_weights  # noqa: E402
from clipguard.data import default_cache_dir, iter_batches, load_data  # noqa: E402
from clipguard.defenses.clipping import clipped_model, compute_statistics  # noqa: E402
from clipguard.devices import describe, resolve_device  # noqa: E402
from clipguard.lambda_selection import DEFAULT_GRID, select_lambda  # noqa: E402
from clipguard.metrics import der, evaluate  # noqa: E402
from clipguard.models import resolve_spec  # noqa: E402
from clipguard.train import attack_path, train_victim  # noqa: E402

CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
PROFILES = {
    # arch, training samples (None = all), epochs, poison rate, augment, lr, batch, test stride
    "smoke": dict(arch="small_cnn", limit=3000, epochs=3, rate=0.05, augment=False, lr=0.05, batch=128, stride=20),
    "cpu": dict(arch="small_cnn", limit=10000, epochs=8, rate=0.03, augment=False, lr=0.05, batch=128, stride=4),
    "gpu": dict(arch="resnet18", limit=None, epochs=30, rate=0.01, augment=True, lr=0.1, batch=512, stride=1),
}
ATTACKS = {
    "smoke": ["badnets:pattern=checkerboard"],
    "cpu": ["badnets:pattern=checkerboard", "blend", "wanet"],
    "gpu": ["badnets", "blend", "wanet"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--attacks", nargs="*", default=None)
    ap.add_argument("--data", default=str(CIFAR10))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "lambda_sweep")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prof = PROFILES[args.profile]
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_data(f"{args.data}#test", cache_dir=default_cache_dir())
    test = test.subset(torch.arange(0, len(test), prof["stride"]))
    spec = resolve_spec(prof["arch"])
    rows = []
    for attack in args.attacks or ATTACKS[args.profile]:
        tag = attack.split(":")[0]
        weights = args.out / f"{tag}.safetensors"
        t = time.perf_counter()
        info = train_victim(arch=prof["arch"], data=f"{args.data}#train", out=weights, attack=attack,
                            poison_rate=prof["rate"], epochs=prof["epochs"], batch_size=prof["batch"], lr=prof["lr"],
                            augment=prof["augment"], seed=args.seed, device=str(device), limit=prof["limit"],
                            save_data=args.out / f"{tag}-train.npz")
        train_s = time.perf_counter() - t
        model = spec.build()
        load_weights(model, weights)
        model = model.to(device).eval()
        trigger = load_attack(attack_path(weights))
        train_data = load_data(args.out / f"{tag}-train.npz")
        before = evaluate(model, test, spec.mean, spec.std, attack=trigger, device=device)
        entry = {"attack": trigger.to_dict(), "poisoning": info.get("poisoning"), "train_s": train_s,
                 "before": {k: before[k] for k in ("acc", "asr", "asr_all", "ra")}, "sweep": {}, "auto": {}}
        for granularity in ("channel", "element"):
            t = time.perf_counter()
            stats = compute_statistics(model, lambda d=train_data: iter_batches(d, 512, spec.mean, spec.std, device),
                                       granularity=granularity)
            bounds_s = time.perf_counter() - t
            sweep = []
            for lam in DEFAULT_GRID:
                after = evaluate(clipped_model(model, stats.bounds(lam)).to(device), test, spec.mean, spec.std,
                                 attack=trigger, device=device)
                sweep.append({"lam": lam, "acc": after["acc"], "asr": after["asr"], "asr_all": after["asr_all"],
                              "ra": after["ra"], "der": der(before, after)})
            t = time.perf_counter()
            lam, evidence = select_lambda(model, stats, train_data, spec, device=device)
            select_s = time.perf_counter() - t
            auto = next(r for r in sweep if r["lam"] == lam)
            best = max(sweep, key=lambda r: r["der"])
            entry["sweep"][granularity] = sweep
            entry["auto"][granularity] = {"lam": lam, "acc": auto["acc"], "asr": auto["asr"], "best_lam": best["lam"],
                                          "best_acc": best["acc"], "best_asr": best["asr"], "bounds_s": bounds_s,
                                          "select_s": select_s, "evidence": evidence["sweep"]}
        rows.append(entry)
        print(json.dumps({k: entry[k] for k in ("attack", "before")} | {"auto": {
            g: {k: v for k, v in a.items() if k != "evidence"} for g, a in entry["auto"].items()}}), flush=True)
    result = {"profile": args.profile, "device": describe(device), "torch": torch.__version__, "config": prof,
              "test_samples": len(test), "rows": rows}
    (args.out / "lambda_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    """The tables docs/benchmarks.md quotes."""
    lines = [f"profile {result['profile']} on {result['device']}, {result['test_samples']} test images", ""]
    for row in result["rows"]:
        a = row["attack"]
        lines.append(f"**{a.get('name', a)}** ({(row.get('poisoning') or {}).get('mode', '?')} poisoning): "
                     f"no defense ACC {100 * row['before']['acc']:.1f} / ASR {100 * row['before']['asr']:.1f}")
        lines.append("")
        lines.append("| λ | " + " | ".join(f"{r['lam']:g}" for r in row["sweep"]["channel"]) + " |")
        lines.append("|---" * (len(row["sweep"]["channel"]) + 1) + "|")
        for g in ("channel", "element"):
            lines.append(f"| {g} ACC/ASR | " + " | ".join(
                f"{100 * r['acc']:.1f}/{100 * r['asr']:.1f}" for r in row["sweep"][g]) + " |")
        for g in ("channel", "element"):
            au = row["auto"][g]
            lines.append(f"- {g}: auto λ={au['lam']:g} → {100 * au['acc']:.1f}/{100 * au['asr']:.1f}; best λ (max DER) "
                         f"={au['best_lam']:g} → {100 * au['best_acc']:.1f}/{100 * au['best_asr']:.1f}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
