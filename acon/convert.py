"""``convert_activations``: put ACON into any model, one module per activation call site.

A dry forward pass on ``example_input`` finds every call of a target activation (module or
functional) and the channel count it sees. Modules called exactly once are replaced in place under
their own name. When a module is called at several sites (torchvision's ResNet blocks call one
``self.relu`` two or three times) or an activation is a functional call (``F.relu(x)``, ``x.relu()``,
``torch.relu``, as in torchvision's DenseNet), the model is rewritten with ``torch.fx``: the first call of
a shared module keeps its name, later calls get ``<name>_1``, ``<name>_2``, ...; a functional call gets
``<enclosing module>.<fx node name>`` (e.g. ``relu``). Names depend only on the model's code, so state
dicts of converted models load across runs. A model that FX cannot trace raises an error naming the
call sites that could not be reached.

Every conversion logs one line (logger ``acon.convert``) with the call sites converted per activation
type and the activation types left alone, e.g. torchvision's ``mobilenet_v3_small``: ``converted 14 of
33 activation call sites ... (relu 14); left alone: hardswish 19``; the converted model carries the same
:class:`ConversionReport` as ``model.acon_conversion``.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from acon.activations import AconB, AconC, MetaAconC, Swish
from acon.factory import ActivationSpec, activation_label, create_activation
from acon.frelu import AconFReLU, FReLU

RELU_MATCH_BETA = 1.0e4
"""β given to ACON-C/ACON-B/Swish that stand in for ReLU or LeakyReLU under ``init="match"``."""
META_MATCH_BIAS = 16.0
"""bn2 bias of a Meta-ACON standing in for SiLU: β = σ(16) = 1 - 1.1e-7 for every sample."""

TARGETS: dict[str, tuple[tuple[type, ...], tuple[Callable, ...], tuple[str, ...]]] = {
    "relu": ((nn.ReLU,), (F.relu, F.relu_, torch.relu, torch.relu_), ("relu", "relu_")),
    "silu": ((nn.SiLU,), (F.silu,), ()),
    "gelu": ((nn.GELU,), (F.gelu,), ()),
    "hardswish": ((nn.Hardswish,), (F.hardswish,), ()),
    "relu6": ((nn.ReLU6,), (F.relu6,), ()),
    "leaky_relu": ((nn.LeakyReLU,), (F.leaky_relu, F.leaky_relu_), ()),
    "prelu": ((nn.PReLU,), (F.prelu,), ()),
}
"""Target name -> (module classes, functions, Tensor methods)."""
log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("relu", "silu")
_ALIASES = {"swish": "silu"}
_MATCHABLE = ("relu", "silu", "leaky_relu", "prelu")


@dataclass
class CallSite:
    """One call of a target activation seen in the dry run."""

    owner: str  # the module being converted (shared or single), or the module around a functional call
    kind: str
    channels: list[int] = field(default_factory=list)
    functional: str = ""


@dataclass
class ConversionReport:
    """What ``convert_activations`` did: call sites converted and left alone, per activation type."""

    model: str
    activation: str
    converted: dict[str, int]
    left_alone: dict[str, int]

    def summary(self) -> str:
        """One line: ``converted 14 of 33 activation call sites of M to AconC (relu 14); left alone: ...``."""
        done, total = (
            sum(self.converted.values()),
            sum(self.converted.values()) + sum(self.left_alone.values()),
        )
        kinds = ", ".join(f"{k} {n}" for k, n in self.converted.items())
        line = f"converted {done} of {total} activation call sites of {self.model} to {self.activation} ({kinds})"
        if self.left_alone:
            kept = ", ".join(f"{k} {n}" for k, n in self.left_alone.items())
            line += f"; left alone: {kept} (not in targets; add them to targets / model.targets to convert)"
        return line


def _site_counts(modules: dict[str, CallSite], functional: list[CallSite]) -> Counter:
    counts: Counter = Counter()
    for site in modules.values():
        counts[site.kind] += len(site.channels)
    for call in functional:
        counts[call.kind] += 1
    return counts


def resolve_targets(targets: Iterable[str] | None) -> tuple[str, ...]:
    """Target names, defaulting to ReLU and SiLU; unknown names raise with the valid list."""
    names = tuple(_ALIASES.get(t.lower(), t.lower()) for t in (targets or DEFAULT_TARGETS))
    bad = [t for t in names if t not in TARGETS]
    if bad:
        raise ValueError(f"convert_activations: unsupported target(s) {bad}; valid: {', '.join(TARGETS)}")
    return names


def _kind_of_module(module: nn.Module, kinds: tuple[str, ...]) -> str | None:
    return next((k for k in kinds if type(module) in TARGETS[k][0]), None)


def _is_tensor_method(func: Callable) -> bool:
    owner = getattr(func, "__objclass__", None)
    return isinstance(owner, type) and issubclass(torch.Tensor, owner)


def _kind_of_function(func: Callable, kinds: tuple[str, ...]) -> str | None:
    name = getattr(func, "__name__", "")
    for k in kinds:
        if func in TARGETS[k][1] or (
            name in TARGETS[k][2] and getattr(func, "__objclass__", None) is torch.Tensor
        ):
            return k
    return None


class _Recorder(TorchFunctionMode):
    """Functional target calls made outside target modules, with the enclosing module's name."""

    def __init__(self, kinds: tuple[str, ...]) -> None:
        super().__init__()
        self.kinds, self.stack, self.inside_target, self.calls = kinds, [""], 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = None if self.inside_target else _kind_of_function(func, self.kinds)
        if kind is not None:
            self.calls.append(CallSite(self.stack[-1], kind, [args[0].shape[1]], func.__name__))
        return func(*args, **(kwargs or {}))


