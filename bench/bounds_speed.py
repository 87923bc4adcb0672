"""Throughput of the bounds pass and of the clipped export, each against its plain counterpart.

Measured side by side in one process on the same model and data, alternating the two
variants and taking medians, so the ratios hold even on a machine with noisy neighbours:

(a) bounds pass (forward + per-site streaming moments) vs a plain forward with no hooks,
    and vs the same pass with ``fast=False`` (no BatchNorm folding or channels_last on a CPU,
    ``clipguard/inference.py``): what the rewrites save;
(b) the clipped TorchScript model vs the unclipped model scripted the same way.

    python bench/bounds_speed.py --quick                 # small_cnn on 4,096 images: CPU, under two minutes
    python bench/bounds_speed.py --arch resnet18 --samples 50000 --device cuda   # full CIFAR-10 train

The last line reads ``bounds/plain=<ratio> fast/exact=<ratio> clipped/unclipped=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # what importing clipguard sets; OpenMP reads it once, now
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.data import iter_batches, load_data  # noqa: E402
from clipguard.defenses.clipping import clipped_model, compute_statistics, export_form  # noqa: E402
from clipguard.devices import describe, resolve_device  # noqa: E402
from clipguard.models import resolve_spec  # noqa: E402
from clipguard.threads import bound_threads  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="default resnet18 (small_cnn with --quick)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz") + "#train")
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="small_cnn-sized run for a CPU in under two minutes")
    ap.add_argument("--threads", default=None, help="auto (default), all or a number, as the CLI's --threads")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.repeats, args.batch_size = min(args.samples, 4096), 3, 256
    args.arch = args.arch or ("small_cnn" if args.quick else "resnet18")
    load_before = os.getloadavg()
    threads = bound_threads(args.threads)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    spec = resolve_spec(args.arch)
    model = spec.build().to(device).eval()
    data = load_data(args.data, default_split="train")
    data = data.subset(torch.arange(min(args.samples, len(data))))
    # Pre-normalised batches on the device: both variants then time the network, not the loader.
    batches = [x for x, _ in iter_batches(data, args.batch_size, spec.mean, spec.std, device)]

    def plain() -> None:
        with torch.inference_mode():
            for x in batches:
                model(x)

    stats_holder = {}

    def bounds_pass() -> None:
        stats_holder["s"] = compute_statistics(model, lambda: batches, total=len(data))

    def exact_pass() -> None:
        compute_statistics(model, lambda: batches, total=len(data), fast=False)

    plain()  # warm-up (cudnn autotune, allocator)
    bounds_pass()
    exact_pass()
    t_plain, t_bounds, t_exact = [], [], []
    for _ in range(args.repeats):
        t_plain.append(_timed(plain, device))
        t_bounds.append(_timed(bounds_pass, device))
        t_exact.append(_timed(exact_pass, device))

    clipped = clipped_model(model, stats_holder["s"].bounds(4.0)).to(device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts_clipped = torch.jit.script(export_form(clipped))  # what clipguard.export scripts
        ts_plain = torch.jit.script(model)

    def run(m) -> None:
        with torch.inference_mode():
            for x in batches:
                m(x)

    for m in (ts_plain, ts_clipped):  # TorchScript profiles on the first calls
        run(m)
        run(m)
    t_ts_plain, t_ts_clipped = [], []
    for _ in range(args.repeats):
        t_ts_plain.append(_timed(lambda: run(ts_plain), device))
        t_ts_clipped.append(_timed(lambda: run(ts_clipped), device))

    n = len(data)
    med = statistics.median
    result = {
        "arch": args.arch,
        "samples": n,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "device": describe(device),
        "torch": torch.__version__,
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "plain_img_s": n / med(t_plain),
        "bounds_img_s": n / med(t_bounds),
        "exact_bounds_img_s": n / med(t_exact),
        "torchscript_unclipped_img_s": n / med(t_ts_plain),
        "torchscript_clipped_img_s": n / med(t_ts_clipped),
    }
    result["bounds_over_plain"] = result["bounds_img_s"] / result["plain_img_s"]
    result["fast_over_exact"] = result["bounds_img_s"] / result["exact_bounds_img_s"]
    result["clipped_over_unclipped"] = result["torchscript_clipped_img_s"] / result["torchscript_unclipped_img_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"bounds/plain={result['bounds_over_plain']:.3f} fast/exact={result['fast_over_exact']:.3f} "
        f"clipped/unclipped={result['clipped_over_unclipped']:.3f}"
    )


if __name__ == "__main__":
    main()
