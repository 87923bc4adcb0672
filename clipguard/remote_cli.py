"""``clipguard remote``: the service from the command line, each action a few calls of :class:`clipguard.remote.Client`.

Registered by ``clipguard/cli.py`` whether or not the web stack is installed: the client needs
httpx only. Errors print one line on stderr and exit 1 (``RemoteError`` is a ``ClipguardError``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from clipguard.lam import parse_lam
from clipguard.methods import DEFAULTS, METHOD_HELP, Granularity, Method
from clipguard.remote import Client, Job, RemoteError

ENV_SERVER = "CLIPGUARD_SERVER"
ENV_API_KEY = "CLIPGUARD_API_KEY"
DATA_FORMS = "a local folder or .npz/.tar/.tar.gz/.zip (PATH#split), @registered-name, or server:PATH"


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server", default=os.environ.get(ENV_SERVER), help=f"e.g. http://127.0.0.1:8000 (default: ${ENV_SERVER})"
    )
    common.add_argument("--api-key", default=os.environ.get(ENV_API_KEY), help=f"default: ${ENV_API_KEY}")
    common.add_argument("--quiet", action="store_true", help="no progress bars")

    p = subparsers.add_parser("remote", help="run a command on a clipguard server")
    remote = p.add_subparsers(dest="remote_command", required=True, metavar="ACTION")

    r = remote.add_parser(
        "purify", parents=[common], help="upload, purify on the server, download the artifacts into --out"
    )
    from clipguard.cli import add_model_options

    add_model_options(r)
    r.add_argument("--data", required=True, help=f"training data: {DATA_FORMS}")
    r.add_argument("--eval-data", default=None, help="test data, same forms as --data")
    r.add_argument("--attack", default=None, help="attack spec, or a local .attack.json from `clipguard train`")
    r.add_argument(
        "--method",
        choices=list(Method),
        default=DEFAULTS.method,
        help="; ".join(f"{m}{' (default)' if m == DEFAULTS.method else ''}: {METHOD_HELP[m]}" for m in Method),
    )
    r.add_argument("--lam", default=None, help="λ in μ+λσ (0 < λ <= 100), or 'auto'")
    r.add_argument("--granularity", choices=list(Granularity), default=DEFAULTS.granularity)
    r.add_argument(
        "--bounds-samples",
        type=int,
        default=None,
        metavar="N",
        help="measure μ and σ on at most N training images (0 = all)",
    )
    r.add_argument(
        "--resize", action="store_true", help="scale the images to the architecture's input size on the server"
    )
    r.add_argument(
        "--reactivation-check",
        action="store_true",
        help="fine-tune a copy of the purified model briefly on the server and report whether the backdoor returns",
    )
    r.add_argument("--out", type=Path, required=True, help="folder for purified.pt, bounds.safetensors, report.*")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between status polls")
    r.set_defaults(func=cmd_purify)

    r = remote.add_parser("jobs", parents=[common], help="list the tenant's jobs, newest first")
    r.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"), default=None)
    r.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    r.add_argument("--json", action="store_true", help="one JSON object per line")
    r.set_defaults(func=cmd_jobs)

    r = remote.add_parser("status", parents=[common], help="a job's state, progress, results and artifacts")
    r.add_argument("job", help="job id")
    r.add_argument("--wait", action="store_true", help="wait until it finishes; exit 1 unless it succeeded")
    r.add_argument("--poll", type=float, default=1.0, help="seconds between status polls with --wait")
    r.add_argument("--json", action="store_true", help="the job as JSON")
    r.set_defaults(func=cmd_status)

    r = remote.add_parser("cancel", parents=[common], help="cancel a job (queued: at once; running: next batch)")
    r.add_argument("job", help="job id")
    r.set_defaults(func=cmd_cancel)

    r = remote.add_parser("download", parents=[common], help="download a succeeded job's artifacts")
    r.add_argument("job", help="job id")
    r.add_argument("--out", type=Path, required=True, help="folder to write into")
    r.add_argument(
        "--artifact",
        action="append",
        default=None,
        metavar="NAME",
        help="only this artifact (repeatable), e.g. purified.pt",
    )
    r.set_defaults(func=cmd_download)


def _client(args: argparse.Namespace) -> Client:
    if not args.server:
        raise RemoteError(f"--server (or ${ENV_SERVER}) is required")
    if not args.api_key:
        raise RemoteError(f"--api-key (or ${ENV_API_KEY}) is required")
    return Client(args.server, args.api_key, progress=not args.quiet)


def _lam(text: str | None) -> float | str | None:
    """``--lam`` by the engine's rule (``clipguard.lam``), refused here rather than by the server."""
    if text is None:
        return None
    try:
        return parse_lam(text)
    except ValueError as exc:
        raise RemoteError(f"--lam: {exc}") from None