def find_call_sites(
    model: nn.Module, example_input: torch.Tensor, kinds: tuple[str, ...]
) -> tuple[dict[str, CallSite], list[CallSite]]:
    """Dry run: target modules (name -> calls with channels) and functional call sites."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"convert_activations: example_input must be a tensor, got {type(example_input).__name__}"
        )
    modules: dict[str, CallSite] = {}
    recorder, handles = _Recorder(kinds), []
    for name, m in model.named_modules():
        kind = _kind_of_module(m, kinds)

        def pre(mod, args, name=name, kind=kind):
            recorder.stack.append(name)
            if kind is not None:
                recorder.inside_target += 1
                x = args[0]
                if not isinstance(x, torch.Tensor) or x.dim() < 2:
                    raise ValueError(f"convert_activations: {name} got an input without a channel dim")
                modules.setdefault(name, CallSite(name, kind)).channels.append(int(x.shape[1]))

        def post(mod, args, out, kind=kind):
            recorder.stack.pop()
            if kind is not None:
                recorder.inside_target -= 1

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(example_input)
    except Exception as err:
        raise ValueError(
            f"convert_activations: the dry forward pass on example_input of shape "
            f"{tuple(example_input.shape)} failed: {type(err).__name__}: {err}"
        ) from err
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return modules, recorder.calls


def _slope(source: nn.Module | float | None) -> torch.Tensor | float:
    if isinstance(source, nn.PReLU):
        return source.weight.detach().reshape(1, -1, 1, 1)
    if isinstance(source, nn.LeakyReLU):
        return float(source.negative_slope)
    return 0.01 if source is None else float(source)


@torch.no_grad()
def match_init(act: nn.Module, kind: str, source: nn.Module | float | None = None) -> nn.Module:
    """Set ``act``'s parameters so it computes the ``kind`` activation it replaces (see ``convert_activations``)."""
    if kind not in _MATCHABLE:
        raise ValueError(f"init='match': no ACON form reproduces {kind}; matchable: {', '.join(_MATCHABLE)}")
    beta = 1.0 if kind == "silu" else RELU_MATCH_BETA
    slope = 0.0 if kind in ("relu", "silu") else _slope(source)
    if isinstance(act, MetaAconC):
        if kind != "silu":
            raise ValueError(
                f"init='match': Meta-ACON's β lies in (0, 1), so it cannot approach {kind} (needs β → ∞)"
            )
        act.p1.fill_(1.0), act.p2.fill_(0.0)
        act.fc2.weight.zero_(), act.fc2.bias.zero_(), act.bn2.bias.fill_(META_MATCH_BIAS)
    elif isinstance(act, AconC):
        act.p1.fill_(1.0), act.p2.copy_(torch.broadcast_to(torch.as_tensor(slope), act.p2.shape))
        act.beta.fill_(beta)
    elif isinstance(act, AconB):
        act.p.copy_(torch.broadcast_to(torch.as_tensor(slope), act.p.shape)), act.beta.fill_(beta)
    elif isinstance(act, Swish) and kind in ("relu", "silu"):
        act.beta.fill_(beta)
    else:
        raise ValueError(f"init='match': {type(act).__name__} cannot reproduce {kind}")
    return act


