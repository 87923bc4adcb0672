"""MM-BD: maximum-margin backdoor detection and mitigation (Wang, Xiang, Miller, Kesidis; IEEE S&P 2024).

Detection needs **no data**. An all-to-one backdoor lets *some* input (any image carrying
the trigger) push the target logit far above every other logit, so the largest achievable
margin ``f_t(x) − max_{j≠t} f_j(x)`` over inputs ``x ∈ [0,1]^d`` is anomalously large
for the target class. Per class we maximise the margin by gradient ascent from
``images_per_class`` uniform random images, take the best final margin as the class's
statistic ``r_t``, fit a Gamma null to the statistics of the other classes (all but the
largest), and compute the order-statistic p-value ``1 − F(r_max)^K``. Defaults (released
``univ_bd.py``, survey §3.1): 30 images per class, at most 300 steps of SGD with lr 1e-2,
early stop when the relative change of the loss is below 1e-5, flag at p ≤ 0.05.

Mitigation (MM-BM as released in ``univ_bm.py``, survey §3.2) needs a small **clean** set
(50 images per class, only those the model classifies correctly): per-channel upper
bounds ``Z`` at a few activation sites, initialised at 8, are optimised with Adam (lr 0.1,
50 epochs, batch 200) to minimise ``MSE(clipped logits, original logits) + c·Σ_s ‖Z_s‖₂``
with ``c`` starting at 0.5 and multiplied (divided) by 1.2 every 10 epochs after epoch 10
when the clipped model's accuracy on the clean set is (is not) at least 95%.

Differences from the release, on purpose:

* Inputs are optimised in pixel space ``[0,1]`` and normalised with the model's own
  mean/std before the forward (MM-BD's victims took un-normalised inputs).
* The release re-creates its SGD optimiser (momentum 0.2) at every step, so the momentum
  buffer never carries over and each step is a plain gradient step; we take that step
  directly.
* ``scipy.stats.gamma.fit`` (three parameters) is replaced by a two-parameter maximum
  likelihood fit with location 0 (Newton's method on the shape), so clipguard needs no
  SciPy; when a null statistic is not positive, all statistics are shifted so the
  smallest null value sits at a small positive offset.
* Bounds are placed with clipguard's own site machinery (``instrument``/``Clip``). For
  ``resnet18`` the default sites are the release's three (stem ReLU, ``layer1`` output,
  ``layer2`` output); for other architectures the first half of the activation sites.
* ``c0 = 0.5`` is the release's value for its ResNet-18, but the balance between the
  logit MSE and ``c·‖Z‖`` depends on the model's logit scale and channel counts: on a weak
  ``small_cnn`` the release's value drives the bounds so low the model falls to chance
  (docs/defenses.md). ``bench/table1.py``'s CPU profiles pass ``c0=0.05``; the GPU profile
  keeps the release's 0.5.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import ImageData
from clipguard.defenses.clipping import clipped_model
from clipguard.defenses.common import (
    DefenseResult,
    Timer,
    channel_shape,
    frozen_bounds,
    inputs,
    learnable_clipped,
    site_shapes,
)
from clipguard.errors import ClipguardError
from clipguard.inference import fast_copy, fast_input, piece_size
from clipguard.models import ModelSpec

DEFAULT_ALPHA = 0.05
RESNET18_SITES = ("relu", "layer1.1.relu2", "layer2.1.relu2")
"""MM-BM's three clip points on a conv-BN-ReLU ResNet-18: stem ReLU, layer1 and layer2 outputs."""


# --------------------------------------------------------------------------- detection


