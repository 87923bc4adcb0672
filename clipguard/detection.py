"""Find the poisoned share of the training data, and the class it was poisoned towards.

Why this works with the training data alone: in an all-to-one attack every poisoned sample
carries the target label, and the model has learned to send them there through the trigger,
not through their content. In the model's penultimate features (the input of its classifier
head, :func:`feature_layer`) those samples sit together, away from the target class's clean samples (the
observation behind spectral signatures, Tran et al., NeurIPS 2018). Beside the averaged features
detection reads each channel's spatial peak (:meth:`FeaturePass.for_detection`), which a patch
trigger moves where the average barely does. So, per class, project
the centred features on directions in the plane of their top two principal directions and
look for the best split of that
projection into a small and a large group (Otsu's criterion: the share of the variance the
split explains). For a single Gaussian blob the best split explains ``2/π ≈ 0.64``; a
poisoned class, holding a separate cluster of triggered samples, explains far more (the
measured scores are in docs/method.md).

The target is the class whose split stands out from the others (a robust z-score over the
classes) and reaches ``min_separation``; its small group is the suspect set, unless
:func:`poisoned_side` finds the poisoned samples are the majority of the class (a poison rate
near ``1 / classes``, BackdoorBench's 10% WaNet on CIFAR-10). A model with no such class is
reported as "nothing found", and clipguard falls back to clipping. Evidence (every class's
score, the z-score, the suspect count, which side) goes into the report.

The pass reads a class-balanced sample first (:func:`screen_indices`, 1,000 per class): which
class is poisoned is a question about proportions, which a uniform draw keeps. Only a
flagged class is then read whole, to name every suspect (``clipguard.defenses.guard``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from clipguard.data import SAMPLE_SEED, ImageData, normalize
from clipguard.defenses.clipping import ACTIVATION_MODULES
from clipguard.errors import Cancelled, ClipguardError
from clipguard.inference import fast_copy, pieces
from clipguard.models import ModelSpec
from clipguard.split import Split

MIN_SEPARATION = 3.3
"""Group separation a target class must reach: above a Gaussian blob's and the clean classes' scores
(docs/method.md has the measurements the bar sits between)."""
MIN_Z = 4.0
"""How far, in robust standard deviations, the target's score must stand above the other classes'."""
ESCALATE_Z = 3.0
"""A screened class this far above the others (robust z), yet short of ``MIN_SEPARATION`` or
``MIN_Z``, is read whole and decided on its whole-class split (``clipguard.defenses.guard``).
Reading a class costs one more partial pass; flagging still needs the whole class to reach
``MIN_SEPARATION``, which clean classes stay under (a clean SmallCNN on all 50,000 CIFAR-10
images: at most 3.23 over 30 screens, 3.12 for a whole class; 11 of the 30 screens had a
class at z ≥ 3 and would read it, none would flag)."""
MIN_SPREAD = 0.1
"""Floor on the other classes' spread, so nine near-identical scores don't make any bump 'significant'."""
MIN_SHARE = 0.01
"""Smallest suspect group, as a share of its class, the split may return."""
MIN_CLASS_SAMPLES = 20
SCREEN_PER_CLASS = 1000
"""Samples per class the first detection pass reads (:func:`screen_indices`); a flagged class is then read whole."""


@dataclass
class Detection:
    """What :func:`detect_poison` found: the target class and its suspect samples, or nothing."""

    flagged: bool
    target: int | None
    suspects: torch.Tensor
    """Indices into the training data (int64, sorted); empty when nothing was flagged."""
    scores: list[float | None]
    z: float
    top: int | None = None
    """The highest-scoring class, flagged or not (``None`` with fewer than three scored classes);
    ``z`` is its distance above the others, so a caller can escalate a near miss."""
    groups: list[torch.Tensor] = field(default_factory=list)
    """Per class, its split's small group (indices into the features, sorted; empty when unscored)."""

    def to_dict(self) -> dict:
        return {
            "method": "spectral split of penultimate features",
            "flagged": self.flagged,
            "target": self.target,
            "suspects": len(self.suspects),
            "scores": self.scores,
            "z": self.z,
            "min_separation": MIN_SEPARATION,
            "min_z": MIN_Z,
        }