def _new_activation(activation: ActivationSpec, channels: list[int], where: str, kind: str, init: str, src):
    if len(set(channels)) != 1:
        raise ValueError(
            f"convert_activations: {where} sees different channel counts {sorted(set(channels))}"
        )
    act = create_activation(activation, channels[0])
    return match_init(act, kind, src) if init == "match" else act


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 0
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _convert_in_place(model, modules: dict[str, CallSite], activation, init: str) -> nn.Module:
    for name, site in modules.items():
        new = _new_activation(activation, site.channels, name, site.kind, init, model.get_submodule(name))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def trace_graph(
    model: nn.Module, is_leaf: Callable[[nn.Module], bool] | None = None, through: tuple[type, ...] = ()
) -> fx.Graph:
    """``model``'s ``torch.fx`` graph with ACON modules, timm's untraceable layers and ``is_leaf`` modules
    as leaves, and modules of the ``through`` types traced into."""
    leaves: set[type] = {AconC, MetaAconC, AconB, Swish, FReLU, AconFReLU}
    try:
        from timm.models import get_notrace_functions, get_notrace_modules

        leaves |= set(get_notrace_modules())
        autowrap = tuple(get_notrace_functions())
    except ImportError:
        autowrap = ()

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if type(m) in through:
                return False
            if type(m) in leaves or (is_leaf is not None and is_leaf(m)):
                return True
            return super().is_leaf_module(m, qualname)

    tracer = Tracer(autowrap_functions=autowrap)
    try:
        return tracer.trace(model)
    finally:  # traced or not, the tracer sits in reference cycles with the model: dropping its state lets
        tracer.__dict__.clear()  # the model go when its owner drops it, not when the cycle collector runs


def _trace(model: nn.Module) -> fx.GraphModule:
    return fx.GraphModule(model, trace_graph(model), type(model).__name__)


def _node_kind(gm: fx.GraphModule, node: fx.Node, kinds: tuple[str, ...]) -> str | None:
    if node.op == "call_module":
        return _kind_of_module(gm.get_submodule(node.target), kinds)
    if node.op == "call_function":
        return _kind_of_function(node.target, kinds)
    if node.op == "call_method":
        return next((k for k in kinds if node.target in TARGETS[k][2]), None)
    return None


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack)) if stack else ""


