"""Unlearn a backdoor from its own training data: relabel the suspects, fine-tune briefly.

Why relabel rather than drop or gradient-ascend: a suspect (found by
:mod:`clipguard.detection`) is a triggered image labelled with the target class. Dropping it
leaves the trigger → target shortcut in the weights; pushing its loss up (gradient ascent)
is unbounded and, with imperfect suspects, wrecks clean accuracy (docs/lab/results.md,
generalisation matrix). Teaching the model that the triggered image belongs to *some other* class is a
bounded, ordinary training signal that contradicts the shortcut directly. The label is the
model's own best non-target class: the trigger leaves the image's content in place, so that
class is most often the true one, and a wrong guess among the other classes still breaks the
association with the target.

Round two fixes what the split missed: once the shortcut is weakened, triggered images the
detector did not catch stop being sent to the target by the fine-tuned model while they still
are by the suspect one. Those flips join the suspects and the fine-tune runs again from the
original weights (so nothing a wrong first round taught carries over).

Training is short and conservative: a few epochs at a small one-cycle learning rate, on the
samples detection read (at most ``samples_per_epoch`` clean ones per epoch, so the cost does
not grow with the dataset, and only the class-balanced screen of them when detection read one
class whole), BatchNorm statistics updated with everything else. By default only the
network's tail is trained (:mod:`clipguard.split`), on the body's outputs that the detection
pass cached: no pass through the body at all, and the features below the cut stay as they
were. ``scope="full"`` fine-tunes the whole network on the images, with flips.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import ImageData, normalize
from clipguard.errors import Cancelled, ClipguardError
from clipguard.inference import fast_input, fast_layout, usual_layout
from clipguard.metrics import predict
from clipguard.models import ModelSpec
from clipguard.split import DEFAULT_TAIL_SHARE, split_at
from clipguard.train import nesterov_sgd, one_cycle


@dataclass
class UnlearnConfig:
    """Fine-tuning recipe; the defaults' evidence is in docs/method.md."""

    epochs: int = 2
    lr: float = 0.01
    batch_size: int = 128
    rounds: int = 2
    samples_per_epoch: int = 20000
    """Clean samples drawn per epoch (all suspects always take part); caps the cost on big sets."""
    seed: int = 0
    scope: str = "tail"
    """``tail``: train the part after :func:`clipguard.split.split_tail`'s cut on cached inputs; ``full``: all of it."""
    tail_share: float = DEFAULT_TAIL_SHARE
    """Smallest share of the parameters the tail must hold."""
    max_cache_mb: int = 4096
    """Limit on the cached tail inputs (ResNet-18 on 50,000 CIFAR images: 3,200 MB); past it, ``full``."""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ClipguardError(f"unlearning scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


SCOPES = ("tail", "full")


@dataclass
class TailInputs:
    """The body's outputs for every sample the detection pass read (:attr:`FeaturePass.tail_inputs`) and where
    the body ends."""

    cut: str
    inputs: torch.Tensor


def relabel(logits: torch.Tensor, labels: torch.Tensor, suspects: torch.Tensor) -> torch.Tensor:
    """Training labels with each suspect moved to its best-scoring class other than its own label.

    A suspect's label is the backdoor's target (the class it was found in), so with several
    confirmed targets each suspect leaves its own."""
    new = labels.clone()
    if len(suspects):
        scores = logits[suspects].clone()
        scores[torch.arange(len(suspects)), labels[suspects]] = -torch.inf
        new[suspects] = scores.argmax(1)
    return new


def fine_tune(
    model: nn.Module,
    data: ImageData,
    labels: torch.Tensor,
    spec: ModelSpec,
    config: UnlearnConfig,
    *,
    always: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    tail: TailInputs | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> nn.Module:
    """A fine-tuned copy of ``model`` (eval mode, on ``device``); ``model`` itself is untouched.

    ``always`` lists samples included in every epoch (the relabelled suspects); the rest of
    each epoch is a random draw of ``samples_per_epoch`` others, from ``pool`` if given (a
    class-balanced share, when one class was read whole) or else from all of ``data``. With
    ``tail``, only the part of the copy after ``tail.cut`` is trained, on ``tail.inputs``;
    otherwise all of it, on the images with random flips.
    """
    device = torch.device(device)
    net = fast_layout(copy.deepcopy(model).to(device), device)  # channels_last on a CPU (clipguard.inference)
    trained = net.train() if tail is None else split_at(net, tail.cut).tail.train()
    # once, not per batch: rows indexed out of a channels_last tensor stay channels_last
    tail_inputs = None if tail is None else fast_input(tail.inputs, device)
    gen = torch.Generator().manual_seed(config.seed)
    always = torch.empty(0, dtype=torch.int64) if always is None else always
    eligible = torch.ones(len(data), dtype=torch.bool) if pool is None else torch.isin(torch.arange(len(data)), pool)
    eligible[always] = False
    pool_idx = eligible.nonzero().flatten()
    per_epoch = len(always) + min(config.samples_per_epoch, len(pool_idx))
    steps = config.epochs * math.ceil(per_epoch / config.batch_size)
    opt = nesterov_sgd(trained, config.lr, weight_decay=5e-4)
    sched = one_cycle(opt, config.lr, steps, pct_start=0.15)
    step = 0
    for _ in range(config.epochs):
        draw = pool_idx[torch.randperm(len(pool_idx), generator=gen)[: per_epoch - len(always)]]
        epoch = torch.cat([always, draw])
        epoch = epoch[torch.randperm(len(epoch), generator=gen)]
        for start in range(0, len(epoch), config.batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled while unlearning")
            idx = epoch[start : start + config.batch_size]
            if tail is None:
                x = normalize(data.images[idx].to(device), spec.mean, spec.std)
                flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
                x = fast_input(torch.where(flip[:, None, None, None], x.flip(3), x), device)
            else:
                assert tail_inputs is not None  # computed whenever there is a tail
                x = tail_inputs[idx.to(tail_inputs.device)]
            loss = F.cross_entropy(trained(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if progress is not None:
                progress(step / steps)
    return usual_layout(net).eval()


@torch.no_grad()
def tail_predict(model: nn.Module, tail: TailInputs, indices: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model``'s predicted classes for ``indices``, from the cached tail inputs (CPU int64)."""
    part = split_at(model, tail.cut).tail.eval()
    idx = indices.to(tail.inputs.device)
    out = [part(tail.inputs[idx[i : i + batch_size]]).argmax(1).cpu() for i in range(0, len(idx), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def unlearn(
    model: nn.Module,
    data: ImageData,
    logits: torch.Tensor,
    suspects: torch.Tensor,
    targets: Sequence[int],
    spec: ModelSpec,
    config: UnlearnConfig | None = None,
    *,
    pool: torch.Tensor | None = None,
    tail: TailInputs | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> tuple[nn.Module, torch.Tensor, dict]:
    """The corrected model, the final suspect indices, and a JSON-able record of each round.

    ``logits`` are the suspect model's outputs on ``data`` (from the detection pass); ``targets``
    are the confirmed backdoor classes, whose samples alone can join the suspects in round two. With
    ``tail`` (the same pass's cached body outputs), only the tail is fine-tuned, and the second
    round predicts from the cache as well. ``pool`` limits the clean samples drawn (:func:`fine_tune`)
    and the second round's candidates to the same samples.
    """
    config = config or UnlearnConfig()
    device = torch.device(device)
    original = logits.argmax(1)
    rounds: list[dict] = []
    net = model
    current = suspects.sort().values
    for r in range(config.rounds):

        def say(f: float, r: int = r) -> None:
            if progress is not None:
                progress((r + f) / config.rounds)

        labels = relabel(logits, data.labels, current)
        net = fine_tune(
            model,
            data,
            labels,
            spec,
            config,
            always=current,
            pool=pool,
            tail=tail,
            device=device,
            progress=say,
            should_cancel=should_cancel,
        )
        rounds.append({"round": r + 1, "suspects": len(current)})
        if r + 1 == config.rounds:
            break
        # Only target-labelled samples the suspect model sent to the target can flip: predicting
        # those alone (about a tenth of the data) is what this pass needs.
        in_targets = torch.isin(data.labels, torch.as_tensor(list(targets), dtype=torch.int64))
        candidates = in_targets & (original == data.labels)
        if pool is not None:
            # A target-class sample the fine-tune never trained on can leave the target only
            # because the shortcut's removal weakened the class as a whole; one it trained on
            # with its label still leaving is the signal. On the cpu50k BadNets victim, whose
            # first split already held all 500 poisoned samples: 467 flips added over the whole
            # class, 67 over the screen; ACC / ASR 78.1 / 1.3 and 78.4 / 1.4 (docs/method.md).
            candidates &= torch.isin(torch.arange(len(data)), pool)
        candidates[current] = False
        candidates = candidates.nonzero().flatten()
        if tail is None:
            pred = predict(net, data, spec.mean, spec.std, device=device, batch_size=batch_size, indices=candidates)
        else:
            pred = tail_predict(net, tail, candidates, batch_size)
        added = candidates[pred != data.labels[candidates]]
        rounds[-1]["flipped_added"] = len(added)
        if not len(added):
            break
        current = torch.cat([current, added]).sort().values
    scope = {"scope": "full"} if tail is None else {"scope": "tail", "cut": tail.cut}
    return (
        net,
        current,
        {
            "config": config.to_dict(),
            **scope,
            "rounds": rounds,
            "suspects": len(current),
            "suspect_indices": current.tolist(),
        },
    )
