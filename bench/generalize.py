"""The generalisation matrix: victims nobody tuned for, the paper's recipe vs clipguard's default.

Each victim is trained here (``clipguard.train.train_victim``, as ``clipguard train`` does) on
real CIFAR-10 from the shared archive, with a trigger, poison rate, target class and
architecture from the matrix, or with no attack at all (a *clean* victim, the control a
defense must leave alone). Then the same engine entry point the CLI and the service use,
``clipguard.purify.purify``, runs twice on the (poisoned) training data the victim saw:

* ``--method paper`` (μ+λσ clipping of the model as given): ACC/ASR at its default λ = 4 and
  at its best λ with hindsight (max DER over the report's λ sweep on the test images);
* ``--method guard`` (the default: detect the poisoned share, unlearn it, clip) at its default.

    python bench/generalize.py --profile cpu      # small nets on 10k real CIFAR-10 images, 2 cores
    python bench/generalize.py --profile families --seeds 0,1   # every attack family + clean victims, CPU-sized
    python bench/generalize.py --profile gpu --seeds 0,1        # the same families at the paper's scale (a GPU)
    python bench/generalize.py --profile gpu-arch # ResNet-18 / VGG-16 / MobileNetV3, full CIFAR-10
    python bench/generalize.py --profile cpu50k-aug   # small_cnn on all 50k images, augmented (~15 min)
    python bench/generalize.py --profile smoke    # a Blend and a clean victim, proves the plumbing

``--combine a/generalize.json b/generalize.json`` prints one table for runs split by ``--only``.
``--train-only`` trains (or keeps) the victims and prints their undefended ACC/ASR without
purifying, so victims can be prepared ahead; a later run without it reuses their weights.
``--only a,b`` runs some victims; ``--seeds 0,1`` runs each victim once per seed (the seed
draws the training subset, the poisoned samples, random triggers and the initialisation).

Writes ``<out>/generalize.json`` (appended per victim, so a long run can be read while it
goes) and prints the markdown table docs/lab/results.md quotes, with the medians the issue asks for.
Per victim and method it keeps the report's own fields (detection, unlearning, and whatever a
newer report adds, such as a verdict) and, with the victim's provenance, how many of guard's
named suspects were poisoned samples, cover samples or clean ones.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.attacks import load_attack  # noqa: E402
from clipguard.data import default_cache_dir, load_data, save_npz  # noqa: E402
from clipguard.devices import describe, resolve_device  # noqa: E402
from clipguard.metrics import der  # noqa: E402
from clipguard.purify import PurifyOptions, purify  # noqa: E402
from clipguard.train import attack_path, train_victim  # noqa: E402

CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
TRIGGER_IMAGE = "test/cat/0000.jpg"
"""The Blend-with-an-image trigger: a CIFAR-10 test image cut from the archive at run time."""

# name, arch, attack (None: a clean victim), poison rate, target; training recipe per profile below.
# Attack families as docs/attacks.md describes them; {trigger} is the CIFAR-10 test image above, the
# stand-in for the hellokitty image Blend and Adap-Blend publish with (used at the paper's scale).
FAMILIES_CPU = [
    ("clean", "small_cnn", None, 0.0, 0),
    ("clean-tv-resnet18", "torchvision:resnet18", None, 0.0, 0),
    ("clean-mobilenetv3", "torchvision:mobilenet_v3_small", None, 0.0, 0),
    ("badnets-3-checker", "small_cnn", "badnets:pattern=checkerboard", 0.03, 0),
    ("blend-noise", "small_cnn", "blend", 0.03, 0),
    ("wanet-12pct", "small_cnn", "wanet", 0.12, 0),
    ("sig-clean", "small_cnn", "sig", 0.05, 0),
    ("sig-dirty", "small_cnn", "sig:label=dirty", 0.01, 0),
    ("tact", "small_cnn", "tact", 0.01, 0),
    # Adap-Blend and Adap-Patch do not implant in a 10k-image SmallCNN at their published rates (or
    # at 1-5%, bench/attacks_smoke.py in docs/attacks.md); at 10% poison (+10% / +20% covers) they do.
    # Their seeded-noise and substitute-patch triggers, as measured there.
    ("adap-blend-10pct", "small_cnn", "adap_blend", 0.1, 0),
    ("adap-patch-10pct", "small_cnn", "adap_patch", 0.1, 0),
    # all-to-all needs more poison than all-to-one here: 10% gave 37-45% ASR, 20% 54-57% (docs/attacks.md)
    ("badnets-all2all-20pct", "small_cnn", "badnets-all2all:pattern=checkerboard", 0.2, 0),
    ("blend-all2all-20pct", "small_cnn", "blend-all2all", 0.2, 0),
    # the published low rates (0.3-0.5%): some do not implant in a 10k-image victim; the table says which
    ("badnets-3-checker-0.5pct", "small_cnn", "badnets:pattern=checkerboard", 0.005, 0),
    ("sig-clean-0.5pct", "small_cnn", "sig", 0.005, 0),
    ("adap-blend-0.3pct", "small_cnn", "adap_blend", 0.003, 0),
    ("adap-patch-0.3pct", "small_cnn", "adap_patch", 0.003, 0),
    ("tact-0.3pct", "small_cnn", "tact", 0.003, 0),
    # families on the other two architectures
    ("tact-tv-resnet18", "torchvision:resnet18", "tact", 0.01, 0),
    ("sig-dirty-mobilenetv3", "torchvision:mobilenet_v3_small", "sig:label=dirty", 0.01, 0),
]
# The paper's scale: all 50,000 images, BackdoorBench's PreAct-ResNet18 and a CIFAR ResNet-18, published
# rates (BackdoorBench for BadNets/Blend/SIG/all-to-all, backdoor-toolbox's CT-paper settings for WaNet,
# Adap-* and TaCT).
FAMILIES_GPU = [
    (f"{name}-{arch}", arch, attack, rate, target)
    for arch in ("preact_resnet18", "resnet18")
    for name, attack, rate, target in (
        ("clean", None, 0.0, 0),
        ("badnets", "badnets", 0.01, 0),
        ("blend-image", "blend:image={trigger}", 0.01, 0),
        ("wanet-5pct", "wanet", 0.05, 0),
        ("sig-clean-2pct", "sig", 0.02, 0),
        ("sig-dirty", "sig:label=dirty", 0.01, 0),
        ("adap-blend", "adap_blend:image={trigger}", 0.003, 0),
        ("adap-patch", "adap_patch", 0.003, 0),
        ("tact", "tact", 0.003, 0),
        ("badnets-all2all", "badnets-all2all", 0.1, 0),
        ("badnets-0.5pct", "badnets", 0.005, 0),
        ("blend-image-0.3pct", "blend:image={trigger}", 0.003, 0),
        ("sig-clean-0.5pct", "sig", 0.005, 0),
    )
]
MATRIX = {
    "cpu": [
        ("badnets-3-checker-br", "small_cnn", "badnets:pattern=checkerboard", 0.03, 0),
        ("badnets-3-white-br", "small_cnn", "badnets", 0.05, 0),
        ("badnets-5-checker-tl", "small_cnn", "badnets:size=5,pattern=checkerboard,position=top-left", 0.01, 3),
        ("badnets-4-grey-tr", "small_cnn", "badnets:size=4,value=128,position=top-right", 0.03, 7),
        ("blend-noise", "small_cnn", "blend", 0.03, 0),
        ("blend-noise-0.5pct", "small_cnn", "blend", 0.005, 5),
        ("blend-image", "small_cnn", "blend:image={trigger}", 0.03, 2),
        ("badnets-3-checker-tv-resnet18", "torchvision:resnet18", "badnets:pattern=checkerboard", 0.02, 0),
        ("blend-noise-mobilenetv3", "torchvision:mobilenet_v3_small", "blend", 0.03, 1),
        ("wanet", "small_cnn", "wanet", 0.05, 0),
        # rates at which the triggered images outnumber the target class's own (detection.poisoned_side)
        ("badnets-3-checker-br-15pct", "small_cnn", "badnets:pattern=checkerboard", 0.15, 0),
        ("wanet-12pct", "small_cnn", "wanet", 0.12, 0),
    ],
    "families": FAMILIES_CPU,
    "gpu": FAMILIES_GPU,
    "gpu-arch": [
        (f"{a.split(':')[0]}-{arch.replace('torchvision:', 'tv-')}-{rate}", arch, a, rate, t)
        for arch in ("resnet18", "torchvision:resnet18", "vgg16_bn", "torchvision:mobilenet_v3_large")
        for a, rate, t in (
            ("badnets", 0.01, 0),
            ("blend", 0.01, 0),
            ("wanet", 0.01, 0),
            ("badnets:size=5,pattern=checkerboard,position=top-left", 0.005, 3),
            ("blend:image={trigger}", 0.05, 2),
        )
    ],
    "smoke": [("blend-noise", "small_cnn", "blend", 0.05, 0), ("clean", "small_cnn", None, 0.0, 0)],
    # all 50,000 images with crop-and-flip augmentation, as the GPU victims are trained: where a
    # patch trigger hides from averaged features (detection's spatial peaks, docs/method.md)
    "cpu50k-aug": [
        ("badnets-3-white-br-2pct-aug", "small_cnn", "badnets", 0.02, 0),
        ("badnets-3-checker-br-1pct-aug", "small_cnn", "badnets:pattern=checkerboard", 0.01, 0),
        ("blend-noise-1pct-aug", "small_cnn", "blend", 0.01, 0),
    ],
}
GPU_RECIPE = dict(limit=None, epochs=30, augment=True, lr=0.1, batch_size=512, test_stride=1)
RECIPES = {
    "cpu": dict(limit=10000, epochs=8, augment=False, lr=0.05, batch_size=128, test_stride=4),
    "families": dict(limit=10000, epochs=8, augment=False, lr=0.05, batch_size=128, test_stride=4),
    "gpu": GPU_RECIPE,
    "gpu-arch": GPU_RECIPE,
    "smoke": dict(limit=3000, epochs=3, augment=False, lr=0.05, batch_size=128, test_stride=20),
    "cpu50k-aug": dict(limit=None, epochs=8, augment=True, lr=0.05, batch_size=128, test_stride=4),
}
# Heavier architectures get a subset on CPU so the profile stays inside its time budget.
CPU_OVERRIDES = {
    "torchvision:resnet18": dict(limit=10000, epochs=6, augment=False, lr=0.05),
    "torchvision:mobilenet_v3_small": dict(limit=10000, epochs=10, augment=False, lr=0.05),
}
CPU_PROFILES = ("cpu", "families")
LEARNED_ASR = 0.5
"""A victim counts as backdoored (and enters the medians) when its undefended ASR reaches this."""
# Report fields that are not about what the defense decided (kept in report.json beside the victim).
REPORT_SKIP = (
    "schema",
    "clipguard_version",
    "created",
    "inputs",
    "statistics",
    "sites",
    "export",
    "evaluation",
    "device",
    "torch_version",
    "timings",
    "artifacts",
)


def trigger_image(archive: Path, out: Path) -> Path:
    path = out / "trigger.jpg"
    if not path.exists():
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.lstrip("./") == TRIGGER_IMAGE)
            path.write_bytes(io.BytesIO(tar.extractfile(member).read()).getvalue())
    return path


def victim_folder(out: Path, name: str, seed: int) -> Path:
    """Seed 0 keeps the single-seed layout (``<out>/<name>``), so earlier victims are reused."""
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def train_row(row: tuple, profile: str, args: argparse.Namespace, seed: int, device: str) -> tuple[Path, dict]:
    """Train the victim of ``row`` for ``seed`` unless its weights exist; its folder and the entry's head."""
    name, arch, attack, rate, target = row
    if attack is not None:
        attack = attack.format(trigger=trigger_image(args.data, args.out))
    recipe = dict(RECIPES[profile])
    if profile in CPU_PROFILES:
        recipe.update(CPU_OVERRIDES.get(arch, {}))
    folder = victim_folder(args.out, name, seed)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "victim.safetensors"
    t = time.perf_counter()
    if not weights.exists() or args.retrain:
        train_victim(
            arch=arch,
            data=f"{args.data}#train",
            out=weights,
            attack=attack,
            poison_rate=rate,
            target=target,
            epochs=recipe["epochs"],
            batch_size=recipe["batch_size"],
            lr=recipe["lr"],
            augment=recipe["augment"],
            seed=seed,
            device=device,
            limit=recipe["limit"],
            save_data=folder / "train.npz",
        )
    info = json.loads(weights.with_name(weights.name + ".json").read_text())
    poisoning = info.get("poisoning") or {}
    entry: dict = {
        "name": name,
        "seed": seed,
        "arch": arch,
        "attack": attack,
        "poison_rate": rate,
        "target": target,
        "family": family(attack),
        "clean": attack is None,
        "recipe": recipe,
        "train_s": time.perf_counter() - t,
        "poisoned": len(poisoning.get("indices") or []),
        "covers": len(poisoning.get("cover_indices") or []),
    }
    return folder, entry