def _convert_with_fx(model, example_input, kinds, activation, init: str) -> fx.GraphModule:
    gm = _trace(model)
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = gm.training
    with torch.no_grad():
        ShapeProp(gm.eval()).propagate(example_input)
    gm.train(was_training)
    taken = {n for n, _ in gm.named_modules()}
    sites = [
        (node, kind, [int(node.args[0].meta["tensor_meta"].shape[1])])
        for node in gm.graph.nodes
        if (kind := _node_kind(gm, node, kinds)) is not None
    ]
    first_use: set[str] = set()
    for node, kind, channels in sites:
        x = node.args[0]
        if node.op == "call_module":
            src = model.get_submodule(node.target)  # the graph module's copy is replaced below
            name = node.target if node.target not in first_use else _unique(node.target, taken)
            first_use.add(node.target)
        else:
            src = (
                node.args[1]
                if len(node.args) > 1
                else node.kwargs.get("negative_slope", node.kwargs.get("weight"))
            )
            owner = _owner(node)
            name = _unique(f"{owner}.{node.name}" if owner else node.name, taken)
        gm.add_submodule(name, _new_activation(activation, channels, name, kind, init, src))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def convert_activations(
    model: nn.Module,
    activation: ActivationSpec,
    *,
    example_input: torch.Tensor,
    targets: Iterable[str] | None = None,
    init: str = "default",
) -> nn.Module:
    """Replace every call site of the ``targets`` activations in ``model`` by its own ``activation`` module.

    ``activation`` is anything ``acon.create_activation`` takes. ``targets`` (default ReLU and SiLU/Swish,
    modules and functional forms) may add ``gelu``, ``hardswish``, ``relu6``, ``leaky_relu``, ``prelu``.
    Returns ``model`` converted in place when every site is a module called once, else a
    ``torch.fx.GraphModule`` (see the module docstring for names).

    ``init="match"`` makes the converted model compute what the original did:

    - SiLU -> ACON-C with p1=1, p2=0, β=1 (or Swish/ACON-A with β=1): the same function, equal up to
      floating-point rounding of the kernels.
    - ReLU -> ACON-C with p1=1, p2=0, β=1e4 (``RELU_MATCH_BETA``): |ACON-C(x) - ReLU(x)| = |x|σ(-β|x|)
      ≤ 0.2785/β = 2.8e-5 for every x (the maximum of t·σ(-t) is 0.2785, at t = 1.278).
    - LeakyReLU/PReLU(a) -> ACON-B with p=a (or ACON-C with p1=1, p2=a), β=1e4: the same bound.
    - Meta-ACON generates β = σ(·) in (0, 1) per sample: it matches SiLU with fc2 zeroed and bn2's bias
      16 (β = 1 - 1.1e-7, so |error| ≤ 2.8e-8·x²), and cannot approach ReLU or LeakyReLU (β → ∞), which
      raises. GELU, Hardswish and ReLU6 have no ACON form and raise under ``match``.
    """
    if init not in ("default", "match"):
        raise ValueError(f"convert_activations: init={init!r} is not one of ('default', 'match')")
    kinds = resolve_targets(targets)
    every_module, every_call = find_call_sites(model, example_input, tuple(TARGETS))
    modules = {n: s for n, s in every_module.items() if s.kind in kinds}
    functional = [c for c in every_call if c.kind in kinds]
    counts = _site_counts(every_module, every_call)
    if not modules and not functional:
        found = ", ".join(f"{k} {n}" for k, n in counts.items()) or "none"
        raise ValueError(
            f"convert_activations: no {'/'.join(kinds)} activation is called by the model "
            f"(activation call sites found: {found})"
        )
    report = ConversionReport(
        type(model).__name__,
        activation_label(activation),
        {k: n for k, n in counts.items() if k in kinds},
        {k: n for k, n in counts.items() if k not in kinds},
    )
    shared = [n for n, s in modules.items() if len(s.channels) > 1]
    if not shared and not functional:
        return _reported(_convert_in_place(model, modules, activation, init), report)
    try:
        return _reported(_convert_with_fx(model, example_input, kinds, activation, init), report)
    except (fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as err:
        counts: dict[str, int] = defaultdict(int)
        for call in functional:
            counts[f"{call.owner or '<model>'}: {call.functional}()"] += 1
        sites = [f"{n} (called {len(modules[n].channels)}x)" for n in shared]
        sites += [f"{k} ({v}x)" if v > 1 else k for k, v in counts.items()]
        raise ValueError(
            f"convert_activations: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: "
            f"{err}); these call sites could not be reached: {'; '.join(sites)}"
        ) from err


def _reported(model: nn.Module, report: ConversionReport) -> nn.Module:
    """Log the report's line and attach it to the converted model (``model.acon_conversion``)."""
    model.acon_conversion = report
    log.info("acon: %s", report.summary())
    return model
