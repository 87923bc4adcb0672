"""Cut a network into a frozen body and a trainable tail, at a point a tensor alone crosses.

Why: guard's unlearning has to break one shortcut (trigger → target class), and the
layers nearest the output are where a class decision can be rewired. Fine-tuning only the
tail, on the body's outputs cached during the detection pass that runs anyway, skips every
forward and backward pass through the body. The early features that clean accuracy rests
on stay as they were. How it compares with fine-tuning the whole network, in ASR and time, is
measured in docs/lab/benchmarks.md.

A *cut point* is a node of the traced graph whose output is the only value computed so far
that later nodes still read: a stage boundary such as the input of ResNet's ``layer4``. A
point inside a residual block is not a cut point, because the skip connection crosses it too.
:func:`split_tail` picks the last cut point whose tail still holds ``min_share`` of the
parameters, so the tail is a real part of the network and not just the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from clipguard.defenses.clipping import trace
from clipguard.errors import ClipguardError

DEFAULT_TAIL_SHARE = 0.5
"""Smallest share of the parameters the trainable tail must hold (SmallCNN: its last conv block; ResNet-18: layer4)."""


@dataclass
class Split:
    """Two graph modules sharing the model's own submodules: ``tail(body(x)) == model(x)``."""

    body: fx.GraphModule
    tail: fx.GraphModule
    cut: str
    """Name of the traced node at the cut; :func:`split_at` rebuilds the same split on a copy of the model."""
    tail_share: float
    """Share of the model's parameters the tail holds."""


def _parameters(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[int, int]:
    """The parameters ``nodes`` read (modules they call, tensors they fetch): id → element count."""
    found: dict[int, int] = {}
    for node in nodes:
        if node.op == "call_module":
            found.update((id(p), p.numel()) for p in gm.get_submodule(str(node.target)).parameters())
        elif node.op == "get_attr":
            try:
                p = gm.get_parameter(str(node.target))
            except AttributeError:  # a buffer or a constant
                continue
            found[id(p)] = p.numel()
    return found


def _share(gm: fx.GraphModule, nodes: list[fx.Node], at: int, total: int | None = None) -> float:
    """Share of all parameter elements (``total``, counted here when not given) read after position ``at``."""
    total = sum(_parameters(gm, nodes).values()) if total is None else total
    return sum(_parameters(gm, nodes[at + 1 :]).values()) / total if total else 0.0


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes, in execution order, whose output is the only computed value later nodes read."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in nodes}
    points = []
    live: set[fx.Node] = set()
    for i, node in enumerate(nodes):
        if node.op != "get_attr":  # parameters and buffers are not values flowing between the parts
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if node.op not in ("placeholder", "output") and live == {node}:
            points.append(node)
    return points


def _part(gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node | None, end: fx.Node) -> fx.GraphModule:
    """A graph module computing ``end`` from ``nodes``; ``start`` (if any) becomes its input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if start is not None:
        env[start] = graph.placeholder(start.name)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise ClipguardError(f"cannot cut the network at {start}: {node.name} crosses the cut")
            env[node] = graph.node_copy(node, lookup)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, lookup)
    graph.output(env[end])
    return fx.GraphModule(gm, graph)


def split_at(model: nn.Module, cut: str) -> Split:
    """The split of ``model`` at the traced node named ``cut`` (one :func:`split_tail` chose)."""
    gm = trace(model)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    point = next((n for n in cut_points(gm) if n.name == cut), None)
    if point is None:
        raise ClipguardError(f"{type(model).__name__} has no cut point named {cut!r}")
    at = nodes.index(point)
    body_nodes = nodes[: at + 1]
    tail_nodes = [n for n in nodes[at + 1 :] if n.op != "get_attr"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    body = _part(gm, body_nodes, None, point)
    tail = _part(gm, tail_nodes, point, output.args[0])
    return Split(body.eval(), tail, cut, _share(gm, nodes, at))


def split_tail(model: nn.Module, min_share: float = DEFAULT_TAIL_SHARE) -> Split | None:
    """The split at the last cut point whose tail holds at least ``min_share`` of the parameters.

    ``None`` when no cut point qualifies (a network without one, or a tail that would hold
    too little), and the caller fine-tunes the whole network instead.
    """
    if not 0.0 < min_share <= 1.0:
        raise ClipguardError(f"tail share must be in (0, 1], got {min_share}")
    gm = trace(model)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    total = sum(_parameters(gm, nodes).values())
    for point in reversed(cut_points(gm)):
        if _share(gm, nodes, nodes.index(point), total) >= min_share:
            return split_at(model, point.name)
    return None