MAX_FEATURES = 4096
"""Widest feature vector detection reads: each class's SVD costs n²·d (torchvision's VGG head starts at 25,088)."""
HEAD_PASSTHROUGH: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Identity, nn.Flatten, *ACTIVATION_MODULES)
"""Modules that may sit between the linear layers of a classifier head."""


def feature_layer(model: nn.Module) -> nn.Linear:
    """The linear layer whose input detection reads: the first of the classifier head's chain.

    A head of one linear layer (SmallCNN, the ResNets, CifarVGG) reads the pooled backbone
    features. A deeper head (torchvision's MobileNetV3: Linear 576→1024, Hardswish, Dropout,
    Linear) is walked back from its last linear layer through activations and dropouts to its
    first, so detection still reads the pooled backbone features, where the poisoned cluster
    sits apart: on the 3% Blend MobileNetV3-small victim the 576-d input flagged the target
    (z = 8.5, 195 of the screen's 238 poisoned samples among 229 suspects), the 1,024-d hidden
    layer did not (z = 3.2). Layers wider than :data:`MAX_FEATURES` end the walk.
    """
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    positions = [i for i, m in enumerate(leaves) if isinstance(m, nn.Linear)]
    if not positions:
        raise ClipguardError(
            "the model has no linear classifier layer; poison detection needs one (set {method} to paper)", options=True
        )
    chosen = leaves[positions[-1]]
    assert isinstance(chosen, nn.Linear)
    for module in reversed(leaves[: positions[-1]]):
        if isinstance(module, nn.Linear):
            if module.in_features > MAX_FEATURES:
                break
            chosen = module
        elif not isinstance(module, HEAD_PASSTHROUGH):
            break
    return chosen


def global_pool(model: nn.Module) -> str | None:
    """Name of the global average pool that feeds the classifier head, or ``None`` without one.

    The last ``AdaptiveAvgPool2d`` with a 1×1 output (SmallCNN, the ResNets, CifarVGG, torchvision's
    ResNets and MobileNetV3); torchvision's VGG pools to 7×7, which is not global, and gets ``None``.
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            found = name
    return found


@dataclass
class FeaturePass:
    """One forward pass over the training data: what detection reads and what unlearning reuses."""

    features: torch.Tensor
    """Inputs of the classifier head (:func:`feature_layer`), per sample (CPU float32)."""
    logits: torch.Tensor
    """The model's outputs, per sample (CPU float32)."""
    tail_inputs: torch.Tensor | None
    """The body's outputs at the split's cut, per sample, on the model's device; ``None`` without
    a split or when they would exceed the cache limit."""
    peaks: torch.Tensor | None = None
    """Per channel, the spatial maximum of the map the :func:`global_pool` averages (CPU float32);
    ``None`` for a model without one, or whose pooled map is 1×1 (torchvision's ResNets and
    MobileNetV3 at 32×32), where the peaks would repeat the averages."""

    def for_detection(self) -> torch.Tensor:
        """What the per-class split reads: the head's inputs, beside the peaks when there are any.

        Why the peaks: averaging over the whole map dilutes a trigger that fires in one corner.
        On a SmallCNN trained with crop-and-flip augmentation on all 50,000 CIFAR-10 images with
        a 2% white 3×3 patch (ASR 57%), the averaged features scored the target 3.15 (z = 1.8,
        like the other classes) and nothing was flagged, the way the H100 ResNet-18 1% BadNets
        victim was missed (2.92, z = 1.6); with the peaks beside them it scored 4.20 (z = 14.2)
        and the smaller group held 663 poisoned images among 671 (guard: ACC 75.4 → 77.4, ASR
        6.8 → 2.3%). A checkerboard patch went from 4.89 to 9.59, 500 of 500 in a group of 500;
        Blend and WaNet victims scored within 0.25 of before. A clean augmented SmallCNN scored
        lower, not higher: at most 3.16 over 30 screen draws (3.28 averaged alone), 3.03 for a
        whole class (3.14).
        """
        return self.features if self.peaks is None else torch.cat([self.features, self.peaks], 1)


