"""Activation clipping: per-node statistics from the training data and ``min(a, c)`` bounds.

The premise (Xu, Gu, Sakurai): a backdoor trigger drives a few nodes far above the range
they take on ordinary inputs. With the training data alone we measure that range per node
and cap every activation at ``c = μ + λσ``. Poisoned samples are a small share of the
training data, so they barely move μ and σ.

How sites are found: the model is traced with ``torch.fx`` and every *call* of an
activation function becomes a site. Tracing rather than module hooks matters because one
module can be called several times per forward (torchvision's ``BasicBlock`` calls its
single ``nn.ReLU`` twice) and each call sees a different distribution. The same traced
graph, with a :class:`Clip` module spliced in after each site, is the purified model, so
the statistics and the clipping are guaranteed to address the same tensors.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from clipguard.errors import Cancelled, ClipguardError
from clipguard.inference import fast_copy, pieces
from clipguard.methods import DEFAULTS, Granularity

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Softplus,
)
ACTIVATION_FUNCTIONS: frozenset = frozenset(
    {
        F.relu,
        torch.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.celu,
        F.selu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.softplus,
        torch.nn.functional.relu_,
        torch.relu_,
    }
)
GRANULARITIES = tuple(Granularity)
SITES_CONTAINER = "clipguard_sites"


class Tap(nn.Module):
    """Identity marker at a site; the statistics pass hooks it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Clip(nn.Module):
    """``min(x, upper)`` with a per-node upper bound broadcast over the batch."""

    fuses_relu = False
    if TYPE_CHECKING:  # a buffer; a class-level annotation would break TorchScript's attribute inference
        upper: torch.Tensor

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(x, self.upper.to(x.dtype))


class ReluClip(Clip):
    """``min(relu(x), upper)`` in place of the ReLU: a plain ReLU site then costs the purified
    model nothing over the original (one pass over fresh memory, as the ReLU's own).

    It replaces the ReLU call itself, so it receives the pre-activation. The two forms agree
    for every bound (``clamp`` returns ``upper`` wherever ``upper < 0``, as ``min`` does).

    Without autograd the clamp is a ReLU then an in-place ``clamp_max_``: torch's clamp between
    two tensors is a slower kernel than either half. With :attr:`inplace` (set only on an
    export's copy, by :func:`export_form`, where nothing else reads the pre-activation) the
    ReLU overwrites its input too, so the site allocates nothing where the original ReLU
    allocated its output.
    """

    fuses_relu = True
    if TYPE_CHECKING:
        lower: torch.Tensor

    def __init__(self, upper: torch.Tensor) -> None:
        super().__init__(upper)
        self.register_buffer("lower", torch.zeros_like(self.upper))  # for the autograd path's clamp
        self.inplace = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        upper = self.upper.to(x.dtype)
        if x.requires_grad:  # relu saves its output for backward: no in-place op may touch it
            return torch.clamp(x, self.lower.to(x.dtype), upper)
        y = torch.relu_(x) if self.inplace else torch.relu(x)
        return y.clamp_max_(upper)


# --------------------------------------------------------------------------- tracing


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace a model; a model that cannot be traced gets a clear error."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # FX raises many types for data-dependent control flow
        raise ClipguardError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "models with data-dependent control flow are not supported"
        ) from exc


def _is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return False


