"""Where a model's BatchNorm → activation pairs are: ``torch.fx``'s graph of the model, else its layout.

``fuse_bn_acon`` may fuse a BatchNorm with an activation only when the BatchNorm's output goes to that
activation alone (no residual sum, concatenation or second reader) and the activation reads nothing else.
The graph says so for any model ``torch.fx`` can trace, whatever its module tree: timm's and torchvision's
ResNet blocks (``bn1 → act1``), the ``torch.fx.GraphModule`` that ``convert_activations`` makes of a model
that calls one ``relu`` module several times, ``nn.Sequential`` stacks. The BatchNorms and activations are
traced as leaves (``nn.Identity`` is traced through, so timm's absent drop-block does not hide a pair).

A model ``torch.fx`` cannot trace keeps the layout rule: consecutive ``nn.Sequential`` children and the
``(bn, act)`` attribute names a block lists in ``bn_act_pairs``. The same rule covers pairs hidden inside
a module the tracer keeps opaque (timm's untraceable layers), where the graph shows neither module.
"""

from __future__ import annotations

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


def find_pairs(model: nn.Module, is_bn: Callable, is_act: Callable) -> FoundPairs:
    """The pairs ``fuse_bn_acon`` may fuse (see the module docstring); ``is_bn``/``is_act`` pick the
    candidate modules, which are traced as leaves."""
    try:
        graph = trace_graph(model, lambda m: is_bn(m) or is_act(m), through=(nn.Identity,))
    except Exception as err:  # any failure of user code under tracing: the layout rule is still safe
        release_frames(err)  # its traceback would keep the callers' frames (the model, the loaders) alive
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return FoundPairs(
            list(layout_pairs(model)),
            f"torch.fx cannot trace the model ({reason[:160]}); "
            "nn.Sequential neighbours and declared bn_act_pairs only",
        )
    seen = {id(model.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module"}
    pairs = graph_pairs(graph, model, is_bn, is_act)
    hidden = [
        (b, a)
        for b, a in layout_pairs(model)
        if id(b) not in seen and id(a) not in seen and is_bn(b) and is_act(a)
    ]
    how = "found in the torch.fx graph"
    if hidden:
        how += f", {len(hidden)} inside modules kept opaque by the tracer"
    return FoundPairs(pairs + hidden, how)


__all__ = ["FoundPairs", "find_pairs", "graph_pairs", "layout_pairs"]
