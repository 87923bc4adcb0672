"""Does the backdoor come back? A short fine-tune of the purified model, and what it does to ASR.

Why: a purified model can look clean and still hold the backdoor's circuitry, so that a brief
fine-tune on ordinary data brings the trigger's effect back (the "superficial safety" and
re-activation results, Min et al. and Zhu et al., NeurIPS 2024). A user who will fine-tune the
purified model further needs to know. The check fine-tunes a copy of the purified model (clip
bounds included, as exported) on a random slice of the training data without the suspects,
briefly and at an ordinary learning rate, then measures what it measures for the purified
model: ASR when a trigger is known, and how far the copy's decisions moved.

Protocol (:class:`ReactivationConfig`, docs/method.md): ``samples`` images drawn with a fixed
seed from the training data guard kept, ``epochs`` passes of SGD with Nesterov momentum at
``lr`` with random flips, batch ``batch_size``, every parameter trained (BatchNorm statistics
too). The slice can still hold poisoned images detection missed: so can the data a user would
fine-tune on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipguard.data import SAMPLE_SEED, ImageData, normalize
from clipguard.errors import Cancelled, ClipguardError
from clipguard.metrics import accuracy, evaluate, predict
from clipguard.models import ModelSpec
from clipguard.train import nesterov_sgd


@dataclass(frozen=True)
class ReactivationConfig:
    samples: int = 1000
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 64
    seed: int = SAMPLE_SEED

    def __post_init__(self) -> None:
        if self.samples < 1 or self.epochs < 1 or self.batch_size < 1 or not 0 < self.lr <= 1:
            raise ClipguardError(f"reactivation check settings out of range: {asdict(self)}")


def retune(
    model: nn.Module,
    data: ImageData,
    spec: ModelSpec,
    config: ReactivationConfig,
    *,
    device: torch.device | str = "cpu",
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[float], None] | None = None,
) -> tuple[nn.Module, torch.Tensor]:
    """A fine-tuned copy of ``model`` and the positions in ``data`` it was tuned on."""
    gen = torch.Generator().manual_seed(config.seed)
    picked = torch.randperm(len(data), generator=gen)[: config.samples]
    net = copy.deepcopy(model).to(device).train()
    opt = nesterov_sgd(net, config.lr, weight_decay=5e-4)
    steps = config.epochs * -(-len(picked) // config.batch_size)
    done = 0
    for _ in range(config.epochs):
        order = picked[torch.randperm(len(picked), generator=gen)]
        for start in range(0, len(order), config.batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled during the reactivation check")
            idx = order[start : start + config.batch_size]
            x = normalize(data.images[idx].to(device), spec.mean, spec.std)
            flip = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(net(x), data.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if progress is not None:
                progress(done / steps)
    return net.eval(), picked


def reactivation_check(
    purified: nn.Module,
    kept: ImageData,
    spec: ModelSpec,
    *,
    eval_data: ImageData | None = None,
    attack: object | None = None,
    config: ReactivationConfig | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict:
    """The report's ``reactivation`` record: the protocol, and ACC/ASR and agreement after the fine-tune.

    ``kept`` is the training data without the suspects. Agreement is the share of images on which
    the re-tuned copy predicts what the purified model predicts: on ``eval_data`` when given, else on
    training images the fine-tune did not see."""
    config = config or ReactivationConfig()
    retuned, seen = retune(purified, kept, spec, config, device=device, should_cancel=should_cancel, progress=progress)
    if eval_data is not None:
        probe, where = eval_data, "evaluation data"
    else:
        unseen = torch.ones(len(kept), dtype=torch.bool)
        unseen[seen] = False
        rest = unseen.nonzero().flatten()
        probe = kept.subset(
            rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(config.seed))[:2000]].sort().values
        )
        where = "training images the fine-tune did not use"
    before = predict(purified, probe, spec.mean, spec.std, device=device, batch_size=batch_size)
    after = predict(retuned, probe, spec.mean, spec.std, device=device, batch_size=batch_size)
    record: dict = {
        "protocol": asdict(config),
        "tuned_on": len(seen),
        "agreement": accuracy(after, before),
        "agreement_on": where,
        "agreement_samples": len(probe),
    }
    if eval_data is not None:
        record["after"] = evaluate(
            retuned, eval_data, spec.mean, spec.std, attack=attack, device=device, batch_size=batch_size
        )
    return record
