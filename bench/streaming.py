"""Data larger than memory: peak memory and speed of purifying from a streamed folder.

Two measurements, each a real ``clipguard purify`` in a child process (its peak RSS read from the
kernel's accounting of that child):

* ``--big``: a generated ImageNet-shaped folder (224 px JPEGs in class folders) at two sizes, purified
  with a ResNet-50 (``--method paper``). The folder streams by itself (it decodes to more than the
  resident cap), so peak RSS should stay put while the data grows tenfold; the in-memory path is tried
  too and refuses the larger set by its decoded size.
* ``--small``: CIFAR-10 training images written out as a folder, purified with SmallCNN on every image
  (``--bounds-samples 0``), ``--stream`` against ``--no-stream`` (each with an empty decode cache), so
  the streamed path's throughput is compared where the in-memory one is at its best.

    python bench/streaming.py --big 10000,100000 --small 10000 --out runs/streaming

Prints a table and writes ``<out>/streaming.json``. The generated folders are kept in ``<out>`` and
reused by later runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
BIG_CLASSES = 100
BIG_SIZE = 224


def _write_images(args: tuple[Path, int, int]) -> None:
    from PIL import Image

    root, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        # a smooth random picture (a 14x14 grid scaled up) with a little noise: JPEG sizes like photos', not noise's
        low = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        im = Image.fromarray(low).resize((BIG_SIZE, BIG_SIZE), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-8, 9, (BIG_SIZE, BIG_SIZE, 3))
        folder = root / f"class{i % BIG_CLASSES:03d}"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)


def big_folder(out: Path, n: int) -> Path:
    root = out / f"imagenet-like-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    for c in range(BIG_CLASSES):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    chunks = [(root, s, min(s + 2000, n)) for s in range(0, n, 2000)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_write_images, chunks))
    done.touch()
    return root


def cifar_folder(out: Path, n: int) -> Path:
    root = out / f"cifar-folder-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    written = 0
    with tarfile.open(CIFAR10) as tar:
        for member in tar:
            parts = member.name.lstrip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != "train":
                continue
            (root / parts[1]).mkdir(parents=True, exist_ok=True)
            (root / parts[1] / parts[2]).write_bytes(io.BytesIO(tar.extractfile(member).read()).getvalue())
            written += 1
            if written >= n:
                break
    done.touch()
    return root


def weights(out: Path, arch: str, num_classes: int) -> Path:
    path = out / f"{arch.replace(':', '-')}-{num_classes}.safetensors"
    if not path.exists():
        import torch
        from safetensors.torch import save_file

        sys.path.insert(0, str(ROOT))
        from clipguard.models import resolve_spec

        torch.manual_seed(0)
        save_file(resolve_spec(arch, num_classes).build().state_dict(), str(path))
    return path


def run_purify(args: list[str], cache: Path) -> dict:
    """``clipguard purify`` in a child; its wall time, peak RSS (MiB), exit status and report."""
    env = {**os.environ, "CLIPGUARD_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "clipguard", "purify", *args, "--quiet", "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    out = Path(args[args.index("--out") + 1])
    report = json.loads((out / "report.json").read_text()) if os.waitstatus_to_exitcode(status) == 0 else None
    return {
        "cmd": " ".join(cmd[1:]),
        "exit": os.waitstatus_to_exitcode(status),
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 0),
        "timings": report and report["timings"],
        "streamed": bool(report and report["inputs"]["data"].get("streamed")),
        "error": stderr.strip().splitlines()[-1] if stderr.strip() and not report else None,
        "stdout_tail": stdout[-300:],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default="10000,100000", help="sizes of the generated 224 px folders ('' to skip)")
    ap.add_argument("--small", type=int, default=10000, help="CIFAR-10 images for the throughput pair (0 to skip)")
    ap.add_argument("--bounds-samples", type=int, default=2000, help="statistics sample for the big runs")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "streaming")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    big = [int(s) for s in args.big.split(",") if s]
    if big:
        w = weights(args.out, "torchvision:resnet50", BIG_CLASSES)
        for n in big:
            t = time.perf_counter()
            folder = big_folder(args.out, n)
            gen = time.perf_counter() - t
            for mode in ("--stream", "--no-stream") if n == max(big) else ("--stream",):
                purify_args = [
                    *("--arch", "torchvision:resnet50", "--num-classes", str(BIG_CLASSES), "--weights", str(w)),
                    *("--data", str(folder), "--method", "paper", "--bounds-samples", str(args.bounds_samples)),
                    *("--out", str(args.out / f"purified-{n}{mode}"), mode),
                ]
                row = {"case": f"resnet50 224px {n} images {mode}", "generated_s": round(gen, 1)}
                row.update(run_purify(purify_args, args.out / f"cache-{n}{mode}"))
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.small:
        folder = cifar_folder(args.out, args.small)
        w = weights(args.out, "small_cnn", 10)
        for mode in ("--no-stream", "--stream", "--no-stream", "--stream"):  # alternated: load drifts
            cache = args.out / f"cache-small-{time.monotonic_ns()}"  # empty: the in-memory path decodes too
            purify_args = [
                *("--arch", "small_cnn", "--weights", str(w), "--data", str(folder), "--method", "paper"),
                *("--bounds-samples", "0", "--out", str(args.out / f"purified-small{mode}"), mode),
            ]
            row = {"case": f"small_cnn 32px {args.small} images {mode}"}
            row.update(run_purify(purify_args, cache))
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / "streaming.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"\nmachine: {machine}\n")
    print("| case | exit | wall s | peak RSS MiB | load s | bounds s |\n|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings"] or {}
        print(
            f"| {r['case']} | {r['exit']} | {r['wall_s']} | {r['peak_rss_mib']:.0f} | "
            f"{t.get('load_s', '-')} | {t.get('bounds_s', '-')} |" + (f" {r['error']}" if r["error"] else "")
        )


if __name__ == "__main__":
    main()