def _attack(text: str | None) -> str | dict | None:
    if text and Path(text).is_file():
        try:
            return json.loads(Path(text).read_text())
        except (OSError, ValueError) as exc:
            raise RemoteError(f"{text}: not an attack JSON file ({exc})") from exc
    return text


def _finished(job: Job) -> int:
    if job.state == "succeeded":
        return 0
    print(f"clipguard: error: job {job.id} {job.state}" + (f": {job.error}" if job.error else ""), file=sys.stderr)
    return 1


def cmd_purify(args: argparse.Namespace) -> int:
    lam, attack = _lam(args.lam), _attack(args.attack)
    if attack and not args.eval_data:
        raise RemoteError("--attack needs --eval-data to measure it on")
    with _client(args) as client:
        model = client.upload_model(
            args.weights, arch=args.arch, num_classes=args.num_classes or 10, mean=args.mean, std=args.std
        )
        train = client.add_dataset(args.data)
        test = client.add_dataset(args.eval_data) if args.eval_data else None
        client.wait_model(model.id)
        job = client.submit(
            model.id,
            train.id,
            method=args.method,
            lam=lam,
            granularity=args.granularity,
            bounds_samples=args.bounds_samples,
            resize=args.resize,
            reactivation_check=args.reactivation_check,
            test_data_id=test.id if test else None,
            attack=attack,
        )
        print(f"clipguard: job {job.id}", file=sys.stderr)
        job = client.wait(job.id, poll_s=args.poll)
        if job.state != "succeeded":
            return _finished(job)
        for path in client.download(job, args.out):
            print(path)
    return 0


def _percent(job: Job) -> str:
    return "" if job.percent is None else f"{job.percent:.0f}%"


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows: list[Job] = []
        for job in client.jobs(state=args.state, page_size=min(max(args.limit, 1), 200)):
            if len(rows) >= args.limit:
                break
            if args.json:
                print(job.model_dump_json())
            rows.append(job)
    if not args.json:
        _table(
            ["id", "state", "stage", "%", "method", "λ", "created"],
            [
                [
                    j.id,
                    j.state,
                    j.stage or "",
                    _percent(j),
                    str(j.params.get("method") or "guard"),
                    _fmt(j.params.get("lam")),
                    j.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                ]
                for j in rows
            ],
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.wait(args.job, poll_s=args.poll) if args.wait else client.job(args.job)
    if args.json:
        print(job.model_dump_json(indent=2))
    else:
        print(describe(job))
    return _finished(job) if args.wait else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    print(f"job {job.id}: {job.state}" + (" (stops at its next batch)" if job.state == "running" else ""))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for path in client.download(args.job, args.out, names=args.artifact):
            print(path)
    return 0


def describe(job: Job) -> str:
    """The few lines a person wants about a job: state, progress, ACC/ASR before and after, artifacts."""
    lines = [f"job {job.id}: {job.state}" + (f", {job.stage} {_percent(job)}" if job.state == "running" else "")]
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in job.params.items() if v is not None and not isinstance(v, dict))
    lines.append(
        f"  model {job.model_id}, training data {job.train_data_id}"
        + (f", test data {job.test_data_id}" if job.test_data_id else "")
        + (f"; {params}" if params else "")
    )
    if job.error:
        lines.append(f"  error: {job.error}")
    summary = job.summary or {}
    before, after = summary.get("before") or {}, summary.get("after") or {}
    for metric in ("acc", "asr"):
        if before.get(metric) is not None and after.get(metric) is not None:
            lines.append(f"  {metric.upper()} {100 * before[metric]:.1f}% -> {100 * after[metric]:.1f}%")
    if summary.get("lam") is not None:
        lines.append(f"  λ = {summary['lam']:g}")
    lines.extend(f"  {a.name}  {a.size} bytes  sha256 {a.sha256[:12]}" for a in job.artifacts)
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if value is None:
        return "default"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c) for c in column) for column in zip(head, *rows, strict=True)]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