def _is_plain_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_, F.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _site_names(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> list[str]:
    """Readable, stable names: the module path, with ``#k`` when a module is called k times."""
    calls: dict[str, int] = {}
    for node in nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    seen: dict[str, int] = {}
    names = []
    for node in nodes:
        if node.op == "call_module":
            target = str(node.target)
            k = seen.get(target, 0)
            seen[target] = k + 1
            names.append(f"{target}#{k}" if calls[target] > 1 else target)
        else:
            names.append(node.name)
    return names


def instrument(model: nn.Module, make: Callable[[str, int], nn.Module]) -> tuple[fx.GraphModule, list[str]]:
    """Trace ``model`` and splice ``make(site_name, index)`` after every activation call.

    Returns the new graph module and the site names in execution order. The original
    model is not modified (tracing copies the parameters by reference only).
    """
    gm = trace(model)
    nodes = [n for n in gm.graph.nodes if _is_activation(gm, n)]
    if not nodes:
        raise ClipguardError(f"{type(model).__name__} has no activation functions to clip")
    names = _site_names(gm, nodes)
    container = nn.Module()
    gm.add_module(SITES_CONTAINER, container)
    for i, (node, name) in enumerate(zip(nodes, names, strict=True)):
        site = make(name, i)
        if isinstance(site, Clip) and site.fuses_relu and not _is_plain_relu(gm, node):
            site = Clip(site.upper)  # only a plain ReLU can be folded into the clamp
        site.site_name = name  # type: ignore[assignment]  # nn.Module.__setattr__ takes any attribute
        container.add_module(f"s{i}", site)
        if getattr(site, "fuses_relu", False):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"{SITES_CONTAINER}.s{i}", (node.args[0],))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(f"{SITES_CONTAINER}.s{i}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
    for node in gm.graph.nodes:
        # FX renders annotations as aliases (``_torch_Tensor_``) that TorchScript cannot
        # resolve; without them every value is a Tensor to the scripter, which is right here.
        node.type = None
    gm.graph.lint()
    gm.recompile()
    return gm, names


def site_modules(gm: nn.Module) -> list[nn.Module]:
    """The spliced site modules in execution order."""
    container = gm.get_submodule(SITES_CONTAINER)
    return [container.get_submodule(f"s{i}") for i in range(len(list(container.children())))]


def clipped_site_names(gm: nn.Module) -> list[str]:
    """Site names of an instrumented graph, in execution order."""
    return [str(m.site_name) for m in site_modules(gm)]


# --------------------------------------------------------------------------- statistics


def reduce_dims(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Dimensions pooled into one node: batch (and space, for ``channel``) of an activation."""
    if granularity == "element" or x.dim() <= 2:
        return (0,)
    if granularity == "channel":
        return (0, *range(2, x.dim()))
    raise ClipguardError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")


CANCELLATION_LIMIT = 1e3
"""Above this mean²/variance ratio, float32 sum-of-squares loses too many digits (see below)."""


NHWC_CHUNK = 1 << 18
"""Values per block of the NHWC reduction: 1 MiB of float32, which stays in a core's L2 cache
between the block's reads (4 MiB blocks ran 1.1-1.4x slower; 256 KiB ones about 2x slower,
from the per-block overhead)."""


def _is_nhwc(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """A per-channel reduction over a channels_last batch (what ``clipguard.inference`` runs on a CPU)."""
    return (
        x.dim() == 4
        and dims == (0, 2, 3)
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def _nhwc_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``Σx`` and ``Σx²`` (float64, shaped ``(C, 1, 1)``) of a channels_last batch.

    Viewed as a ``(pixels, C)`` matrix the batch is reduced down its columns. torch's
    reductions over ``dims=(0, 2, 3)`` of such a tensor, and a column norm, run 4-6x slower
    than on NCHW. A matrix-vector product with a vector of ones is the fastest column sum
    torch has on a CPU (BLAS), so each cache-sized block of rows is summed that way, squared
    into one reused buffer and summed again, and the blocks are accumulated in float64 (which
    also makes the result more exact than one float32 reduction over millions of values).
    """
    c = x.shape[1]
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: channels_last is pixel-major
    step = min(max(1, NHWC_CHUNK // c), rows.shape[0])
    ones = torch.ones(step, dtype=x.dtype)
    squares = torch.empty(step, c, dtype=x.dtype)
    total = torch.zeros(c, dtype=torch.float64)
    sumsq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step]
        n = block.shape[0]
        total += torch.mv(block.t(), ones[:n])
        torch.mul(block, block, out=squares[:n])
        sumsq += torch.mv(squares[:n].t(), ones[:n])
    return total.view(c, 1, 1), sumsq.view(c, 1, 1)


def _batch_moments(x: torch.Tensor, dims: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and centred sum of squares of one batch, per node, as float64.

    Fast path: one plain sum and one L2 norm, two read-only passes that cost about a third
    of ``torch.var_mean`` on a CPU. ``Σx² − n·mean²`` cancels when a node's mean is large
    next to its spread (rare after activations, which are mostly near zero); such batches are
    recomputed with the exact two-pass ``var_mean``, so the result never depends on the data
    being well behaved. On CUDA the fused ``var_mean`` is already memory-bound and the
    check would force a device sync per site, so the exact kernel is always used there.
    """
    if x.is_cuda:
        var, mean_exact = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return mean_exact[0].double(), var[0].double() * n
    if _is_nhwc(x, dims):
        total, sumsq = _nhwc_sums(x)
    else:
        total = x.sum(dim=dims, keepdim=True)[0].double()
        sumsq = torch.linalg.vector_norm(x, 2, dim=dims, keepdim=True)[0].double().square()
    mean = total / n
    m2 = (sumsq - n * mean.square()).clamp_min(0.0)
    if x.dtype == torch.float64 or bool((n * mean.square() > CANCELLATION_LIMIT * m2).any()):
        var, mean_exact = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        return mean_exact[0].double(), var[0].double() * n
    return mean, m2


class RunningMoments:
    """Streaming per-node mean and variance, merged across batches with Chan et al.'s rule.

    Each batch's mean and centred sum of squares are computed in the activation's dtype
    (:func:`_batch_moments`), then merged into float64 accumulators. This keeps the pass as fast
    as a plain forward while staying accurate over millions of values per channel, where
    naive sum-of-squares in float32 loses most of its digits.
    """

    def __init__(self, granularity: Granularity | str = DEFAULTS.granularity) -> None:
        if granularity not in GRANULARITIES:
            raise ClipguardError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        self.granularity = granularity
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        dims = reduce_dims(x, self.granularity)
        n_b = math.prod(x.shape[d] for d in dims)
        mean_b, m2_b = _batch_moments(x, dims, n_b)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ClipguardError(
                f"activation shape changed between batches ({tuple(self.mean.shape)} -> {tuple(mean_b.shape)}); "
                "element granularity needs images of one size"
            )
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / total)
        self.count = total

    def var(self, correction: int = 1) -> torch.Tensor:
        if self.m2 is None or self.count <= correction:
            raise ClipguardError("no activations were recorded (empty data?)")
        return self.m2 / (self.count - correction)

    def std(self, correction: int = 1) -> torch.Tensor:
        return self.var(correction).sqrt()


@dataclass
class SiteStats:
    """Per-site statistics of the training activations, in execution order."""

    names: list[str]
    moments: list[RunningMoments]
    samples: int
    granularity: str

    def bounds(self, lam: float) -> dict[str, torch.Tensor]:
        """``μ + λσ`` per node, float32, shaped to broadcast against one sample."""
        if not math.isfinite(lam):
            raise ClipguardError(f"λ must be a finite number, got {lam}")
        out = {}
        for n, m in zip(self.names, self.moments, strict=True):
            std = m.std()  # raises when nothing was recorded
            assert m.mean is not None
            out[n] = (m.mean + lam * std).float().cpu()
        return out


def compute_statistics(
    model: nn.Module,
    batches: Callable[[], Iterable[Any]],
    *,
    granularity: Granularity | str = DEFAULTS.granularity,
    total: int | None = None,
    progress: Callable[[float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    fast: bool = True,
) -> SiteStats:
    """One streaming pass: forward every batch once and fold each site's output into its moments.

    ``batches()`` yields input tensors (already normalised, on the model's device) or
    ``(inputs, labels)`` pairs; ``total`` is the number of samples, for progress. With
    ``fast`` (the default) a CPU pass runs on a BatchNorm-folded, channels_last copy
    (:mod:`clipguard.inference`), in cache-sized pieces: the same activations to float
    rounding, two to three times as fast; ``fast=False`` reads the model exactly as given.
    """
    moments: list[RunningMoments] = []
    traced, names = instrument(model, lambda name, i: Tap())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gm = fast_copy(traced, device) if fast else traced
    taps = site_modules(gm)
    for tap in taps:
        mom = RunningMoments(granularity)
        moments.append(mom)
        tap.register_forward_hook(lambda _m, _inp, out, mom=mom: mom.update(out))
    gm.eval()
    seen = 0
    with torch.inference_mode():
        for batch in batches():
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled during the bounds pass")
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            for piece in pieces(x, device) if fast else (x,):
                gm(piece)
            seen += int(x.shape[0])
            if progress is not None and total:
                progress(min(1.0, seen / total))
    if seen == 0:
        raise ClipguardError("the training data is empty")
    return SiteStats(names, moments, seen, granularity)


def clipped_model(model: nn.Module, bounds: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The purified network: every site with a bound clipped (plain ReLUs fused with their clip)."""

    def make(name: str, _i: int) -> nn.Module:
        return ReluClip(bounds[name]) if name in bounds else Tap()

    gm, names = instrument(model, make)
    unknown = set(bounds) - set(names)
    if unknown:
        raise ClipguardError(f"bounds name sites this model does not have: {sorted(unknown)[:3]}")
    gm.eval()
    return gm


FRESH_PRODUCERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
)


def _fresh_and_private(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s tensor is new memory (not an input, a parameter or a view) that only
    one consumer reads, so that consumer may overwrite it."""
    if len(node.users) != 1:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), FRESH_PRODUCERS)
    return node.op == "call_function" and node.target in (operator.add, torch.add) and "out" not in node.kwargs


def export_form(model: nn.Module) -> nn.Module:
    """A copy of a clipped model for export whose fused ReLU clips overwrite their input wherever
    nothing else reads it (a convolution's, normalisation's or residual sum's private output).

    Same outputs as ``model``; forward hooks on the sites would see the clipped input, which is
    why only the export gets this form. A model without clipguard sites is returned as it is.
    """
    if not isinstance(model, fx.GraphModule) or not hasattr(model, SITES_CONTAINER):
        return model
    out = copy.deepcopy(model)
    for node in out.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith(SITES_CONTAINER + "."):
            continue
        site = out.get_submodule(str(node.target))
        if isinstance(site, ReluClip) and node.args and isinstance(node.args[0], fx.Node):
            site.inplace = _fresh_and_private(out, node.args[0])
    return out
