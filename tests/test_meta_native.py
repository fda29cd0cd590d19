"""Meta-ACON-C's one-op path on the C++ kernels (``acon.fused.meta_native``) against the module path with
``impl="reference"``: outputs, the gradients of x, p1, p2 and every β-network parameter, the BatchNorms'
running statistics and ``num_batches_tracked``, layouts, batch 1, eval mode, NaN/Inf, frozen parameters,
retain_graph, determinism, saved memory, and the cases that keep the module path.

Tolerances are ``test_fused``'s (its module test: fp32 rtol 1e-4, atol 1e-5 on y and dx, ten times that on
the parameter gradients; bf16 against the fp32 reference: two bf16 ulps).
"""

from __future__ import annotations

import copy
import platform
import shutil
import subprocess

import pytest
import torch
from test_fused import TOL
from torch import nn

from acon import MetaAconC
from acon.activations import BatchNorm2dB1
from acon.fused import cpu, meta_native, native
from acon.memory import saved_tensor_bytes

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")


@pytest.fixture
def served(monkeypatch):
    """Native mode, and a count of the calls that the one-op path served."""
    cpu.set_mode("native")
    calls = {"n": 0}
    fn = meta_native.meta_acon_c

    def counting(*a, **k):
        calls["n"] += 1
        return fn(*a, **k)

    monkeypatch.setattr(meta_native, "meta_acon_c", counting)
    yield calls
    cpu.set_mode(None)


