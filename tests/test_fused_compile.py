"""ACON-C and Meta-ACON under ``torch.compile``: the traced forward is the plain formula (no opaque forward
op), so Inductor can fuse it with the BatchNorm before it and recompute it in backward, and the backward is
the fused backward op; values, gradients and the NaN/±Inf pattern equal the eager fused ops'."""

from __future__ import annotations

import copy
import functools

import pytest
import test_fused_fuzz_cases as fuzz_cases
import torch
from conftest import load_script
from test_fused_fuzz_cases import SEED, cases, check_case
from torch import nn

from acon import AconC, MetaAconC
from acon.fused import cpu


def _net(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        AconC(8, impl="auto"),
        nn.Conv2d(8, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        MetaAconC(16, r=4, impl="fused"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    return net.to(memory_format=torch.channels_last) if channels_last else net


def recording_backend(graphs: list):
    """A torch.compile backend that keeps each traced FX graph and runs it eagerly."""

    def backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def assert_grads_close(want: nn.Module, got: nn.Module) -> None:
    """fp32 gradients equal up to rounding: absolute error relative to the largest gradient (a bias before a
    BatchNorm has a true gradient of 0, so both hold only rounding noise there)."""
    scale = max(p.grad.abs().max().item() for p in want.parameters())
    for (k, a), (_, b) in zip(want.named_parameters(), got.named_parameters(), strict=True):
        torch.testing.assert_close(
            b.grad, a.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, k=k: f"{k}: {m}"
        )


def traced_targets(graphs: list) -> list[str]:
    """The call targets of every node in the graphs and their subgraphs (autograd Function bodies)."""
    return [
        str(n.target)
        for gm in graphs
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for n in sub.graph.nodes
        if n.op == "call_function"
    ]


@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_model_traces_the_formula_with_eager_values_and_gradients(channels_last):
    if not cpu.compile_supported():
        pytest.skip("no C compiler: impl='auto' runs the paper form")
    eager, traced = _net(channels_last), _net(channels_last)
    x = torch.randn(3, 3, 9, 9)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    graphs: list = []
    compiled = torch.compile(traced, backend=recording_backend(graphs), fullgraph=True)
    y_eager, y = eager(x), compiled(x)
    targets = traced_targets(graphs)
    assert graphs and "acon.acon_c.default" not in targets, targets  # no opaque forward op
    assert any("sigmoid" in t for t in targets)  # the formula, visible to Inductor
    assert "acon.acon_c_backward.default" in targets  # backward: the fused kernel
    dy = torch.randn_like(y)
    y_eager.backward(dy)
    y.backward(dy)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    assert_grads_close(eager, traced)
    for (k, a), (_, b) in zip(eager.named_buffers(), traced.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, msg=k)  # BatchNorm running statistics


def _compiled_acon_c(monkeypatch, backend: str) -> dict:
    """The fuzz checks' ``_acon_c`` compiled (impl='fused' only); counts the compiled calls."""
    eager = fuzz_cases._acon_c
    compiled = torch.compile(functools.partial(eager, impl="fused"), backend=backend, dynamic=True)
    calls = {"n": 0}

    def acon_c(x, p1, p2, beta, impl):
        if impl != "fused":
            return eager(x, p1, p2, beta, impl)
        calls["n"] += 1
        return compiled(x, p1, p2, beta)

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    monkeypatch.setattr(fuzz_cases, "_acon_c", acon_c)
    return calls


def fuzz_compiled(monkeypatch, backend: str, picked: list) -> None:
    calls = _compiled_acon_c(monkeypatch, backend)
    for case in picked:
        check_case(case)
    assert calls["n"] == len(picked)


def test_compiled_formula_fuzz_nan_inf_and_accuracy(monkeypatch):
    """Through AOTAutograd (what Inductor receives): the fused ops' NaN/±Inf pattern and accuracy; a few
    cases with NaN/±Inf or extreme magnitudes in the default suite (each new shape or dtype retraces)."""
    picked = [c for c in cases(60) if c.poison and c.dtype == "fp32"][:3]
    fuzz_compiled(monkeypatch, "aot_eager", picked)


@pytest.mark.slow
def test_compiled_formula_fuzz_many(monkeypatch):
    fuzz_compiled(monkeypatch, "aot_eager", cases(60, seed=SEED + 4))


@pytest.mark.slow
def test_compiled_formula_fuzz_inductor(monkeypatch):
    if not cpu.compile_supported():
        pytest.skip("no C compiler for Inductor")
    fuzz_compiled(monkeypatch, "inductor", cases(12, seed=SEED + 3))


@pytest.mark.slow
def test_compiled_model_inductor_matches_eager():
    eager = _net(False)
    traced = copy.deepcopy(eager)
    x = torch.randn(4, 3, 9, 9)
    eager(x).square().sum().backward()
    torch.compile(traced)(x).square().sum().backward()
    assert_grads_close(eager, traced)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_compiled_model_matches_eager_triton(channels_last):
    """On CUDA: Inductor's code for the traced formula against the eager Triton op, values and gradients."""
    eager = _net(channels_last).cuda()
    traced = copy.deepcopy(eager)
    x = torch.randn(4, 3, 9, 9, device="cuda")
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    y_eager, y = eager(x), torch.compile(traced)(x)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    y_eager.square().sum().backward()
    y.square().sum().backward()
    assert_grads_close(eager, traced)


def _traced_everywhere(monkeypatch) -> None:
    """``_acon_c`` (what the modules call) runs ``traced_acon_c`` eagerly, as compiled code would."""
    import acon.fused

    def acon_c(x, p1, p2, beta):
        acon.fused.check_shapes(x, p1, p2, beta)
        return acon.fused.traced_acon_c(x, p1, p2, beta)

    monkeypatch.setattr(acon.fused, "acon_c", acon_c)


def test_traced_backward_is_the_fused_kernels_bit_for_bit(monkeypatch):
    """The traced Function's backward feeds the kernel -x, -p1, -p2 (so the partitioner recomputes x):
    dx, dp1, dp2 and dβ equal the eager fused op's exactly, NaN/±Inf positions included."""
    picked = [c for c in cases(80, dtypes=("fp32", "bf16-autocast")) if c.layout != "strided"][:16]
    assert sum(bool(c.poison) for c in picked) >= 4 and any(c.per_sample for c in picked)
    want = [fuzz_cases.run(c, fuzz_cases.working(c, fuzz_cases.make_inputs(c)), "fused") for c in picked]
    _traced_everywhere(monkeypatch)
    for case, ref in zip(picked, want, strict=True):
        got = fuzz_cases.run(case, fuzz_cases.working(case, fuzz_cases.make_inputs(case)), "fused")
        for name, a, b in zip(fuzz_cases.NAMES[1:], ref[1:], got[1:], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=f"{case}: {name}")


def _partition_backend():
    """``scripts/bench_compile_memory.py``'s backend: Inductor's decompositions and min-cut partitioner."""
    return load_script("bench_compile_memory").partition_backend()


def _block(act) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(8), nn.Conv2d(8, 4, 1)
    ).train()


@pytest.mark.slow
@pytest.mark.parametrize("act", [AconC, functools.partial(MetaAconC, r=4)], ids=["AconC", "MetaAconC"])
def test_compiled_step_keeps_what_relu_keeps(act):
    """Under Inductor's partitioner the BatchNorm output before ACON-C / Meta-ACON is recomputed in
    backward, not saved, although backward reads it through the fused kernel: the saved activations
    equal a ReLU network's up to Meta-ACON's (N, C) β-network tensors."""
    from acon.memory import saved_tensor_bytes

    x = torch.randn(2, 3, 16, 16)
    saved = {}
    for name, make in (("relu", lambda c: nn.ReLU(inplace=True)), ("acon", act)):
        torch._dynamo.reset()
        model = _block(make)
        compiled = torch.compile(model, backend=_partition_backend())
        compiled(x).sum().backward()
        saved[name] = saved_tensor_bytes(model, lambda m=compiled: m(x))
    x_bytes = x.numel() * 8 // 3 * 4  # one (2, 8, 16, 16) fp32 tensor: what keeping x would add
    assert saved["acon"] <= saved["relu"] + x_bytes // 8, saved