def margin(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``f_t − max_{j≠t} f_j`` per sample."""
    others = logits.clone()
    others[:, target] = float("-inf")
    return logits[:, target] - others.max(1).values


def _pixels_to_input(x: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
    return (x.clamp(0.0, 1.0) - mean) / std


def max_margin(
    model: nn.Module,
    spec: ModelSpec,
    target: int,
    *,
    images: int = 30,
    steps: int = 300,
    lr: float = 1e-2,
    rel_tol: float = 1e-5,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Final margins of ``images`` inputs optimised for class ``target``, and the mean margin per step.

    The loss is ``−Σ margin(clamp(x))``; the ascent stops early when the loss changes by
    less than ``rel_tol`` relative to its previous value.
    """
    model.eval()
    gen = generator or torch.Generator().manual_seed(0)
    h, w = spec.input_size
    x = torch.rand(images, 3, h, w, generator=gen).to(device)
    history: list[float] = []
    prev = None
    for _ in range(steps):
        x.requires_grad_(True)
        m = margin(model(_pixels_to_input(x, spec)), target)
        loss = -m.sum()
        (grad,) = torch.autograd.grad(loss, x)
        history.append(float(m.detach().mean()))
        with torch.no_grad():
            x = (x - lr * grad).detach()
        value = float(loss.detach())
        if prev is not None and abs(value - prev) <= rel_tol * max(abs(prev), 1e-12):
            break
        prev = value
    with torch.no_grad():
        final = margin(model(_pixels_to_input(x, spec)), target).cpu()
    history.append(float(final.mean()))
    return final, history


def gamma_fit(values: torch.Tensor, iterations: int = 100) -> tuple[float, float]:
    """Maximum-likelihood Gamma (shape k, scale θ) with location 0, for positive ``values``.

    Solves ``log k − ψ(k) = log(mean) − mean(log x)`` by Newton's method from the
    Minka/Choi–Wette starting point; ``θ = mean / k``.
    """
    v = values.double()
    if v.numel() < 2 or bool((v <= 0).any()):
        raise ClipguardError("the Gamma fit needs at least two positive values")
    mean = v.mean()
    s = float(mean.log() - v.log().mean())
    if s <= 1e-12:  # all equal: a degenerate, infinitely peaked null
        return 1e12, float(mean) / 1e12
    k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(iterations):
        kt = torch.tensor(k, dtype=torch.float64)
        f = math.log(k) - float(torch.special.digamma(kt)) - s
        fp = 1 / k - float(torch.special.polygamma(1, kt))
        step = f / fp
        k_new = k - step
        if k_new <= 0:
            k_new = k / 2
        if abs(k_new - k) <= 1e-12 * k:
            k = k_new
            break
        k = k_new
    return k, float(mean) / k


def gamma_cdf(x: float, shape: float, scale: float) -> float:
    """Regularised lower incomplete gamma ``P(k, x/θ)``."""
    if x <= 0:
        return 0.0
    return float(
        torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), torch.tensor(x / scale, dtype=torch.float64))
    )


def detection_statistics(stats: Sequence[float], alpha: float = DEFAULT_ALPHA) -> dict:
    """MM-BD's decision from per-class statistics: Gamma null on all but the largest, p-value, verdict."""
    r = torch.tensor(list(stats), dtype=torch.float64)
    if r.numel() < 3:
        raise ClipguardError("MM-BD needs at least three classes")
    target = int(r.argmax())
    null = torch.cat([r[:target], r[target + 1 :]])
    shift = 0.0
    if bool((null <= 0).any()):
        spread = float(null.std()) or 1.0
        shift = -float(null.min()) + 1e-3 * spread
    shape, scale = gamma_fit(null + shift)
    k = r.numel()
    pv = 1.0 - gamma_cdf(float(r[target]) + shift, shape, scale) ** k
    return {
        "statistics": r.tolist(),
        "target": target,
        "null": {"shape": shape, "scale": scale, "shift": shift},
        "p_value": pv,
        "alpha": alpha,
        "flagged": bool(pv <= alpha),
    }


