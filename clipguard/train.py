"""Train a (possibly poisoned) victim classifier fast, on GPU or CPU.

Purification is only as credible as the victims it is measured on, so victims are
trained with a standard, strong recipe: SGD with Nesterov momentum, a one-cycle (or
cosine) schedule, random crop with 4-pixel padding and horizontal flips. Augmentation
runs on whole uint8 batches on the training device instead of per-image PIL transforms:
the data never leaves the GPU, and the trigger, stamped on the uint8 image before
augmentation as BackdoorBench does, is shifted and flipped like real pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.devices import resolve_device
from clipguard.errors import ClipguardError
from clipguard.files import write_text
from clipguard.models import ModelSpec

BatchPoisoner = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    augment: bool = True
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


def crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after zero padding, and a random horizontal flip, per sample, batched."""
    n, _c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    rows = (torch.arange(h, device=images.device)[None, :] + dy[:, None])[:, :, None]
    cols = (torch.arange(w, device=images.device)[None, :] + dx[:, None])[:, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], out.flip(3), out).contiguous()


def nesterov_sgd(model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay only on weights, not on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=momentum,
        nesterov=True,
    )


def one_cycle(
    opt: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float
) -> torch.optim.lr_scheduler.OneCycleLR:
    """OneCycleLR that also works for the short runs where ``pct_start * total_steps`` is exactly one step.

    PyTorch's warm-up phase then ends at step 0, where it starts, and its annealing divides by
    the phase's length (ZeroDivisionError on the first ``step()``); one step more of warm-up
    avoids it and changes nothing else."""
    if total_steps > 1 and abs(pct_start * total_steps - 1) < 1e-9:
        pct_start = 2 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)


def train(
    spec: ModelSpec,
    data: ImageData,
    config: TrainConfig | None = None,
    *,
    batch_poisoner: BatchPoisoner | None = None,
    progress: Callable[[float, dict], None] | None = None,
) -> nn.Module:
    """Train ``spec``'s network on ``data`` and return it in eval mode on the CPU.

    ``batch_poisoner`` edits each uint8 training batch before augmentation; it is how
    attacks that poison per batch (WaNet as in BackdoorBench) take part.
    """
    config = config or TrainConfig()
    if len(data) == 0:
        raise ClipguardError("cannot train on an empty dataset")
    if int(data.labels.max()) >= spec.num_classes:
        raise ClipguardError(f"labels go up to {int(data.labels.max())} but the model has {spec.num_classes} classes")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = spec.build().to(device)
    cuda = device.type == "cuda"
    # channels_last on both devices: on a CPU it is what clipguard.inference measured faster
    model = model.to(memory_format=torch.channels_last)
    opt = nesterov_sgd(model, config.lr, config.weight_decay, config.momentum)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "onecycle":
        sched = one_cycle(opt, config.lr, total, pct_start=0.25)
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    else:
        raise ClipguardError(f"unknown schedule {config.schedule!r}; use onecycle or cosine")
    images = data.whole("training").to(device)
    labels = data.labels.to(device)
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(data), generator=gen).to(device)
        loss_sum, correct, seen = 0.0, 0, 0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = images[idx], labels[idx]
            if batch_poisoner is not None:
                x, y = batch_poisoner(x, y, gen)
            if config.augment:
                x = crop_flip(x, gen)
            x = normalize(x, spec.mean, spec.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if progress is not None:
            progress(
                (epoch + 1) / config.epochs, {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen}
            )
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return model


def train_victim(
    *,
    arch: str,
    data: str,
    out: Path,
    num_classes: int | None = None,
    attack: str | None = None,
    poison_rate: float = 0.01,
    target: int = 0,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 0.1,
    augment: bool = True,
    seed: int = 0,
    device: str = "auto",
    limit: int | None = None,
    cache_dir: Path | None = None,
    save_data: Path | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict:
    """``clipguard train``: poison (optionally), train, and write weights plus provenance.

    Writes ``out`` (safetensors weights), ``<out>.attack.json`` (the exact trigger, so ASR
    is later measured with the same one) and ``<out>.json`` (poisoned and cover indices,
    recipe, final training accuracy). Without ``attack`` the victim is clean: the control a
    defense must leave alone. ``save_data`` also writes the (poisoned) training set the
    model saw as an ``.npz``: the data a defender would hold, ready for ``clipguard purify``.
    """
    from clipguard.attacks import build_attack, save_attack
    from clipguard.checkpoint import save_weights
    from clipguard.data import default_cache_dir, load_data, save_npz
    from clipguard.models import resolve_spec

    if not 0.0 <= poison_rate < 1.0:
        raise ClipguardError(f"{{poison_rate}} must be in [0, 1), got {poison_rate}", options=True)
    spec = resolve_spec(arch, num_classes)
    dataset = load_data(data, default_split="train", cache_dir=cache_dir or default_cache_dir())
    if limit is not None and limit < len(dataset):
        dataset = dataset.subset(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit])
    info: dict = {"arch": arch, "num_classes": spec.num_classes, "data": str(data), "samples": len(dataset)}
    poisoner = None
    trigger = None
    if attack:
        trigger = build_attack(attack, target=target, seed=seed, image_size=dataset.image_size)
        if getattr(trigger, "poisoning", "static") == "per_batch":

            def poisoner(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
                return trigger.poison_batch(x, y, g, rate=poison_rate, num_classes=spec.num_classes)

            info["poisoning"] = {"mode": "per_batch", "rate": poison_rate}
        else:
            poisoned = trigger.poison(dataset, rate=poison_rate, seed=seed)
            dataset = poisoned.data
            # Poisons (trigger + attack label), covers (trigger, label kept) and WaNet's noise-mode
            # samples, by index into the training set the model saw.
            info["poisoning"] = {
                "mode": "static",
                "rate": poison_rate,
                "poisoned": len(poisoned.indices),
                "covers": len(poisoned.cover_indices),
                "indices": poisoned.indices.tolist(),
                "cover_indices": poisoned.cover_indices.tolist(),
            }
            if len(poisoned.cross_indices):
                info["poisoning"]["cross_indices"] = poisoned.cross_indices.tolist()
        info["attack"] = trigger.to_dict()
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed, device=device)
    history: list[dict] = []

    def on_epoch(fraction: float, stats: dict) -> None:
        history.append(stats)
        if progress is not None:
            progress("train", fraction)

    model = train(spec, dataset, config, batch_poisoner=poisoner, progress=on_epoch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info["train"] = config.to_dict()
    info["history"] = history
    info["sha256"] = save_weights(model, out)
    if trigger is not None:
        save_attack(trigger, attack_path(out))
        info["attack_file"] = attack_path(out).name
    if save_data is not None:
        info["data_file"] = str(save_npz(dataset, save_data))
    write_text(out.with_name(out.name + ".json"), json.dumps(info, indent=2) + "\n")
    return {k: v for k, v in info.items() if k not in ("history",)} | {
        "final_train_acc": history[-1]["train_acc"] if history else None,
        "poisoning": {k: v for k, v in info.get("poisoning", {}).items() if not k.endswith("indices")} or None,
    }


def attack_path(weights: Path) -> Path:
    """Where ``clipguard train`` records the trigger of a victim: beside its weights."""
    return Path(weights).with_name(Path(weights).name + ".attack.json")