def _pair(c: int, r: int = 4, configure=None) -> tuple[MetaAconC, MetaAconC]:
    """(reference, auto) modules with the same state; BatchNorm affine parameters and running statistics
    away from their defaults, so a mix-up between them would show. :func:`_compare` runs the reference in
    fp64 on the same (fp32) values, as ``test_fused`` does."""
    torch.manual_seed(0)
    ref = MetaAconC(c, r=r, impl="reference")
    if configure is not None:
        configure(ref)
    with torch.no_grad():
        for bn in (ref.bn1, ref.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            if bn.running_mean is not None:
                bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    fast = copy.deepcopy(ref)
    fast.impl = "auto"
    return ref, fast


def _step(m: nn.Module, x: torch.Tensor, autocast: bool = False):
    m.zero_grad()
    xi = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(xi)
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
    (y.double() * w).sum().backward()
    return y, xi.grad, {k: p.grad for k, p in m.named_parameters() if p.grad is not None}


def _assert_same_state(fast: nn.Module, ref: nn.Module) -> None:
    for (k, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
        if "num_batches_tracked" in k:
            assert torch.equal(a, b), k
        else:
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)


def _assert_grads_close(g: dict, rg: dict, tol: dict) -> None:
    """Parameter gradients within ten times the tolerances, atol relative to the largest one: fc1's and fc2's
    biases feed a training-mode BatchNorm, so their true gradient is 0 and both paths return rounding noise
    of the size of the other gradients' rounding."""
    scale = max(1.0, *(v.abs().max().item() for v in rg.values()))
    for k in g:
        assert g[k].dtype == torch.float32, k
        torch.testing.assert_close(
            g[k].double(), rg[k].double(), rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale, msg=k
        )


def _compare(fast, ref, x, steps: int = 3) -> None:
    tol = TOL[torch.float32]
    ref.double()
    for _ in range(steps):  # repeated: running statistics and num_batches_tracked evolve alike
        (y, dx, g), (ry, rdx, rg) = _step(fast, x), _step(ref, x.double())
        assert y.dtype == dx.dtype == x.dtype and y.stride() == x.stride() and dx.stride() == x.stride()
        torch.testing.assert_close(y.double(), ry, **tol)
        torch.testing.assert_close(dx.double(), rdx, **tol)
        assert g.keys() == rg.keys() and len(g) == 10
        _assert_grads_close(g, rg, tol)
        _assert_same_state(fast, ref)
        x = x * 1.1 + 0.1


# 7×7 and 14×14 (S >= 16 lanes), S below a vector (3×3, 1×1, S = 5), C below and above a vector, 2-D x
SHAPES = [(4, 24, 7, 7), (3, 40, 14, 14), (3, 37, 3, 3), (2, 20, 1, 1), (5, 17, 4, 5), (3, 12, 5)]


@pytest.mark.parametrize(
    "shape,channels_last", [(s, False) for s in SHAPES] + [(s, True) for s in SHAPES if len(s) == 4]
)
def test_matches_reference_module(served, shape, channels_last):
    ref, fast = _pair(shape[1])
    x = torch.randn(shape) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _compare(fast, ref, x)
    assert served["n"] == 3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_one_and_eval(served, training, channels_last):
    """Batch 1 in training mode: the BatchNorms' running-statistics fallback (running statistics and
    num_batches_tracked untouched); eval mode at batch 1 and 4."""
    for n in (1, 4):
        ref, fast = _pair(24)
        ref.train(training), fast.train(training)
        x = torch.randn(n, 24, 7, 7) * 2
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        before = copy.deepcopy(ref.state_dict())
        _compare(fast, ref, x, steps=2)
        if not training or n == 1:
            for k, v in fast.state_dict().items():
                assert torch.equal(v, before[k]), k
    assert served["n"] == 4


def _cumulative(m: MetaAconC) -> None:
    m.bn1.momentum = m.bn2.momentum = None


def _untracked(m: MetaAconC) -> None:
    m.bn1 = BatchNorm2dB1(m.bn1.num_features, track_running_stats=False)
    m.bn2 = BatchNorm2dB1(m.bn2.num_features, track_running_stats=False)


@pytest.mark.parametrize("configure", [_cumulative, _untracked])
@pytest.mark.parametrize("training", [True, False])
def test_cumulative_average_and_untracked_statistics(served, configure, training):
    ref, fast = _pair(20, configure=configure)
    ref.train(training), fast.train(training)
    _compare(fast, ref, torch.randn(3, 20, 6, 6), steps=4)
    assert served["n"] == 4


def test_untracked_statistics_at_batch_one_raise_like_batchnorm(served):
    ref, fast = _pair(8, configure=_untracked)
    for m in (ref, fast):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m(torch.randn(1, 8, 4, 4))


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_under_autocast(served, channels_last):
    """bf16 x through the bf16 kernels (β network in fp32): as close to the fp32 module as the reference
    module under autocast is, or within two bf16 ulps."""
    ref, fast = _pair(24)
    exact = copy.deepcopy(ref)
    x = (torch.randn(3, 24, 7, 7) * 2).to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    (y, dx, g), (ry, rdx, rg), (ey, edx, eg) = (
        _step(fast, x, autocast=True),
        _step(ref, x, autocast=True),
        _step(exact, x.float()),
    )
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16 and y.stride() == x.stride()

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    tol = TOL[torch.bfloat16]
    for got, want, exp in ((y, ry, ey), (dx, rdx, edx)):
        assert err(got, exp) <= max(1.5 * err(want, exp), tol["atol"] + tol["rtol"] * exp.abs().max().item())
    for k in g:
        scale = eg[k].abs().max().item()
        assert g[k].dtype == torch.float32
        assert err(g[k], eg[k]) <= 1.5 * err(rg[k], eg[k]) + 1e-2 * scale, k
    assert served["n"] == 1


def test_nan_and_inf_propagate_like_the_reference(served):
    ref, fast = _pair(20)
    x = torch.randn(3, 20, 5, 5)
    x[0, 3, 1, 1], x[2, 7, 0, 0] = float("nan"), float("inf")
    for bad in (x, torch.where(x.isnan(), torch.zeros_like(x), x)):  # NaN and Inf; Inf alone
        (y, dx, g), (ry, rdx, rg) = _step(fast, bad), _step(ref, bad)
        for got, want in ((y, ry), (dx, rdx), *((g[k], rg[k]) for k in g)):
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        _assert_same_state(fast, ref)
    assert served["n"] == 2


def test_parameters_without_grad_and_inputs_without_grad(served):
    ref, fast = _pair(16)
    for m in (ref, fast):
        m.p1.requires_grad_(False), m.fc1.weight.requires_grad_(False), m.bn2.bias.requires_grad_(False)
    x = torch.randn(4, 16, 6, 6)
    (_, dx, g), (_, rdx, rg) = _step(fast, x), _step(ref.double(), x.double())
    assert g.keys() == rg.keys() and "p1" not in g and "fc1.weight" not in g and "bn2.bias" not in g
    _assert_grads_close(g, rg, TOL[torch.float32])
    torch.testing.assert_close(dx.double(), rdx, **TOL[torch.float32])
    fast.zero_grad()
    fast(x).sum().backward()  # x itself needs no gradient: the parameters still get theirs
    assert fast.fc2.weight.grad is not None and fast.p2.grad is not None
    assert served["n"] == 2


def test_retain_graph_and_double_backward(served):
    ref, fast = _pair(16)
    x = torch.randn(4, 16, 6, 6)
    grads = []
    for m in (fast, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.sum().backward(retain_graph=True)
        y.sum().backward()  # the saved buffer is read, never written, by backward: the same gradient twice
        grads.append((xi.grad, m.fc1.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    xi = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fast(xi).square().sum(), xi, create_graph=True)
    with pytest.raises(RuntimeError):  # once differentiable: a second derivative is refused, not wrong
        torch.autograd.grad(gx.sum(), xi)


def test_deterministic_and_independent_of_thread_count(served):
    """Bit-identical reruns; y (the mean, β network and ACON-C forward) the same at 1 and 3 threads; at 3
    threads the gradients and running statistics match the reference too."""
    ref, fast = _pair(40)
    fast.eval()  # running statistics fixed between the calls
    threads = torch.get_num_threads()
    try:
        for cl in (False, True):
            x = torch.randn(5, 40, 9, 9)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            torch.set_num_threads(1)
            one = _step(fast, x)
            assert all(torch.equal(a, b) for a, b in zip(one[:2], _step(fast, x)[:2], strict=True))
            torch.set_num_threads(3)
            assert torch.equal(fast(x), one[0])
            ref3, fast3 = _pair(40)  # and the whole op at 3 threads against the reference
            _compare(fast3, ref3, x, steps=2)
    finally:
        torch.set_num_threads(threads)


def test_saves_x_and_a_small_buffer(served):
    m = MetaAconC(64)
    x = torch.randn(8, 64, 14, 14, requires_grad=True)
    saved = saved_tensor_bytes(m, lambda: m(x))
    assert saved <= 1.02 * x.numel() * x.element_size()


def test_other_cases_keep_the_module_path(served, monkeypatch):
    """fp64, hooks on a β-network BatchNorm, a swapped BatchNorm, impl="reference": the module path."""
    monkeypatch.setattr(cpu, "_COMPILE_OK", False)  # fp64: the eager formulas, no Inductor compile here
    m = MetaAconC(8, r=2)
    m(torch.randn(3, 8, 5, 5, dtype=torch.float64).float())
    assert served["n"] == 1
    m.double()(torch.randn(3, 8, 5, 5, dtype=torch.float64))
    m.float()
    handle = m.bn1.register_forward_hook(lambda *a: None)
    m(torch.randn(3, 8, 5, 5))
    handle.remove()
    swapped = MetaAconC(8, r=2)
    swapped.bn2 = nn.BatchNorm2d(8)
    swapped(torch.randn(3, 8, 5, 5))
    MetaAconC(8, r=2, impl="reference")(torch.randn(3, 8, 5, 5))
    assert served["n"] == 1


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector-width flags")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx"])
def test_narrower_vector_builds(served, monkeypatch, tmp_path, flags):
    """Rebuilt at 8 (AVX2) and 4 (SSE) lanes: the padded rows, the two-row dot products and the row sums
    at every width the source supports."""
    monkeypatch.setenv("ACON_KERNEL_CFLAGS", flags)
    monkeypatch.setenv("ACON_KERNEL_CACHE", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.available()
        for shape, cl in [
            ((4, 24, 7, 7), False),
            ((3, 37, 3, 3), True),
            ((5, 17, 4, 5), False),
            ((3, 12, 5), False),
        ]:
            ref, fast = _pair(shape[1])
            x = torch.randn(shape) * 2
            _compare(fast, ref, x.to(memory_format=torch.channels_last) if cl else x, steps=2)
    finally:
        native.library.cache_clear()
    assert served["n"] == 8


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_module(served, channels_last):
    """A bf16 module (parameters and running statistics bf16) on bf16 x: the β network runs in fp32 on the
    parameters' values, the running statistics are written back in bf16 and the gradients come back in bf16;
    against the reference module in fp64 on the same bf16 values, within two bf16 ulps."""
    ref, fast = _pair(24)
    fast.bfloat16()
    ref.load_state_dict(fast.state_dict())
    ref.double()
    x = (torch.randn(4, 24, 7, 7) * 2).to(torch.bfloat16)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    tol = TOL[torch.bfloat16]
    for _ in range(2):
        (y, dx, g), (ry, rdx, rg) = _step(fast, x), _step(ref, x.double())
        assert y.dtype == dx.dtype == torch.bfloat16 and y.stride() == x.stride()
        torch.testing.assert_close(y.double(), ry, **tol)
        torch.testing.assert_close(
            dx.double(), rdx, rtol=tol["rtol"], atol=tol["atol"] * rdx.abs().max().item()
        )
        scale = max(1.0, *(v.abs().max().item() for v in rg.values()))
        for k in g:
            assert g[k].dtype == torch.bfloat16, k
            torch.testing.assert_close(
                g[k].double(), rg[k], rtol=tol["rtol"], atol=tol["atol"] * scale, msg=k
            )
        for (k, a), b in zip(fast.state_dict().items(), ref.state_dict().values(), strict=True):
            assert a.dtype == (torch.int64 if "num_batches" in k else torch.bfloat16), k
            torch.testing.assert_close(a.double(), b.double(), rtol=tol["rtol"], atol=tol["atol"], msg=k)
    assert served["n"] == 2


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_acon_c_per_chunk_math_stays_inlined():
    """The ACON-C kernels' per-chunk math is inlined into their row loops in the one translation unit that
    also holds meta_rows.h: GCC caps the unit's inlining growth, and past the cap these became calls (the
    ACON-C backward kernel 15% slower)."""
    out = subprocess.run(["nm", "-C", str(native.build())], capture_output=True, text=True, check=True).stdout
    called = {name for name in ("bwd_math", "fwd_math", "vexp_neg", "vsigmoid") if f"::{name}(" in out}
    assert not called, f"out of line in {native.build().name}: {sorted(called)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(4, 24, 7, 7), (3, 40, 14, 14), (1, 24, 5, 5)])
def test_bn_fused_pair_runs_this_beta_network(served, monkeypatch, dtype, shape):
    """The BatchNorm+Meta-ACON op (``fuse_bn_acon``) runs the β network on its spatial means through the same
    C++ code (``NativeBetaNet``): values, every gradient and the running statistics against the two modules
    in fp64 on the same values (fp32: the fused-op tolerances; a bf16 model: two bf16 ulps, four on dx)."""
    from acon import fuse_bn_acon

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        fn = getattr(meta_native.NativeBetaNet, name)

        def counting(self, t, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(self, t)

        monkeypatch.setattr(meta_native.NativeBetaNet, name, counting)
    ref_act, _ = _pair(shape[1])
    ref = nn.Sequential(nn.BatchNorm2d(shape[1]), ref_act)
    with torch.no_grad():
        ref[0].weight.uniform_(0.5, 1.5), ref[0].bias.uniform_(-0.5, 0.5)
    fast = copy.deepcopy(ref).to(dtype)
    fast[1].impl = "auto"
    fused = fuse_bn_acon(fast)
    assert type(fused[1]).__name__ == "FusedBNMetaAconC"
    ref.load_state_dict(fused.state_dict())
    ref.double()
    x = (torch.randn(shape) * 2 + 0.5).to(dtype)
    tol = TOL[dtype]
    for _ in range(2):
        (y, dx, g), (ry, rdx, rg) = _step(fused, x), _step(ref, x.double())
        torch.testing.assert_close(y.double(), ry, rtol=tol["rtol"], atol=tol["atol"] * ry.abs().max().item())
        dz_rounding = 2 if dtype == torch.bfloat16 else 1  # the op keeps dz in x's dtype between its passes
        atol = tol["atol"] * dz_rounding * rdx.abs().max().item()
        torch.testing.assert_close(dx.double(), rdx, rtol=tol["rtol"] * dz_rounding, atol=atol)
        scale = max(1.0, *(v.abs().max().item() for v in rg.values()))
        many = 10 if dtype == torch.float32 else 1  # _assert_grads_close's factor for fp32
        assert g.keys() == rg.keys() and len(g) == 12
        for k in g:
            assert g[k].dtype == dtype, k
            torch.testing.assert_close(
                g[k].double(), rg[k], rtol=tol["rtol"] * many, atol=tol["atol"] * many * scale, msg=k
            )
        for (k, a), b in zip(fused.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol["rtol"], atol=tol["atol"], msg=k)
    assert calls == {"forward": 2, "backward": 2}
