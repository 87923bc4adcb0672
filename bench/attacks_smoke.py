"""Does each attack implant? One small undefended victim per attack family, ACC / ASR only.

Trains SmallCNN victims on a subset of real CIFAR-10 (``clipguard.train.train_victim``, as
``clipguard train`` does) and scores them on every ``--test-stride``-th test image with the
trigger saved beside the victim. No defense runs: this is the check that a family's
undefended victim learns its backdoor before the generalisation matrix
(``bench/generalize.py``) measures defenses on it. For a source-specific attack it also
prints how often the trigger moves *other* classes to the target (it should not).

    python bench/attacks_smoke.py                       # every row, ~1-2 min each on 2 cores
    python bench/attacks_smoke.py --only sig-clean tact --limit 5000 --epochs 6
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
from clipguard.data import default_cache_dir, load_data  # noqa: E402
from clipguard.metrics import evaluate, predict  # noqa: E402
from clipguard.models import resolve_spec  # noqa: E402
from clipguard.train import attack_path, train_victim  # noqa: E402

CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
# name, attack spec, poison rate, target
ROWS = [
    ("sig-clean", "sig", 0.05, 0),
    ("sig-dirty", "sig:label=dirty", 0.01, 0),
    ("adap-blend", "adap_blend", 0.01, 0),
    ("adap-patch", "adap_patch", 0.01, 0),
    ("tact", "tact", 0.01, 0),
    ("badnets-all2all", "badnets-all2all:pattern=checkerboard", 0.1, 0),
    ("blend-all2all", "blend-all2all", 0.1, 0),
    # a control, not a published setting: no masks and no covers at Blend's alpha is Blend itself
    ("adap-blend-as-blend", "adap_blend:mask_rate=0,cover_rate=0,alpha=0.2", 0.05, 0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=None, help="row names (comma- or space-separated)")
    ap.add_argument("--rate", type=float, default=None, help="override every row's poison rate")
    ap.add_argument("--data", type=Path, default=CIFAR10)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "attacks-smoke")
    ap.add_argument("--limit", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-stride", type=int, default=5)
    args = ap.parse_args()
    only = {n for item in args.only or [] for n in item.split(",") if n}
    test = load_data(f"{args.data}#test", cache_dir=default_cache_dir())
    test = test.subset(torch.arange(0, len(test), args.test_stride))
    spec = resolve_spec("small_cnn")
    for name, attack, rate, target in ROWS:
        if only and name not in only:
            continue
        rate = args.rate if args.rate is not None else rate
        weights = args.out / name / "victim.safetensors"
        t = time.perf_counter()
        info = train_victim(
            arch="small_cnn",
            data=f"{args.data}#train",
            out=weights,
            attack=attack,
            poison_rate=rate,
            target=target,
            epochs=args.epochs,
            batch_size=128,
            lr=0.05,
            augment=False,
            seed=args.seed,
            device="cpu",
            limit=args.limit,
        )
        train_s = time.perf_counter() - t
        model = spec.build()
        load_weights(model, weights)
        trigger = load_attack(attack_path(weights))
        r = evaluate(model, test, spec.mean, spec.std, attack=trigger)
        row = {
            "name": name,
            "attack": attack,
            "rate": rate,
            "samples": info["samples"],
            "epochs": args.epochs,
            "poisoned": info["poisoning"]["poisoned"],
            "covers": info["poisoning"]["covers"],
            "acc": round(r["acc"], 4),
            "asr": round(r["asr"], 4),
            "asr_samples": r["asr_samples"],
            "train_s": round(train_s, 1),
        }
        claimed = trigger.asr_population(test.labels, 10)
        if not bool(claimed.all()):  # source-specific: the trigger on other classes should change nothing
            others = (~claimed & (test.labels != target)).nonzero().flatten()
            pred = predict(model, test, spec.mean, spec.std, transform=trigger.apply, indices=others)
            row["to_target_outside_sources"] = round(float((pred == target).float().mean()), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