def family(attack: str | None) -> str:
    """The attack's registered name with its mode (``badnets``, ``tact``, ``sig-dirty``, ``blend-all2all``...)."""
    if attack is None:
        return "clean"
    name = attack.split(":")[0]
    if "label=dirty" in attack:
        name += "-dirty"
    return name


def undefended(folder: Path, arch: str, test_ref: Path, device: str) -> dict:
    """ACC (and ASR) of the victim as trained, on the bench's test images: does it carry its backdoor?"""
    from clipguard.checkpoint import load_weights
    from clipguard.metrics import evaluate
    from clipguard.models import resolve_spec

    weights = folder / "victim.safetensors"
    spec = resolve_spec(arch)
    net = spec.build()
    load_weights(net, weights)
    path = attack_path(weights)
    trigger = load_attack(path) if path.exists() else None
    r = evaluate(net.to(device), load_data(str(test_ref)), spec.mean, spec.std, attack=trigger, device=device)
    return {"acc": r["acc"], "asr": r.get("asr")}


def run_victim(folder: Path, entry: dict, test_ref: Path, device: str) -> dict:
    """Purify the victim with both methods; ``entry`` gains before/paper/paper_best/guard."""
    weights = folder / "victim.safetensors"
    attack_file = attack_path(weights)
    info = json.loads(weights.with_name(weights.name + ".json").read_text())
    for method in ("paper", "guard"):
        t = time.perf_counter()
        result = purify(
            PurifyOptions(
                arch=entry["arch"],
                weights=weights,
                data=str(folder / "train.npz"),
                out=folder / method,
                eval_data=str(test_ref),
                attack=str(attack_file) if attack_file.exists() else None,
                method=method,
                device=device,
                sweep=method == "paper",
                overwrite=True,
                # a clean victim has no ASR to come back: its check would only cost time
                reactivation_check=method == "guard" and not entry["clean"],
            )
        )
        rep = result.report
        ev = rep["evaluation"]
        entry["before"] = {k: ev["before"].get(k) for k in ("acc", "asr")}
        entry[method] = {
            "lam": rep["lam"],
            "acc": ev["after"]["acc"],
            "asr": ev["after"].get("asr"),
            "der": ev.get("der"),
            "seconds": time.perf_counter() - t,
            "defense_s": sum(
                v for k, v in rep["timings"].items() if k not in ("load_s", "evaluate_s", "total_s", "export_s")
            ),
            "report": report_fields(rep, info),
        }
        if method == "paper" and entry["before"]["asr"] is not None:
            best = max(ev["sweep"], key=lambda r: der(ev["before"], r))
            entry["paper_best"] = {
                "lam": best["lam"],
                "acc": best["acc"],
                "asr": best["asr"],
                "scored_on": "the report's λ-sweep subset of the test images",
            }
        elif method == "paper":  # a clean victim: no ASR, so no "best" λ; the sweep's λ=4 row is the paper row
            entry["paper_best"] = None
        else:
            found = rep.get("poison_detection") or {}
            entry["guard"]["detection"] = {k: found.get(k) for k in ("flagged", "target", "z", "suspects", "side")}
            entry["guard"]["verdict"] = rep.get("verdict")
            again = rep.get("reactivation") or {}
            entry["guard"]["reactivation"] = {
                "asr": (again.get("after") or {}).get("asr"),
                "acc": (again.get("after") or {}).get("acc"),
                "agreement": again.get("agreement"),
            }
    return entry


