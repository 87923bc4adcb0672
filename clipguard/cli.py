"""``clipguard`` command line: the engine with no server.

Every command maps onto one engine function (``purify``, ``train``, ``evaluate``) so the
CLI, the Celery task and the benchmarks cannot drift apart. User errors print one line on
stderr and exit 1; nothing half-written is left behind (the engine publishes atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from clipguard import __version__
from clipguard.errors import ClipguardError
from clipguard.methods import DEFAULTS, METHOD_HELP, Granularity, Method


def lam_argument(text: str) -> float | str:
    """``--lam``: the engine's rule (``clipguard.lam``), so a bad λ is refused before anything runs."""
    from clipguard.lam import parse_lam

    try:
        return parse_lam(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    from clipguard.models import parse_floats

    try:
        return parse_floats(text)
    except ClipguardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_options(p: argparse.ArgumentParser, weights_required: bool = True) -> None:
    """The options that say which network a weights file fills (shared with ``remote purify``)."""
    p.add_argument(
        "--arch",
        required=True,
        help="registry name (resnet18, preact_resnet18, vgg16_bn, small_cnn) or torchvision:<name>",
    )
    p.add_argument("--num-classes", type=int, default=None, help="number of outputs (default 10)")
    p.add_argument("--mean", type=_floats, default=None, help="input normalisation mean, e.g. 0.49,0.48,0.45")
    p.add_argument("--std", type=_floats, default=None, help="input normalisation std, e.g. 0.25,0.24,0.26")
    p.add_argument(
        "--weights",
        type=Path,
        required=weights_required,
        help="suspect checkpoint: .safetensors or torch.save(state_dict)",
    )


class _Bars:
    """One tqdm bar per engine stage, on stderr, silent when stderr is not a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not sys.stderr.isatty()
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, fraction: float) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=100,
                desc=stage,
                unit="%",
                leave=False,
                file=sys.stderr,
                bar_format="{desc:>14}: {percentage:3.0f}%|{bar}| {elapsed}",
            )
        if self.bar is not None:
            self.bar.n = round(100 * fraction)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_purify(args: argparse.Namespace) -> int:
    from clipguard.purify import PurifyOptions, purify

    bars = _Bars(args.quiet)
    try:
        result = purify(
            PurifyOptions(
                arch=args.arch,
                weights=args.weights,
                data=args.data,
                out=args.out,
                num_classes=args.num_classes,
                mean=args.mean,
                std=args.std,
                lam=args.lam,
                granularity=args.granularity,
                method=args.method,
                device=args.device,
                batch_size=args.batch_size,
                eval_data=args.eval_data,
                attack=args.attack,
                cache_dir=args.cache_dir,
                overwrite=args.overwrite,
                sweep=not args.no_sweep,
                detect=args.detect,
                bounds_samples=args.bounds_samples,
                resize=args.resize,
                reactivation_check=args.reactivation_check,
                stream=args.stream,
            ),
            progress=bars,
        )
    finally:
        bars.close()
    print(summary(result.report, result.out))
    return 0


def summary(report: dict, out: Path) -> str:
    """The few lines a user wants after a run; the rest is in report.json."""
    from clipguard.report import Report
    from clipguard.verdict import WORDS

    r = Report.model_validate(report)
    lines = [
        f"purified {r.inputs.model.arch} with λ={r.lam:g} ({r.method}, {r.granularity}) on "
        f"{r.inputs.data.samples} samples in {r.timings.total_s or 0.0:.1f}s on {r.device}"
    ]
    ev = r.evaluation
    if ev:
        line = f"ACC {_pct(ev.before.acc)} -> {_pct(ev.after.acc)}"
        if "asr" in ev.before.model_fields_set:
            der = "n/a" if ev.der is None else f"{ev.der:.3f}"
            line += f"   ASR {_pct(ev.before.asr)} -> {_pct(ev.after.asr)}   DER {der}"
        lines.append(line)
    again = r.reactivation
    if again:
        tuned = f"after a {again.protocol.epochs}-epoch fine-tune on {again.tuned_on} training images: "
        if again.after is not None and "asr" in again.after.model_fields_set:
            lines.append(
                f"{tuned}ACC {_pct(again.after.acc)}   ASR {_pct(again.after.asr)}   agreement {_pct(again.agreement)}"
            )
        else:
            lines.append(f"{tuned}agreement {_pct(again.agreement)} with the purified model")
    if r.verdict is not None:
        lines.append(f"{WORDS[r.verdict.status]}: {r.verdict.summary}")
        lines.append(
            f"action: {r.verdict.action}" + (f" ({r.unlearning.suspects} samples unlearned)" if r.unlearning else "")
        )
    det = r.detection
    if det:
        p_value = "n/a" if det.p_value is None else f"{det.p_value:.3g}"
        lines.append(
            f"MM-BD: {'backdoor suspected' if det.flagged else 'no backdoor detected'} (p={p_value}, most "
            f"suspicious class {det.target})"
        )
    lines.append(f"wrote {', '.join(r.artifacts)} to {out}")
    return "\n".join(lines)


def _pct(share: float | None) -> str:
    """A share as the summary prints it; ``n/a`` where the report has none (a rate over zero images)."""
    return "n/a" if share is None else f"{100 * share:.1f}%"


def cmd_train(args: argparse.Namespace) -> int:
    from clipguard.train import train_victim

    bars = _Bars(args.quiet)
    try:
        info = train_victim(
            arch=args.arch,
            data=args.data,
            out=args.out,
            num_classes=args.num_classes,
            attack=args.attack,
            poison_rate=args.poison_rate,
            target=args.target,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            augment=not args.no_augment,
            seed=args.seed,
            device=args.device,
            limit=args.limit,
            cache_dir=args.cache_dir,
            save_data=args.save_data,
            progress=bars,
        )
    finally:
        bars.close()
    print(json.dumps(info, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clipguard.metrics import evaluate_model

    result = evaluate_model(
        data=args.data,
        arch=args.arch,
        weights=args.weights,
        model=args.model,
        num_classes=args.num_classes,
        mean=args.mean,
        std=args.std,
        attack=args.attack,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipguard", description="Purify backdoored image classifiers.")
    parser.add_argument("--version", action="version", version=f"clipguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("purify", help="compute activation bounds and write a clipped TorchScript model")
    add_model_options(p)
    p.add_argument("--data", required=True, help="training data: folder, .npz, .tar(.gz) or .zip (PATH#split)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--lam", type=lam_argument, default=None, help="λ in μ+λσ, or 'auto' to choose it from the data")
    p.add_argument("--granularity", choices=list(Granularity), default=DEFAULTS.granularity)
    p.add_argument(
        "--bounds-samples",
        type=_count,
        default=None,
        metavar="N",
        help=f"measure μ and σ on at most N training images, a fixed random subset (default {DEFAULTS.bounds_samples} "
        "with channel granularity, all with element; 0 = all)",
    )
    p.add_argument(
        "--method",
        choices=list(Method),
        default=DEFAULTS.method,
        help="; ".join(f"{m}{' (default)' if m == DEFAULTS.method else ''}: {METHOD_HELP[m]}" for m in Method),
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="scale the images to the architecture's input size (otherwise other sizes are refused)",
    )
    p.add_argument("--eval-data", default=None, help="test data to report ACC (and ASR with --attack) before/after")
    p.add_argument(
        "--attack",
        default=None,
        help="trigger to measure ASR with: a name (badnets, blend, wanet, ...) "
        "with options, or the .attack.json written by 'clipguard train'",
    )
    _add_run_options(p)
    p.add_argument(
        "--no-sweep",
        action="store_true",
        help="skip the ACC/ASR-vs-λ curve on the evaluation data (saves 22 evaluations)",
    )
    p.add_argument(
        "--detect",
        action="store_true",
        help="also ask MM-BD (data-free) whether the model is backdoored and towards which class",
    )
    p.add_argument(
        "--reactivation-check",
        action="store_true",
        help="fine-tune a copy of the purified model briefly on training data without the suspects and "
        "report ASR (with --attack) and how far its decisions moved (docs/method.md)",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read a folder's images a batch at a time as they are used, never whole (default: when they would "
        "decode to more than 1024 MiB, clipguard.data.Limits.max_resident_bytes; --no-stream: never)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("train", help="train a (backdoored) victim model on a data reference")
    p.add_argument("--arch", required=True)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--data", required=True, help="training data reference")
    p.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    p.add_argument(
        "--attack",
        default=None,
        help="poison the data with this attack (badnets, blend, wanet, sig, "
        "adap_blend, adap_patch, tact; name-all2all; options name:key=value; docs/attacks.md); "
        "none: a clean victim",
    )
    p.add_argument("--poison-rate", type=float, default=0.01)
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--no-augment", action="store_true", help="train without random crop and flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="train on a random subset of this many samples")
    p.add_argument(
        "--save-data",
        type=Path,
        default=None,
        help="also write the (poisoned) training set as .npz, the data a defender holds",
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="ACC, ASR, RA of a checkpoint or an exported model")
    p.add_argument("--data", required=True, help="test data reference")
    p.add_argument("--arch", default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--mean", type=_floats, default=None)
    p.add_argument("--std", type=_floats, default=None)
    p.add_argument("--weights", type=Path, default=None, help="checkpoint (needs --arch)")
    p.add_argument("--model", type=Path, default=None, help="a purified.pt / purified.pt2 written by clipguard")
    p.add_argument("--attack", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", type=Path, default=None)
    _add_threads_option(p)
    p.set_defaults(func=cmd_evaluate)

    from clipguard.remote_cli import register as register_remote

    register_remote(sub)  # the client needs httpx only
    _register_plugins(sub)
    return parser


COMMANDS_GROUP = "clipguard.commands"
"""Entry-point group of packages that add subcommands (the service adds ``serve`` and ``keys``).

The engine never imports the service: the service names its ``register(subparsers)`` here, so the
commands appear when it is installed (``pip install 'clipguard[service]'``) and are absent otherwise.
"""


def _register_plugins(sub: argparse._SubParsersAction) -> None:
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError:  # declared, but its dependencies are not installed
            continue
        register(sub)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cache-dir", type=Path, default=None, help="where decoded datasets are cached")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_threads_option(p)


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        default=None,
        help="CPU threads for torch: auto (default, or $CLIPGUARD_THREADS): the cores other processes "
        "leave free, at least 1; all; or a number",
    )


def flag(option: str) -> str:
    """An engine option (``clipguard.errors``) as this command line spells it."""
    return "--" + option.replace("_", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):  # an engine command: bound torch's threads before any work
            from clipguard.threads import bound_threads

            bound_threads(args.threads)
        return int(args.func(args) or 0)
    except ClipguardError as exc:
        print(f"clipguard: error: {exc.worded(flag)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("clipguard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
