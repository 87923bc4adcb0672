"""What a user of the service waits for: upload to artifacts, one real job, broken down.

Starts a real ``clipguard serve`` (API and its supervised worker, embedded defaults: SQLite and the
filesystem transport, no Redis) on a temporary ``CLIPGUARD_HOME``, then drives it as a user would
through ``clipguard.remote.Client``: upload a checkpoint and the training and test data, wait for
the checkpoint's quarantine, submit a job, poll it, download every artifact. Each span comes from
one run: the client's own clock for uploads, quarantine and download, the job row's timestamps for
the queue wait, and the job's report.json for the engine's stages.

    python bench/service_latency.py                      # trains a small BadNets victim first (not timed)
    python bench/service_latency.py --weights v.safetensors --arch small_cnn --data train.npz \\
        --eval-data test.npz --attack v.safetensors.attack.json
    python bench/service_latency.py --method paper --json latency.json

``--device`` is the worker's device (``CLIPGUARD_DEVICE``); on a GPU host pass ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.remote import Client  # noqa: E402

CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def victim(folder: Path, data: Path) -> dict[str, Path]:
    """A small BadNets victim and a 1,000-image test cut, made before anything is timed."""
    from clipguard.data import load_data, save_npz
    from clipguard.train import train_victim

    weights = folder / "victim.safetensors"
    train_victim(
        arch="small_cnn",
        data=f"{data}#train",
        out=weights,
        limit=3000,
        epochs=4,
        augment=False,
        lr=0.05,
        batch_size=128,
        attack="badnets:pattern=checkerboard",
        poison_rate=0.05,
        device="cpu",
        save_data=folder / "train.npz",
    )
    test = load_data(f"{data}#test")
    import torch

    save_npz(test.subset(torch.arange(0, len(test), 10)), folder / "test.npz")
    return {
        "weights": weights,
        "data": folder / "train.npz",
        "eval_data": folder / "test.npz",
        "attack": weights.with_name(weights.name + ".attack.json"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--data", type=Path, help="training data file to upload (npz, tar, zip)")
    ap.add_argument("--eval-data", type=Path)
    ap.add_argument("--attack", type=Path, help="the victim's .attack.json")
    ap.add_argument("--cifar10", type=Path, default=CIFAR10, help="archive the default victim is trained from")
    ap.add_argument("--method", default="guard", choices=("guard", "paper"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the breakdown here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="clipguard-latency-") as tmp:
        work = Path(tmp)
        if args.weights is None:
            inputs = victim(work, args.cifar10)
        else:
            inputs = {"weights": args.weights, "data": args.data, "eval_data": args.eval_data, "attack": args.attack}
        port = free_port()
        env = {
            **os.environ,
            "CLIPGUARD_HOME": str(work / "home"),
            "CLIPGUARD_DEVICE": args.device,
            "CLIPGUARD_RATE_LIMIT_PER_MINUTE": "0",
        }
        cli = [sys.executable, "-c", "from clipguard.cli import main; main()"]
        key = subprocess.run(
            [*cli, "keys", "create", "--tenant", "bench"], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        t = time.perf_counter()
        server = subprocess.Popen(
            [*cli, "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(work / "serve.log").open("w"),
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.perf_counter() - t > 120:
                    raise SystemExit(
                        "service_latency: the server did not become ready:\n" + (work / "serve.log").read_text()[-2000:]
                    )
                time.sleep(0.2)
            startup = time.perf_counter() - t
            result = run_job(url, key, inputs, args, work)
            result["startup_s"] = startup
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    result.update(
        {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "load": os.getloadavg(),
            "method": args.method,
            "device": args.device,
        }
    )
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def run_job(url: str, key: str, inputs: dict, args: argparse.Namespace, work: Path) -> dict:
    spans: dict[str, float] = {}
    seen_running: list[float] = []
    with Client(url, key, progress=False) as client:
        t = time.perf_counter()
        model = client.upload_model(inputs["weights"], arch=args.arch)
        spans["upload_model"] = time.perf_counter() - t
        t = time.perf_counter()
        train = client.add_dataset(str(inputs["data"]))
        spans["upload_train"] = time.perf_counter() - t
        test = None
        if inputs.get("eval_data"):
            t = time.perf_counter()
            test = client.add_dataset(str(inputs["eval_data"]))
            spans["upload_test"] = time.perf_counter() - t
        uploaded = time.perf_counter()
        client.wait_model(model.id, poll_s=0.1)
        spans["quarantine_wait"] = time.perf_counter() - uploaded
        attack = json.loads(Path(inputs["attack"]).read_text()) if inputs.get("attack") and test else None
        t = time.perf_counter()
        job = client.submit(
            model.id, train.id, method=args.method, test_data_id=test.id if test else None, attack=attack
        )
        spans["submit"] = time.perf_counter() - t

        def watch(j) -> None:
            if j.state == "running" and not seen_running:
                seen_running.append(time.perf_counter())

        job = client.wait(job.id, poll_s=0.1, timeout_s=3600, on_update=watch)
        finished = time.perf_counter()
        if job.state != "succeeded":
            raise SystemExit(f"service_latency: job {job.state}: {job.error}")
        t = time.perf_counter()
        paths = client.download(job, work / "out")
        spans["download"] = time.perf_counter() - t
    report = json.loads(next(p for p in paths if p.name == "report.json").read_text())
    timings = report.get("timings") or {}
    queued = (job.started_at - job.created_at).total_seconds() if job.started_at else None
    ran = (job.finished_at - job.started_at).total_seconds() if job.started_at and job.finished_at else None
    engine = timings.get("total_s")
    return {
        "spans": spans,
        "queue_wait_s": queued,
        "job_run_s": ran,
        "engine_stages_s": {k: v for k, v in timings.items() if k != "total_s"},
        "engine_total_s": engine,
        "worker_outside_engine_s": None if ran is None or engine is None else ran - engine,
        "upload_complete_to_artifacts_s": finished - uploaded + spans["download"],
        "summary": None
        if not job.summary
        else {
            **{k: {m: (job.summary.get(k) or {}).get(m) for m in ("acc", "asr")} for k in ("before", "after")},
            "verdict": job.summary.get("verdict"),
        },
        "artifacts": {p.name: p.stat().st_size for p in paths},
    }


def table(r: dict) -> str:
    rows = [("server start (not in the total)", r["startup_s"])]
    rows += [(k.replace("_", " "), v) for k, v in r["spans"].items() if k != "download"]
    rows.append(("queue wait (job row: created -> started)", r["queue_wait_s"]))
    rows += [(f"  engine: {k.removesuffix('_s')}", v) for k, v in r["engine_stages_s"].items()]
    rows.append(("worker outside the engine (claim, fetch, publish)", r["worker_outside_engine_s"]))
    rows.append(("download", r["spans"]["download"]))
    total = r["upload_complete_to_artifacts_s"]
    lines = [
        f"{r['method']} on {r['device']}, {r['machine']}, {r['date']}, load {r['load'][0]:.1f}",
        "",
        "| span | seconds | share of upload-complete -> artifacts |",
        "|---|---|---|",
    ]
    for name, value in rows:
        share = (
            ""
            if value is None or name.startswith("server") or name.startswith("upload")
            else f"{100 * value / total:.0f}%"
        )
        lines.append(f"| {name} | {'-' if value is None else f'{value:.2f}'} | {share} |")
    lines.append(f"| **upload complete -> artifacts downloaded** | **{total:.2f}** | 100% |")
    if r.get("summary"):
        lines += ["", f"job summary: {json.dumps(r['summary'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