def report_fields(rep: dict, info: dict) -> dict:
    """What the defense decided, as its report says (new fields included), and who its suspects were."""
    kept = {k: v for k, v in rep.items() if k not in REPORT_SKIP}
    unlearning = kept.get("unlearning")
    if isinstance(unlearning, dict) and "suspect_indices" in unlearning:
        named = set(unlearning["suspect_indices"])
        poisoning = info.get("poisoning") or {}
        poisoned, covers = set(poisoning.get("indices") or []), set(poisoning.get("cover_indices") or [])
        kept["unlearning"] = {k: v for k, v in unlearning.items() if k != "suspect_indices"}
        kept["suspects_named"] = {
            "total": len(named),
            "poisoned": len(named & poisoned),
            "covers": len(named & covers),
            "clean": len(named - poisoned - covers),
            "poisoned_missed": len(poisoned - named),
        }
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(MATRIX), default="cpu")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="victim names to run, comma- or space-separated (default: the whole matrix)",
    )
    ap.add_argument("--data", type=Path, default=CIFAR10)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "generalize")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="one seed (kept for earlier commands; see --seeds)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, each victim runs once per seed (e.g. 0,1)")
    ap.add_argument("--retrain", action="store_true", help="train victims again even if their weights exist")
    ap.add_argument(
        "--train-only",
        action="store_true",
        help="train (or keep) the victims and print their undefended ACC/ASR; no purification",
    )
    ap.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="print one table and summary for several generalize.json files (runs split by --only) and exit",
    )
    args = ap.parse_args()
    if args.combine:
        print(markdown(combine(args.combine)))
        return
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()] if args.seeds else [args.seed]
    only = {n.strip() for item in args.only or [] for n in item.split(",") if n.strip()}
    rows = [row for row in MATRIX[args.profile] if not only or row[0] in only]
    unknown = only - {row[0] for row in MATRIX[args.profile]}
    if unknown:
        ap.error(f"not in profile {args.profile}: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    test = load_data(f"{args.data}#test", cache_dir=default_cache_dir())
    stride = RECIPES[args.profile]["test_stride"]
    test_ref = save_npz(test.subset(torch.arange(0, len(test), stride)), args.out / f"test-stride{stride}.npz")
    result_path = args.out / ("victims.json" if args.train_only else "generalize.json")
    result = {
        "profile": args.profile,
        "device": describe(device),
        "torch": torch.__version__,
        "seeds": seeds,
        "test_samples": len(range(0, len(test), stride)),
        "train_only": args.train_only,
        "rows": [],
    }
    for row in rows:
        for seed in seeds:
            folder, entry = train_row(row, args.profile, args, seed, str(device))
            if args.train_only:
                entry["before"] = undefended(folder, entry["arch"], test_ref, str(device))
            else:
                entry = run_victim(folder, entry, test_ref, str(device))
            result["rows"].append(entry)
            result_path.write_text(json.dumps(result, indent=2) + "\n")
            keys = ("name", "seed", "poisoned", "covers", "before", "paper", "paper_best", "guard")
            print(json.dumps({k: strip(entry[k]) for k in keys if k in entry}, default=str), flush=True)
    print(markdown(result))


def combine(paths: list[Path]) -> dict:
    """Several runs' results as one (rows in the order given; seeds and test sizes as the runs said)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if len({r["profile"] for r in runs}) > 1 or len({r["test_samples"] for r in runs}) > 1:
        raise SystemExit("generalize: --combine needs runs of one profile on the same test images")
    seeds = sorted({s for r in runs for s in r.get("seeds", [r.get("seed", 0)])})
    return {**runs[0], "seeds": seeds, "rows": [row for r in runs for row in r["rows"]]}


def strip(value: object) -> object:
    """A result without the kept report fields, for the one-line progress print."""
    return {k: v for k, v in value.items() if k != "report"} if isinstance(value, dict) else value


def markdown(result: dict) -> str:
    """The table and the issue's summary figures (medians over the victims that learned their backdoor)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    def cell(r: dict | None) -> str:
        return "-" if r is None else f"{pct(r['acc'])} / {pct(r.get('asr'))}"

    seeds = ",".join(str(s) for s in result.get("seeds", [result.get("seed", 0)]))
    head = f"profile {result['profile']} on {result['device']}, {result['test_samples']} test images, seeds {seeds}"
    rows = result["rows"]
    if result.get("train_only"):
        lines = [
            head + " (undefended victims only)",
            "",
            "| victim | seed | arch | family | poison | poisoned + covers | no defense |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['name']} | {r['seed']} | {r['arch']} | {r['family']} | {100 * r['poison_rate']:g}% | "
                f"{r['poisoned']} + {r['covers']} | {cell(r['before'])} |"
            )
        return "\n".join(lines)
    lines = [
        head,
        "",
        "| victim | seed | arch | family | poison | target | no defense | paper λ=4 | paper best λ | "
        "guard (default) | verdict | named (poisoned / covers / clean) | re-tuned ASR | guard s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    learned, clean = [], []
    for r in rows:
        g = r["guard"]
        verdict = g.get("verdict") or {}
        said = verdict.get("status", "?") + (f" {verdict['classes']}" if verdict.get("classes") else "")
        named = (g.get("report") or {}).get("suspects_named")
        who = f"{named['poisoned']} / {named['covers']} / {named['clean']}" if named else "-"
        again = (g.get("reactivation") or {}).get("asr")
        best = r.get("paper_best")
        best_cell = f"{cell(best)} (λ={best['lam']:g})" if best else "-"
        lines.append(
            f"| {r['name']} | {r.get('seed', 0)} | {r['arch']} | {r.get('family', '')} | "
            f"{100 * r['poison_rate']:g}% | {r['target']} | {cell(r['before'])} | {cell(r['paper'])} | "
            f"{best_cell} | {cell(g)} | {said} | {who} | {pct(again)} | {g['defense_s']:.0f} |"
        )
        if r.get("clean") or r["before"].get("asr") is None:
            clean.append(r)
        elif r["before"]["asr"] >= LEARNED_ASR:
            learned.append(r)
    if learned:

        def med(values: list[float]) -> float:
            return 100 * statistics.median(values)

        drop = [r["before"]["acc"] - r["guard"]["acc"] for r in learned]
        asr = [r["guard"]["asr"] for r in learned]
        worst = max(learned, key=lambda r: r["guard"]["asr"])
        worse = [
            f"{r['name']} (seed {r.get('seed', 0)})"
            for r in learned
            if r["guard"]["asr"] > r["paper"]["asr"] + 0.01 or r["guard"]["acc"] < r["paper"]["acc"] - 0.01
        ]
        right = [
            r
            for r in learned
            if (r["guard"].get("verdict") or {}).get("status") == "backdoor_found"
            and r["target"] in ((r["guard"].get("verdict") or {}).get("classes") or [])
        ]
        again = [
            r["guard"]["reactivation"]["asr"]
            for r in learned
            if (r["guard"].get("reactivation") or {}).get("asr") is not None
        ]
        lines += [
            "",
            f"Over the {len(learned)} victims whose backdoor was learned (ASR ≥ {100 * LEARNED_ASR:.0f}% undefended):",
            f"- guard: median ASR {med(asr):.1f}%, worst {100 * max(asr):.1f}% ({worst['name']} seed "
            f"{worst.get('seed', 0)}); median ACC drop {med(drop):.1f} points (worst {100 * max(drop):.1f})",
            f"- paper λ=4: median ASR {med([r['paper']['asr'] for r in learned]):.1f}%, median ACC drop "
            f"{med([r['before']['acc'] - r['paper']['acc'] for r in learned]):.1f} points",
            f"- verdict 'backdoor found' with the true target: {len(right)} of {len(learned)}",
            f"- victims where guard is worse than paper λ=4 (ASR by > 1 point or ACC by > 1 point): "
            f"{', '.join(worse) or 'none'}",
        ]
        if again:
            lines.append(
                f"- after the reactivation check's fine-tune: median ASR {med(again):.1f}%, worst "
                f"{100 * max(again):.1f}%"
            )
    if clean:
        flagged = [
            f"{r['name']} (seed {r.get('seed', 0)})"
            for r in clean
            if (r["guard"].get("verdict") or {}).get("status") == "backdoor_found"
        ]
        unsure = [
            f"{r['name']} (seed {r.get('seed', 0)})"
            for r in clean
            if (r["guard"].get("verdict") or {}).get("status") == "inconclusive"
        ]
        drop = [r["before"]["acc"] - r["guard"]["acc"] for r in clean]
        lines += [
            "",
            f"Clean victims ({len(clean)}): 'backdoor found' on {len(flagged)} "
            f"({', '.join(flagged) or 'none'}), 'inconclusive' on {len(unsure)} "
            f"({', '.join(unsure) or 'none'}); ACC drop median {100 * statistics.median(drop):.1f} points, "
            f"worst {100 * max(drop):.1f}",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
