"""Could scaling consistency be guard's second line? An experiment on the generalisation matrix's victims.

When guard confirms nothing, the μ+λσ clip is the only defense left, and the attacks built to evade
latent separation (Adap-Blend, Adap-Patch, TaCT) pass it. Input-level detectors that need no clean
data score each input by how consistent the model's decision stays when something is amplified:

* IBD-PSC (Hou et al., ICML 2024): the BatchNorm weights and biases of the last ``k`` layers scaled by
  ``n`` (1.5-3 here); the score is the mean probability of the original decision. Poisoned inputs keep it.
* SCALE-UP (Guo et al., ICLR 2023): the pixels multiplied by 2-5 (clipped); the score is the share of
  scaled copies predicted as the original.

Applied to the training data (not test inputs, as published), a second line would need the poisoned
samples to score above the genuine ones (AUROC) and, to be confirmed, to concentrate in a class the
way they do not in a clean model. This prints both per victim folder of ``bench/generalize.py``:

    python bench/generalize.py --profile families --only adap-blend-10pct,tact,blend-noise,clean \\
        --seeds 0 --train-only --out runs/sl
    python bench/scaling_consistency.py runs/sl/clean runs/sl/blend-noise runs/sl/adap-blend-10pct runs/sl/tact
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clipguard.checkpoint import load_weights  # noqa: E402
from clipguard.data import load_data, normalize  # noqa: E402
from clipguard.models import ModelSpec, resolve_spec  # noqa: E402

LAYERS = (1, 2, 3)
FACTORS = (1.5, 2.0, 2.5, 3.0)
PIXEL_FACTORS = (2, 3, 4, 5)
HIGH = 0.9
"""A score above this counts as consistent (IBD-PSC's published threshold)."""


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    ranks = torch.cat([pos, neg]).argsort().argsort().double() + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.inference_mode()
def probabilities(net: nn.Module, images: torch.Tensor, spec: ModelSpec, batch: int = 1000) -> torch.Tensor:
    return torch.cat(
        [net(normalize(images[i : i + batch], spec.mean, spec.std)).softmax(1) for i in range(0, len(images), batch)]
    )


def psc(net: nn.Module, images: torch.Tensor, spec: ModelSpec, pred: torch.Tensor, k: int) -> torch.Tensor:
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)][-k:]
    saved = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in norms]
    score = torch.zeros(len(images))
    for n in FACTORS:
        with torch.no_grad():
            for m in norms:
                m.weight.mul_(n)
                m.bias.mul_(n)
        score += probabilities(net, images, spec).gather(1, pred[:, None])[:, 0]
        with torch.no_grad():
            for m, (w, b) in zip(norms, saved, strict=True):
                m.weight.copy_(w)
                m.bias.copy_(b)
    return score / len(FACTORS)


def scale_up(net: nn.Module, images: torch.Tensor, spec: ModelSpec, pred: torch.Tensor) -> torch.Tensor:
    same = torch.zeros(len(images))
    for k in PIXEL_FACTORS:
        scaled = (images.float() * k).clamp(0, 255).to(torch.uint8)
        same += (probabilities(net, scaled, spec).argmax(1) == pred).float()
    return same / len(PIXEL_FACTORS)


def main(folders: list[str]) -> None:
    torch.manual_seed(0)
    print("| victim | score | AUROC poisoned vs genuine | poisoned > 0.9 | > 0.9 by predicted class |")
    print("|---|---|---|---|---|")
    for folder in map(Path, folders):
        info = json.loads((folder / "victim.safetensors.json").read_text())
        spec = resolve_spec(info.get("arch") or info["recipe"]["arch"])
        net = spec.build()
        load_weights(net, folder / "victim.safetensors")
        net.eval()
        data = load_data(str(folder / "train.npz"))
        images = data.whole("scoring")
        poisoning = info.get("poisoning") or {}
        poisoned = torch.zeros(len(data), dtype=torch.bool)
        poisoned[torch.tensor(poisoning.get("indices") or [], dtype=torch.int64)] = True
        covers = torch.zeros(len(data), dtype=torch.bool)
        covers[torch.tensor(poisoning.get("cover_indices") or [], dtype=torch.int64)] = True
        genuine = ~poisoned & ~covers
        pred = probabilities(net, images, spec).argmax(1)
        scores = {f"IBD-PSC k={k}": psc(net, images, spec, pred, k) for k in LAYERS}
        scores["SCALE-UP"] = scale_up(net, images, spec, pred)
        for name, s in scores.items():
            high = s > HIGH
            roc = f"{auroc(s[poisoned], s[genuine]):.2f}" if poisoned.any() else "-"
            caught = f"{int((high & poisoned).sum())} / {int(poisoned.sum())}" if poisoned.any() else "-"
            by_class = torch.bincount(pred[high], minlength=len(data.classes)).tolist()
            print(f"| {folder.name} | {name} | {roc} | {caught} | {int(high.sum())}: {by_class} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