def mmbd_detect(
    model: nn.Module,
    spec: ModelSpec,
    *,
    num_classes: int,
    images_per_class: int = 30,
    steps: int = 300,
    lr: float = 1e-2,
    alpha: float = DEFAULT_ALPHA,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Is this model backdoored? Data-free: per-class max margins, Gamma null, order-statistic p-value.

    Returns ``statistics`` (r_t per class), ``p_value``, ``flagged`` (p ≤ ``alpha``),
    ``target`` (the class with the largest statistic), the fitted null, and ``seconds``.
    """
    with Timer(device) as timer:
        net = copy.deepcopy(model).to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        stats, steps_taken = [], []
        for t in range(num_classes):
            final, history = max_margin(
                net, spec, t, images=images_per_class, steps=steps, lr=lr, device=device, generator=gen
            )
            stats.append(float(final.max()))
            steps_taken.append(len(history) - 1)
        result = detection_statistics(stats, alpha)
        seconds = timer.elapsed()
    return {
        "defense": "mmbd_detect",
        **result,
        "images_per_class": images_per_class,
        "max_steps": steps,
        "steps_taken": steps_taken,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- mitigation


def default_sites(spec: ModelSpec, names: Sequence[str]) -> list[str]:
    """The release's three ResNet-18 sites when the model has them, otherwise the first half of the sites.

    The release clips only early activations (stem, stages 1–2 of 4), where a trigger's
    features are still local; clipping the last stage, which feeds the classifier directly,
    lets the ‖Z‖ penalty switch off the network's output. "First half" carries that choice
    to other architectures (``small_cnn``: its first two conv blocks).
    """
    if spec.arch == "resnet18" and all(s in names for s in RESNET18_SITES):
        return list(RESNET18_SITES)
    return list(names[: max(1, (len(names) + 1) // 2)])


def mmbd_mitigate(
    model: nn.Module,
    spec: ModelSpec,
    clean: ImageData,
    *,
    epochs: int = 50,
    lr: float = 0.1,
    batch_size: int = 200,
    init: float = 8.0,
    c0: float = 0.5,
    c_factor: float = 1.2,
    acc_target: float = 0.95,
    adapt_every: int = 10,
    sites: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> DefenseResult:
    """MM-BM: learn per-channel upper bounds that keep clean logits while shrinking the bounds."""
    if len(clean) == 0:
        raise ClipguardError("MM-BD mitigation needs clean data")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with Timer(device) as timer:
        net = copy.deepcopy(model).to(device).eval()
        # The network is fixed (only the bounds learn), so it may run BatchNorm-folded and
        # channels_last on a CPU, as clipguard's own passes do (clipguard.inference).
        run = fast_copy(net, device)
        # Forwards (and the gradient, summed over them) run in cache-sized pieces on a CPU, as
        # clipguard's passes do: the same loss and gradient to float rounding.
        piece = min(512, piece_size(device))
        with torch.no_grad():
            x_all = fast_input(inputs(clean.whole("MM-BD"), spec, device), device)
            ref = torch.cat([run(x) for x in x_all.split(piece)])
        y_all = clean.labels.to(device)
        keep = ref.argmax(1) == y_all
        if not bool(keep.any()):
            raise ClipguardError("the model classifies none of the clean images correctly")
        x_all, ref, y_all = x_all[keep], ref[keep], y_all[keep]
        shapes = site_shapes(run, x_all)
        chosen = list(sites) if sites is not None else default_sites(spec, list(shapes))
        missing = [s for s in chosen if s not in shapes]
        if missing:
            raise ClipguardError(f"no such activation sites: {missing[:3]}")
        gm, clips = learnable_clipped(run, {s: torch.full(channel_shape(shapes[s]), init) for s in chosen})
        gm = gm.to(device)
        opt = torch.optim.Adam([c.upper for c in clips.values()], lr=lr)
        c = c0
        history = []
        for epoch in range(epochs):
            order = torch.randperm(len(x_all), generator=gen).to(device)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = c * sum(clip.upper.norm() for clip in clips.values())
                loss.backward()
                for part in idx.split(piece):  # mse over the batch = Σ part's mse × its share
                    fit = F.mse_loss(gm(x_all[part]), ref[part]) * (len(part) / len(idx))
                    fit.backward()
                    loss = loss.detach() + fit.detach()
                opt.step()
            with torch.no_grad():
                acc = float((torch.cat([gm(x) for x in x_all.split(piece)]).argmax(1) == y_all).float().mean())
            history.append({"epoch": epoch + 1, "c": c, "clean_acc": acc, "loss": float(loss)})
            if epoch + 1 > adapt_every and (epoch + 1) % adapt_every == 0:
                c = c * c_factor if acc >= acc_target else c / c_factor
        bounds = frozen_bounds(clips)
        purified = clipped_model(net.cpu(), bounds)
        seconds = timer.elapsed()
    info = {
        "defense": "mmbd_mitigate",
        "sites": chosen,
        "clean_samples": int(keep.sum()),
        "clean_given": len(clean),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "init": init,
        "c0": c0,
        "final_c": c,
        "history": history,
        "bound_mean": {s: float(b.mean()) for s, b in bounds.items()},
    }
    return DefenseResult(purified, seconds, info)
