"""Fused ACON-C (``acon.fused``) against the paper-form reference: outputs, every gradient, layouts, odd
shapes, modules, autocast, torch.compile, DDP and saved-for-backward memory.

Tolerances. The fused path computes in fp32 (fp64 for fp64 input), so each case is compared with the
reference evaluated in fp64 on the *same* (already rounded) inputs:
- fp64: rtol 1e-10, atol 1e-12;
- fp32: rtol 1e-4, atol 1e-5 (elementwise); per-channel sums are compared relative to the sum of
  absolute terms (``_close_sum``), since their rounding grows with the number of terms;
- bf16: outputs and dx are rounded once to bf16, so rtol 1.6e-2 (two bf16 ulps), atol 1e-2; the
  per-channel sums are accumulated in fp32 and returned in bf16: rtol 1.6e-2 of the absolute-term sum.
The wide matrix runs the eager execution of the fused formulas; the Inductor-compiled execution (the CPU
default) is checked on a smaller matrix since each variant costs a kernel compile.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import acon.fused
from acon import AconC, MetaAconC
from acon.functional import acon_c_reference
from acon.fused import cpu

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
SHAPES = [(2, 5, 3, 4), (2, 1, 3, 5), (3, 7, 1, 1), (1, 3, 33, 17), (4, 6), (2, 6, 7)]


@pytest.fixture
def eager_mode():
    cpu.set_mode("eager")
    yield
    cpu.set_mode(None)


def _inputs(shape, dtype, per_sample, channels_last, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    pshape = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    p1 = torch.randn(pshape, generator=g, dtype=torch.float64)
    p2 = torch.randn(pshape, generator=g, dtype=torch.float64)
    beta = torch.rand(((n,) if per_sample else (1,)) + pshape[1:], generator=g, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return [t.to(device, dtype) for t in (x, p1, p2, beta, dy)]


def _run(fn, x, p1, p2, beta, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def _close_sum(got, want, terms, rtol):
    """Compare reduced gradients relative to the sum of the absolute values of their terms."""
    err = (got.double() - want).abs()
    assert (err <= rtol * terms + 1e-12).all(), f"max err {err.max().item()} vs scale {terms.max().item()}"


def check_against_reference(fn, shape, dtype, per_sample, channels_last, device="cpu"):
    """Assert ``fn`` matches ``acon_c_reference`` (in fp64) in output and all four gradients."""
    x, p1, p2, beta, dy = _inputs(shape, dtype, per_sample, channels_last, device=device)
    y, (dx, dp1, dp2, db) = _run(fn, x, p1, p2, beta, dy)
    ref_in = [t.double() for t in (x, p1, p2, beta, dy)]
    ry, (rdx, rdp1, rdp2, rdb) = _run(acon_c_reference, *ref_in)
    tol = TOL[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "output must keep x's memory format"
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(dx.double(), rdx, **tol)
    # scale of each reduced gradient: Σ|dy·x| bounds the terms of dp1, dp2; Σ|dy·u²/4| those of dβ
    xd, dyd = ref_in[0], ref_in[4]
    red = [0] + list(range(2, x.dim()))
    terms = (dyd * xd).abs().sum(red, keepdim=True) * 2 + 1e-3
    u = (ref_in[1] - ref_in[2]) * xd
    bterms = (dyd * u * u).abs().sum(list(range(2, x.dim())), keepdim=True) + 1e-3
    if not per_sample:
        bterms = bterms.sum(0, keepdim=True)
    rtol = max(tol["rtol"], 1e-6) if dtype != torch.float64 else 1e-10
    for got, want, scale in ((dp1, rdp1, terms), (dp2, rdp2, terms), (db, rdb, bterms)):
        assert got.shape == want.shape and got.dtype == dtype
        _close_sum(got, want, scale, rtol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_eager_matches_reference(eager_mode, dtype, shape, per_sample):
    check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last=False)
    if len(shape) == 4:
        check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last=True)


@pytest.mark.parametrize(
    "dtype,channels_last",
    [
        (torch.float32, False),
        pytest.param(torch.float32, True, marks=pytest.mark.slow),
        pytest.param(torch.bfloat16, False, marks=pytest.mark.slow),
        pytest.param(torch.bfloat16, True, marks=pytest.mark.slow),
    ],
)
def test_compiled_cpu_matches_reference(dtype, channels_last):
    """The CPU default: Inductor-compiled formulas (one variant by default, each costs a compile)."""
    if not cpu.compile_supported():
        pytest.skip("no C compiler for torch.compile")
    cpu.set_mode("compiled")
    try:
        for shape in [(2, 5, 3, 4), (1, 3, 33, 17), (3, 7, 1, 1)]:
            check_against_reference(acon.fused.acon_c, shape, dtype, False, channels_last)
    finally:
        cpu.set_mode(None)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_compiled_cpu_matches_reference_full(dtype, shape):
    cpu.set_mode("compiled")
    try:
        for per_sample in (False, True):
            for cl in (False, True) if len(shape) == 4 else (False,):
                check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, cl)
    finally:
        cpu.set_mode(None)


def test_non_dense_input_is_accepted(eager_mode):
    x, p1, p2, beta, _ = _inputs((2, 4, 6, 5), torch.float64, False, False)
    xt = x.transpose(2, 3)  # neither contiguous nor channels_last
    torch.testing.assert_close(acon.fused.acon_c(xt, p1, p2, beta), acon_c_reference(xt, p1, p2, beta))


def test_backward_is_deterministic(eager_mode):
    x, p1, p2, beta, dy = _inputs((4, 8, 9, 9), torch.float32, True, True)
    a = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    b = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    for ga, gb in zip(a, b, strict=True):
        assert torch.equal(ga, gb)


def _saved_bytes(fn, *args):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


@pytest.mark.parametrize("per_sample", [False, True])
def test_saves_only_input_and_small_params(eager_mode, per_sample):
    x, p1, p2, beta, _ = _inputs((4, 16, 10, 10), torch.float32, per_sample, False)
    leaves = [t.requires_grad_() for t in (x, p1, p2, beta)]
    fused = _saved_bytes(acon.fused.acon_c, *leaves)
    ref = _saved_bytes(acon_c_reference, *leaves)
    small = sum(t.numel() * t.element_size() for t in leaves[1:])
    assert fused <= x.numel() * x.element_size() + small
    assert ref >= 2 * x.numel() * x.element_size()  # the paper form keeps full-size temporaries


def _module_pair(cls, dtype, channels_last, **kw):
    torch.manual_seed(0)
    ref = cls(12, impl="reference", **kw).to(dtype)
    if isinstance(getattr(ref, "beta", None), nn.Parameter):
        with torch.no_grad():
            ref.beta.uniform_(0.2, 2.0)
    fused = copy.deepcopy(ref)
    fused.impl = "fused"
    return ref, fused


@pytest.mark.parametrize("cls,kw", [(AconC, {}), (MetaAconC, {"r": 4})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_module_fused_matches_reference(eager_mode, cls, kw, dtype, channels_last, batch):
    ref, fused = _module_pair(cls, dtype, channels_last, **kw)
    x = torch.randn(batch, 12, 5, 7, dtype=dtype) * 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    outs = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
        outs.append((y, xi.grad, {k: p.grad for k, p in m.named_parameters()}))
    tol = TOL[dtype]
    torch.testing.assert_close(outs[1][0], outs[0][0], **tol)
    assert outs[1][0].is_contiguous(memory_format=torch.channels_last) == channels_last or x.is_contiguous()
    torch.testing.assert_close(outs[1][1], outs[0][1], **tol)
    names = set(outs[0][2])
    assert names == set(outs[1][2]) and {"p1", "p2"} <= names
    if cls is MetaAconC:
        assert {"fc1.weight", "fc2.weight", "bn1.weight", "bn2.weight"} <= names
    for k in names:
        torch.testing.assert_close(outs[1][2][k], outs[0][2][k], rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@pytest.mark.parametrize("cls,kw", [(AconC, {}), (MetaAconC, {"r": 4})])
def test_module_under_bf16_autocast(eager_mode, cls, kw):
    """Under bf16 autocast the fused module is no less accurate than the reference module (both vs fp32)."""
    ref, fused = _module_pair(cls, torch.float32, False, **kw)
    exact = copy.deepcopy(ref)
    x = torch.randn(2, 12, 6, 6).to(torch.bfloat16)
    outs = []
    for m, autocast in ((exact, False), (ref, True), (fused, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x if autocast else x.float())
        y.float().square().sum().backward()
        outs.append((y, {k: p.grad for k, p in m.named_parameters()}))
    assert outs[2][0].dtype == torch.bfloat16
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(outs[2][0], outs[0][0]) <= 1.5 * err(outs[1][0], outs[0][0]) + 1e-2
    for k, g in outs[2][1].items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        scale = outs[0][1][k].abs().max().item()
        assert err(g, outs[0][1][k]) <= 1.5 * err(outs[1][1][k], outs[0][1][k]) + 1e-2 * scale, k


def _tiny_net(impl):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        AconC(8, impl=impl),
        nn.Conv2d(8, 8, 1),
        MetaAconC(8, r=4, impl=impl),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("fullgraph", [False, True])
def test_whole_model_torch_compile(eager_mode, fullgraph):
    ref, fused = _tiny_net("reference"), _tiny_net("fused")
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=fullgraph)
    x = torch.randn(2, 3, 8, 8)
    ref(x).sum().backward()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    for (k, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_whole_model_torch_compile_auto_fullgraph(monkeypatch):
    """impl='auto' is decided inside the traced graph without a break (no filesystem probes, no caches)."""
    if not cpu.compile_supported():
        pytest.skip("no C compiler for torch.compile")
    monkeypatch.setattr(acon.fused, "AUTO_MIN_NUMEL_CPU", 0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), AconC(8, impl="auto"))
    ref = copy.deepcopy(net)
    ref[1].impl = "reference"
    x = torch.randn(2, 3, 8, 8)
    assert acon.fused.available(x, "auto")
    y = torch.compile(net, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    ref(x).square().sum().backward()
    for (k, a), (_, b) in zip(ref.named_parameters(), net.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_whole_model_torch_compile_inductor():
    ref, fused = _tiny_net("reference"), _tiny_net("fused")
    x = torch.randn(2, 3, 8, 8)
    ref(x).sum().backward()
    torch.compile(fused)(x).sum().backward()
    for (k, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_single_process(eager_mode, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ref, fused = _tiny_net("reference"), _tiny_net("fused")
        ddp = nn.parallel.DistributedDataParallel(fused)
        x = torch.randn(2, 3, 8, 8)
        ref(x).sum().backward()
        ddp(x).sum().backward()
        for (k, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=k)
    finally:
        dist.destroy_process_group()


def test_available_contract():
    x = torch.randn(2, 3, 4, 4)
    assert acon.fused.available(x, "reference") is False
    assert acon.fused.available(x, "fused") is True
    # the C++ kernels serve any size; with Inductor's formulas tiny tensors keep the reference form
    assert acon.fused.available(x, "auto") is (cpu.mode() == "native")
    cpu.set_mode("compiled")
    try:
        assert acon.fused.available(x, "auto") is False
    finally:
        cpu.set_mode(None)
    big = torch.empty(2, 64, 32, 32)
    assert acon.fused.available(big, "auto") == (cpu.mode() in ("native", "compiled"))
    assert acon.fused.available(big.int(), "auto") is False
    # dtypes the C++ kernels do not serve run Inductor's formulas: a tiny one keeps the reference form (its
    # first call no longer compiles for 5-15 s), a large one takes them
    for dtype in (torch.float64, torch.float16):
        assert acon.fused.available(x.to(dtype), "auto") is False
        assert acon.fused.available(big.to(dtype), "auto") == (cpu.mode() in ("native", "compiled"))
    with pytest.raises(TypeError, match="floating-point"):
        acon.fused.available(big.int(), "fused")
    with pytest.raises(RuntimeError, match="no fused ACON-C path for device 'meta'"):
        acon.fused.available(torch.empty(2, 3, device="meta"), "fused")
    with pytest.raises(ValueError, match="impl='triton'"):
        acon.fused.available(x, "triton")


def test_bad_parameter_shapes_name_the_argument():
    x = torch.randn(2, 3, 4, 4)
    ok = torch.ones(1, 3, 1, 1)
    with pytest.raises(ValueError, match="p2 must be"):
        acon.fused.acon_c(x, ok, torch.ones(1, 4, 1, 1), ok)
    with pytest.raises(ValueError, match="beta must be"):
        acon.fused.acon_c(x, ok, ok, torch.ones(5, 3, 1, 1))
    with pytest.raises(ValueError, match=r"x must be \(N, C, ...\)"):
        acon.fused.acon_c(torch.randn(3), ok, ok, ok)


# ---- CUDA (Triton kernels); run by scripts/gpu_check.sh with `pytest -m gpu` -------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernels_match_reference(dtype, per_sample, channels_last):
    assert acon.fused.available(torch.empty(1, 1, device="cuda"), "auto")
    TOL.setdefault(torch.float16, dict(rtol=2e-3, atol=1e-3))
    for shape in [(2, 5, 3, 4), (2, 1, 3, 5), (3, 7, 1, 1), (1, 3, 33, 17), (8, 300, 56, 56), (4, 6)]:
        if channels_last and len(shape) != 4:
            continue
        check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last, device="cuda")


@pytest.mark.gpu
@cuda
def test_cuda_backward_bitwise_deterministic():
    x, p1, p2, beta, dy = _inputs((16, 232, 28, 28), torch.bfloat16, True, True, device="cuda")
    a = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    b = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    assert all(torch.equal(ga, gb) for ga, gb in zip(a, b, strict=True))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("cls,kw", [(AconC, {}), (MetaAconC, {"r": 4})])
def test_cuda_module_and_whole_model_compile(cls, kw):
    ref, fused = _module_pair(cls, torch.float32, False, **kw)
    ref, fused = ref.cuda(), fused.cuda()
    x = torch.randn(3, 12, 9, 9, device="cuda")
    ref(x).square().sum().backward()
    torch.compile(fused)(x).square().sum().backward()
    for (k, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4, msg=k)
