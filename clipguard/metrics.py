"""ACC, ASR, RA and DER, measured the way the field reports them.

Conventions (BackdoorBench ``utils/metric.py``):

* ``acc``: clean accuracy on the test set.
* ``asr``: share of triggered test images whose true label is *not* the target that the
  model sends to the target (the primary number). ``asr_all`` keeps the target-class
  images in the denominator, as some papers do; it has a floor near ``1/K`` for a repaired
  model, which is why both are reported. Each attack says which images it claims to flip
  (``Attack.asr_population``): all of them, except a source-specific attack (TaCT), whose
  ASR counts its source classes only, as backdoor-toolbox measures it. All-to-all attacks
  count every image, against the label ``(y + 1) % K``.
* ``ra``: robust accuracy, triggered non-target images still given their true label.
* ``der``: defense effectiveness rate, ``[max(0, ΔASR) − max(0, ΔACC) + 1] / 2``.

All functions take any callable model (eager, TorchScript, torch.export) so the same code
scores the suspect model and the purified artifact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.inference import fast_copy, pieces


def predict(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data: ImageData,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    indices: torch.Tensor | None = None,
    stop: Callable[[int, torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Predicted labels (CPU int64); ``transform`` acts on uint8 images before normalising.

    ``stop(start, batch_predictions)``, called after each batch, ends the pass early when it returns
    True: the result is then the predictions of the samples scored so far, in order.
    """
    rewrite = isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule)
    if rewrite:  # a faster read-only copy on a CPU (clipguard.inference); scripted models run as given
        model = fast_copy(model, device)  # type: ignore[arg-type]
    elif isinstance(model, nn.Module):
        model.eval()
    order = torch.arange(len(data)) if indices is None else indices
    out = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            x = data.images[order[start : start + batch_size]]
            if transform is not None:
                x = transform(x)
            x = normalize(x.to(device), mean, std)
            logits = torch.cat([model(piece) for piece in pieces(x, device)]) if rewrite else model(x)
            out.append(logits.argmax(1).cpu())
            if stop is not None and start + len(out[-1]) < len(order) and stop(start, out[-1]):
                break
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Accuracy per true class; ``None`` for a class absent from the data (JSON has no NaN)."""
    return [
        accuracy(pred[labels == c], labels[labels == c]) if bool((labels == c).any()) else None
        for c in range(num_classes)
    ]


def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    data: ImageData,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    attack: object | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> dict:
    """Clean accuracy, and with an attack, ASR (both conventions) and RA on the same images.

    ``attack`` is any object with ``apply(uint8 images)`` and ``target_labels(labels, K)``
    (see :mod:`clipguard.attacks`), and optionally ``asr_population(labels, K)``.
    """
    num_classes = max(len(data.classes), int(data.labels.max()) + 1)
    pred = predict(model, data, mean, std, device=device, batch_size=batch_size)
    result: dict = {
        "samples": len(data),
        "acc": accuracy(pred, data.labels),
        "per_class_acc": per_class_accuracy(pred, data.labels, num_classes),
    }
    if attack is None:
        return result
    targets = attack.target_labels(data.labels, num_classes)  # type: ignore[attr-defined]
    population = getattr(attack, "asr_population", None)
    claimed = population(data.labels, num_classes) if population else torch.ones(len(data), dtype=torch.bool)
    stamp = attack.apply  # type: ignore[attr-defined]
    bd_pred = predict(model, data, mean, std, transform=stamp, device=device, batch_size=batch_size)
    keep = claimed & (targets != data.labels)
    result.update(
        {
            "asr": accuracy(bd_pred[keep], targets[keep]),
            "asr_all": accuracy(bd_pred[claimed], targets[claimed]),
            "ra": accuracy(bd_pred[keep], data.labels[keep]),
            "asr_samples": int(keep.sum()),
        }
    )
    return result


def der(before: dict, after: dict) -> float:
    """BackdoorBench's (simplified, correct-sign) defense effectiveness rate in [0, 1]."""
    d_asr = max(0.0, before["asr"] - after["asr"])
    d_acc = max(0.0, before["acc"] - after["acc"])
    return (d_asr - d_acc + 1.0) / 2.0


def evaluate_model(
    *,
    data: str,
    arch: str | None = None,
    weights: Path | None = None,
    model: Path | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    attack: str | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
) -> dict:
    """``clipguard evaluate``: score a checkpoint (``--arch --weights``) or an export (``--model``)."""
    from clipguard.attacks import build_attack
    from clipguard.checkpoint import load_weights
    from clipguard.data import default_cache_dir, load_data
    from clipguard.devices import resolve_device
    from clipguard.errors import ClipguardError
    from clipguard.export import load_exported
    from clipguard.models import CIFAR10_MEAN, CIFAR10_STD, resolve_spec

    if (weights is None) == (model is None):
        raise ClipguardError("give either {weights} (with {arch}) or {model}", options=True)
    dev = resolve_device(device)
    test = load_data(data, default_split="test", cache_dir=cache_dir or default_cache_dir())
    if weights is not None:
        if arch is None:
            raise ClipguardError("{weights} needs {arch}", options=True)
        spec = resolve_spec(arch, num_classes, mean, std)
        net: nn.Module = spec.build()
        load_weights(net, weights)
        m, s = spec.mean, spec.std
    else:
        if not Path(model).exists():  # type: ignore[arg-type]
            raise ClipguardError(f"model file not found: {model}")
        net, meta = load_exported(model)  # type: ignore[arg-type]
        if arch is not None:
            spec = resolve_spec(arch, num_classes, mean, std)
            m, s = spec.mean, spec.std
        else:  # our exports carry their normalisation; an explicit flag still wins
            m = tuple(mean or meta.get("mean") or CIFAR10_MEAN)
            s = tuple(std or meta.get("std") or CIFAR10_STD)
    net = net.to(dev)
    trigger = build_attack(attack, image_size=test.image_size) if attack else None
    result = evaluate(net, test, m, s, attack=trigger, device=dev)
    result["data"] = str(data)
    result["attack"] = trigger.to_dict() if trigger is not None else None
    return result
