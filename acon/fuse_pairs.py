"""Where a model's BatchNorm → activation pairs are: ``torch.fx``'s graph of the model, else its layout.

``fuse_bn_acon`` may fuse a BatchNorm with an activation only when the BatchNorm's output goes to that
activation alone (no residual sum, concatenation or second reader) and the activation reads nothing else.
The graph says so for any model ``torch.fx`` can trace, whatever its module tree: timm's and torchvision's
ResNet blocks (``bn1 → act1``), the ``torch.fx.GraphModule`` that ``convert_activations`` makes of a model
that calls one ``relu`` module several times, ``nn.Sequential`` stacks. The BatchNorms and activations are
traced as leaves (``nn.Identity`` is traced through, so timm's absent drop-block does not hide a pair).

A model ``torch.fx`` cannot trace as a whole (a detection or segmentation model: its forward iterates
over shapes and dicts) is traced part by part: each child that traces gives its graph, and a child that does
not is split into its own children, down to the leaves. Where no graph shows the modules, the layout rule
holds: consecutive ``nn.Sequential`` children and the ``(bn, act)`` attribute names a block lists in
``bn_act_pairs``. The same rule covers pairs hidden inside a module the tracer keeps opaque (timm's
untraceable layers). A graph of a part is as safe as the model's: a BatchNorm output used outside its part
is that part's output in its graph, so it has a second reader there and is not paired.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import fx, nn

from acon.convert import trace_graph
from acon.release import release_frames

Pair = tuple[nn.Module, nn.Module]


@dataclass
class FoundPairs:
    """BatchNorm → activation pairs of a model, and how they were found (a phrase for the log line)."""

    pairs: list[Pair]
    how: str


def layout_pairs(model: nn.Module) -> Iterator[Pair]:
    """Consecutive ``nn.Sequential`` children and the pairs blocks declare in ``bn_act_pairs``."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            kids = list(module)
            yield from zip(kids, kids[1:], strict=False)
        for bn_name, act_name in getattr(module, "bn_act_pairs", ()):
            yield getattr(module, bn_name), getattr(module, act_name)


def _sole_reader(node: fx.Node) -> fx.Node | None:
    """The one node that reads ``node``'s output, when there is exactly one."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def _act_after(bn_calls: list[fx.Node], calls: dict[str, list[fx.Node]]) -> str | None:
    """The module every call of a BatchNorm feeds alone, when every call of that module reads only it."""
    readers = [_sole_reader(n) for n in bn_calls]
    if any(
        r is None or r.op != "call_module" or r.args != (n,) or r.kwargs
        for r, n in zip(readers, bn_calls, strict=True)
    ):
        return None
    targets = {r.target for r in readers}
    if len(targets) != 1:
        return None
    act = targets.pop()
    return act if len(calls[act]) == len(bn_calls) else None


def graph_pairs(graph: fx.Graph, model: nn.Module, is_bn: Callable, is_act: Callable) -> list[Pair]:
    """Pairs where every call of a BatchNorm feeds only an activation module and every call of that
    activation reads only such an output (a module called several times, e.g. a shared block, qualifies
    when each call does)."""
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    pairs = []
    for target, bn_calls in calls.items():
        bn = model.get_submodule(target)
        act = _act_after(bn_calls, calls) if is_bn(bn) else None
        if act is not None and is_act(model.get_submodule(act)):
            pairs.append((bn, model.get_submodule(act)))
    return pairs


def _first_sentence(err: Exception) -> str:
    """``TypeName: the first sentence of the message`` (tracer errors run to several sentences)."""
    text = str(err).splitlines()[0] if str(err) else ""
    end = text.find(". ")
    return f"{type(err).__name__}: {text if end < 0 else text[: end + 1]}"


@contextlib.contextmanager
def _attributes_kept(module: nn.Module) -> Iterator[None]:
    """Every submodule's attributes as they were before: a forward run on tracer proxies (a part of a detection
    model, say) may assign some, e.g. a cache of anchors, before it fails."""
    saved = [(m, dict(m.__dict__)) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:  # not compared first: a proxy's == is traced, not answered
            m.__dict__.clear()
            m.__dict__.update(attrs)


def _traced_parts(
    module: nn.Module, is_leaf: Callable[[nn.Module], bool]
) -> tuple[list[tuple[nn.Module, fx.Graph]], str | None]:
    """(part, graph) for ``module`` when it traces, else for its largest parts that do (children, their
    children, ...), and why ``module`` did not trace (None when it did)."""
    try:
        with _attributes_kept(module):
            return [(module, trace_graph(module, is_leaf, through=(nn.Identity,)))], None
    except Exception as err:  # any failure of user code under tracing: the parts and the layout rule are safe
        release_frames(err)  # its traceback would keep the callers' frames (the model, the loaders) alive
        reason = _first_sentence(err)
    parts = []
    for child in module.children():
        if not is_leaf(child) and next(child.children(), None) is not None:
            parts += _traced_parts(child, is_leaf)[0]
    return parts, reason


def find_pairs(model: nn.Module, is_bn: Callable, is_act: Callable) -> FoundPairs:
    """The pairs ``fuse_bn_acon`` may fuse (see the module docstring); ``is_bn``/``is_act`` pick the
    candidate modules, which are traced as leaves."""
    parts, reason = _traced_parts(model, lambda m: is_bn(m) or is_act(m))
    seen = {
        id(part.get_submodule(n.target))
        for part, graph in parts
        for n in graph.nodes
        if n.op == "call_module"
    }
    pairs = [pair for part, graph in parts for pair in graph_pairs(graph, part, is_bn, is_act)]
    hidden = [
        (b, a)
        for b, a in layout_pairs(model)
        if id(b) not in seen and id(a) not in seen and is_bn(b) and is_act(a)
    ]
    if reason is None:
        how = "found in the torch.fx graph"
        if hidden:
            how += f", {len(hidden)} inside modules kept opaque by the tracer"
    else:
        how = f"torch.fx cannot trace the model ({reason}); {len(pairs)} found in the graphs of its parts"
        if hidden:
            how += f", {len(hidden)} by nn.Sequential neighbours and declared bn_act_pairs"
    return FoundPairs(pairs + hidden, how)


__all__ = ["FoundPairs", "find_pairs", "graph_pairs", "layout_pairs"]