@torch.no_grad()
def feature_pass(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    *,
    split: Split | None = None,
    max_cache_bytes: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> FeaturePass:
    """Features and logits for every training sample; with ``split``, the body's outputs as well.

    Running the model as ``split.tail(split.body(x))`` costs the same as ``model(x)``, so the
    tail's inputs come free with the pass detection needs anyway. They are kept only while
    their total stays within ``max_cache_bytes``; past it they are dropped, and the caller
    fine-tunes the whole network instead.
    """
    classifier = feature_layer(model)
    head_name = next(name for name, m in model.named_modules() if m is classifier)
    pool_name = global_pool(model)
    model.eval()
    # Read-only copies that run faster on a CPU (clipguard.inference); the same features to rounding.
    body = None if split is None else fast_copy(split.body, device)
    runner = fast_copy(model if split is None else split.tail, device)
    head = runner.get_submodule(head_name)
    captured: list[torch.Tensor] = []
    peaks: list[torch.Tensor] = []
    handles = [
        head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().flatten(1).float().cpu()))
    ]
    pool = None
    for part in (runner, body):  # with a split, the pool is in the tail or, cut after it, in the body
        if pool is None and part is not None and pool_name is not None:
            try:
                pool = part.get_submodule(pool_name)
            except AttributeError:
                pass
    if pool is not None:

        def keep_peaks(_m: nn.Module, args: tuple) -> None:
            if args[0].shape[2] * args[0].shape[3] > 1:  # a 1×1 map's peaks are its averages: nothing to add
                peaks.append(args[0].detach().amax((2, 3)).float().cpu())

        handles.append(pool.register_forward_pre_hook(keep_peaks))
    logits: list[torch.Tensor] = []
    cache: list[torch.Tensor] | None = [] if split is not None else None
    try:
        for start in range(0, len(data), batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled while reading features")
            x = normalize(data.images[start : start + batch_size].to(device), spec.mean, spec.std)
            for piece in pieces(x, device):
                if body is None:
                    out = runner(piece)
                else:
                    inner = body(piece)
                    out = runner(inner)
                    if cache is not None:
                        cache.append(inner.contiguous())  # kept in the usual layout: it outlives this pass's copies
                        if inner[0].numel() * inner.element_size() * len(data) > max_cache_bytes:
                            cache = None
                logits.append(out.float().cpu())
            if progress is not None:
                progress(min(1.0, (start + batch_size) / len(data)))
    finally:
        for handle in handles:
            handle.remove()
    return FeaturePass(
        torch.cat(captured),
        torch.cat(logits),
        torch.cat(cache) if cache else None,
        torch.cat(peaks) if peaks and len(peaks) == len(captured) else None,
    )


def penultimate_features(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features entering the classifier head (:func:`feature_layer`) and the logits, per training sample (CPU)."""
    found = feature_pass(
        model, data, spec, device=device, batch_size=batch_size, progress=progress, should_cancel=should_cancel
    )
    return found.features, found.logits


def screen_indices(
    labels: torch.Tensor, num_classes: int, per_class: int | None = SCREEN_PER_CLASS, seed: int = SAMPLE_SEED
) -> torch.Tensor:
    """A seeded draw of up to ``per_class`` samples of each class (sorted indices); all of them with ``None``.

    Why a sample: detection asks which class holds a separate cluster, and a uniform draw keeps
    each class's poisoned share, so 1,000 samples per class answer it as well as 5,000. Only the
    flagged class is then read in full, to name every suspect. On CIFAR-10's 50,000 images that
    is about 14,500 forward passes instead of 50,000.
    """
    if per_class is None:
        return torch.arange(len(labels))
    if per_class < MIN_CLASS_SAMPLES:
        raise ClipguardError(f"screening needs at least {MIN_CLASS_SAMPLES} samples per class, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return torch.cat(picked).sort().values


def best_split(values: torch.Tensor, min_share: float = MIN_SHARE) -> tuple[float, torch.Tensor]:
    """Otsu's split of 1-D ``values`` into a small group (at most half) and the rest.

    Returns the share of the variance the split explains and the indices of the small group;
    the group may be the low or the high end, whichever explains more.
    """
    n = len(values)
    if n < 4:
        return 0.0, torch.empty(0, dtype=torch.int64)
    v = values.double()
    order = v.argsort()
    s = v[order]
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), s.cumsum(0)])
    total, mean = csum[-1], csum[-1] / n
    var = ((s - mean) ** 2).sum()
    if var <= 0:
        return 0.0, torch.empty(0, dtype=torch.int64)
    k = torch.arange(max(2, int(min_share * n)), n // 2 + 1, dtype=torch.float64)
    ki = k.long()
    low_mean, rest_high = csum[ki] / k, (total - csum[ki]) / (n - k)
    low = (k * (low_mean - mean) ** 2 + (n - k) * (rest_high - mean) ** 2) / var
    high_mean, rest_low = (total - csum[n - ki]) / k, csum[n - ki] / (n - k)
    high = (k * (high_mean - mean) ** 2 + (n - k) * (rest_low - mean) ** 2) / var
    i_low, i_high = int(low.argmax()), int(high.argmax())
    if low[i_low] >= high[i_high]:
        return float(low[i_low]), order[: int(ki[i_low])]
    return float(high[i_high]), order[n - int(ki[i_high]) :]


def separation(values: torch.Tensor, group: torch.Tensor) -> float:
    """Distance between the means of ``group`` and the rest, in their pooled standard deviation."""
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[group] = True
    a, b = values[mask].double(), values[~mask].double()
    if len(a) < 2 or len(b) < 2:
        return 0.0
    pooled = ((a.var() + b.var()) / 2).sqrt()
    return float((a.mean() - b.mean()).abs() / pooled) if pooled > 0 else 0.0


SCAN_ANGLES = 36
"""Directions tried in the plane of the top two principal directions (every 5 degrees)."""


def class_split(features: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One class's score and the indices of its small group: the best :func:`separation` of
    :func:`best_split` over directions in the plane of the class's top two principal directions.

    Why a plane and not the top direction alone: at 1% poison the triggered cluster is too
    small to own a principal direction: its direction lies between the top two, and along the
    top one alone the poisoned class can score like a Gaussian blob. Scanning the plane finds
    it while clean classes stay under ``MIN_SEPARATION`` (measurements in docs/method.md).
    """
    centred = features.double() - features.double().mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False)[2][:2]
    plane = centred @ basis.T
    if plane.shape[1] == 1:
        directions = torch.ones(1, 1, dtype=torch.float64)
    else:
        angles = torch.arange(SCAN_ANGLES, dtype=torch.float64) * (torch.pi / SCAN_ANGLES)
        directions = torch.stack([angles.cos(), angles.sin()], 1)
    best, group = 0.0, torch.empty(0, dtype=torch.int64)
    for direction in directions:
        projection = plane @ direction
        ratio, small = best_split(projection)
        if ratio == 0.0:
            continue
        score = separation(projection, small)
        if score > best:
            best, group = score, small
    return best, group


def second_choice_entropy(logits: torch.Tensor, target: int) -> float:
    """Entropy of the samples' best non-target class, as a share of its maximum ``log(K - 1)``.

    Why it tells the sides apart: a poisoned sample's content comes from any of the other
    classes, and the model's runner-up for it mostly follows that content, so over the poisoned
    samples the runner-up spreads across the classes. A genuine target-class sample's runner-up
    is one of the few classes that look like the target (for CIFAR-10 airplanes: ship, bird).
    The measured entropies of both sides are in docs/method.md ("Which group is the poisoned one").
    """
    if len(logits) == 0 or logits.shape[1] < 3:
        return 0.0
    masked = logits.clone()
    masked[:, target] = float("-inf")
    counts = torch.bincount(masked.argmax(1), minlength=logits.shape[1]).double()
    entropy = torch.distributions.Categorical(probs=counts / counts.sum()).entropy()
    return float(entropy / math.log(logits.shape[1] - 1))


def poisoned_side(
    members: torch.Tensor, small: torch.Tensor, logits: torch.Tensor, target: int, class_counts: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Which group of the flagged class's split holds the poisoned samples: the suspects (sorted) and the evidence.

    ``members`` index the flagged class's rows of ``logits``; ``small`` (a subset of them) is the
    split's smaller group; ``class_counts`` counts every class in the whole training data.

    The split names the smaller group because at the usual poison rates the triggered samples
    are a minority of their class. They are not once the rate nears ``1 / classes``: 10% WaNet on
    CIFAR-10 puts 5,000 triggered images beside 4,500 genuine ones, the smaller group was the
    genuine airplanes, and unlearning them cost 8 points of accuracy and left ASR at 90% (H100
    Table 1 run, docs/lab/results.md). The larger group is taken only when two independent signals
    agree, so the usual case cannot flip on one noisy reading:

    * size: an all-to-one attack adds its poisoned samples to the target class, so (with
      classes otherwise of a size) ``count(target) - median(count(others))`` estimates how many
      there are; it must exceed half the class;
    * content: the larger group's :func:`second_choice_entropy` must exceed the smaller's.

    Either alone misleads: a split that mixes the groups can leave the poisoned samples in the
    smaller group at a 12% rate (SmallCNN WaNet: 840 of its 965), where size alone would flip;
    a target class that is simply big makes size alone flip at any rate.
    """
    in_small = torch.zeros(len(logits), dtype=torch.bool)
    in_small[small] = True
    large = members[~in_small[members]]
    counts = class_counts.double()
    others = torch.cat([counts[:target], counts[target + 1 :]])
    expected = float(counts[target] - others.median()) if len(others) else 0.0
    h_small = second_choice_entropy(logits[small], target)
    h_large = second_choice_entropy(logits[large], target)
    majority = expected > len(members) / 2 and h_large > h_small
    chosen = large if majority else small
    evidence = {
        "side": "larger" if majority else "smaller",
        "expected_poisoned": round(expected),
        "second_choice_entropy": {"smaller": h_small, "larger": h_large},
    }
    return chosen.sort().values, evidence


def detect_poison(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    min_separation: float = MIN_SEPARATION,
    min_z: float = MIN_Z,
) -> Detection:
    """Score every class's split and flag the one that stands out (see the module docstring)."""
    scores: list[float | None] = []
    groups: list[torch.Tensor] = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if len(members) < MIN_CLASS_SAMPLES:
            scores.append(None)
            groups.append(torch.empty(0, dtype=torch.int64))
            continue
        score, small = class_split(features[members])
        scores.append(score)
        groups.append(members[small].sort().values)
    valid = [(c, s) for c, s in enumerate(scores) if s is not None]
    if len(valid) < 3:
        return Detection(False, None, torch.empty(0, dtype=torch.int64), scores, 0.0, groups=groups)
    target, top = max(valid, key=lambda cs: cs[1])
    z = standing(scores, target)
    flagged = top >= min_separation and z >= min_z
    suspects = groups[target] if flagged else torch.empty(0, dtype=torch.int64)
    return Detection(flagged, target if flagged else None, suspects, scores, z, top=target, groups=groups)


def standing(scores: list[float | None], c: int) -> float:
    """How far class ``c``'s score stands above the other classes', in robust standard deviations."""
    own = scores[c]
    others = torch.tensor([s for k, s in enumerate(scores) if k != c and s is not None], dtype=torch.float64)
    if own is None or len(others) < 2:
        return 0.0
    median = others.median()
    spread = max(float((others - median).abs().median()) * 1.4826, MIN_SPREAD)
    return float((own - median) / spread)
