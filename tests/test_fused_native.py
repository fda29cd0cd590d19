"""The C++ CPU kernels of ``acon.fused.native`` (the CPU default) against the paper-form reference.

Same tolerances as ``test_fused`` (see its docstring). The kernels are also built at narrower vector
widths (AVX2: 8 lanes, SSE: 4 lanes) so the row-crossing and short-row paths are exercised at every
width the source supports, not just this machine's.
"""

from __future__ import annotations

import platform

import pytest
import test_fused
import torch
from test_fused import check_against_reference

import acon.fused
from acon import AconC, MetaAconC
from acon.functional import acon_c_reference
from acon.fused import cpu, native

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")

# S = H·W below, at and above one vector (4/8/16 lanes), rows crossing chunk boundaries, C = 1, H·W = 1,
# C above and below the vector width for channels-last; rows of whole vectors plus a tail of 1 or 2 values
# (the aligned walker: 7×7, 3×6 and 33×17 at 16 lanes), with groups of rows that cross a sample's end.
SHAPES = [
    (2, 5, 3, 4),
    (2, 1, 3, 5),
    (3, 7, 1, 1),
    (1, 3, 33, 17),
    (4, 6),
    (2, 6, 7),
    (3, 5, 7, 7),
    (2, 3, 4, 4),
    (2, 20, 5, 4),
    (2, 37, 3, 3),
    (5, 17, 4, 5),
    (3, 20, 3, 6),
    (2, 37, 7, 7),
]


@pytest.fixture
def native_mode():
    cpu.set_mode("native")
    yield
    cpu.set_mode(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_native_matches_reference(native_mode, counted, dtype, shape, per_sample):
    check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last=False)
    if len(shape) == 4:
        check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last=True)
    assert counted["forward"] >= 1 and counted["backward"] >= 1


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_any_thread_count_and_batch_one(native_mode, counted, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 5, 7, 7), (1, 40, 5, 5), (3, 5, 7, 7)]:
            for cl in (False, True):
                check_against_reference(acon.fused.acon_c, shape, torch.float32, True, cl)
    finally:
        torch.set_num_threads(old)
    assert counted["backward"] == 6


def test_fp64_uses_the_torch_formulas(native_mode, counted, monkeypatch):
    monkeypatch.setattr(cpu, "_COMPILE_OK", False)  # the eager formulas: no Inductor compile in this test
    check_against_reference(acon.fused.acon_c, (2, 5, 7, 7), torch.float64, False, False)
    assert counted == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("hw", [(5, 5), (7, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_propagate_like_the_reference(native_mode, dtype, hw):
    """Special values inside rows and in the last value of a row (at 7×7 the tail the aligned walker
    gathers across rows) come out as the reference's, and the rows around them stay finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 20, *hw, generator=g)
    h, w = hw[0] - 1, hw[1] - 1
    x[0, 3, 1, 1], x[1, 4, 2, 2], x[1, 5, 0, 0], x[0, 6, 0, 0] = (
        float("nan"),
        float("inf"),
        -float("inf"),
        1e30,
    )
    # channels 4 and 5 hold ±inf where the paper form gives them too (elsewhere it can give NaN for ±inf·σ)
    x[0, 8, h, w], x[1, 9, h, w] = float("nan"), -1e30
    x[0, 4, h, w], x[0, 5, h, w] = float("inf"), -float("inf")
    x[0, 7, 2, 2] = 1e30 if dtype == torch.float32 else 3e38  # large but finite in both dtypes
    x = x.to(dtype)
    p1, p2, beta = (torch.randn(1, 20, 1, 1, generator=g) for _ in range(3))
    # |p1 - p2|, |p2| <= 1: channel 7's fp32 intermediates stay finite at x = 3e38
    p1[0, 7], p2[0, 7] = 0.75, -0.25
    y = acon.fused.acon_c(x, p1, p2, beta)
    assert y[:, 10:17].isfinite().all()
    ref = acon_c_reference(x.double(), p1.double(), p2.double(), beta.double()).to(dtype)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    fin = ref.isfinite()
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(y[fin].double(), ref[fin].double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("hw", [(5, 5), (7, 7)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_beta_gradient_where_x_squared_overflows(native_mode, per_sample, hw):
    """The contiguous backward sums x·x·σ'(z) terms, scaled by d² afterwards; where those overflow but the
    reference's (d·x)² terms do not (p1 = p2, or a small d, with |x| ~ 1e20), dβ is still the reference's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64) * 1e20
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    p1, p2 = (torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64) for _ in range(2))
    p2[0, 0] = p1[0, 0]  # d = 0: dβ is exactly 0
    p2[0, 1] = p1[0, 1] - 1e-19  # d·x ~ 10: finite terms in the reference
    beta = torch.ones(2 if per_sample else 1, 3, 1, 1, dtype=torch.float64)
    grads = []
    for fn, dtype in ((acon.fused.acon_c, torch.float32), (acon_c_reference, torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x, p1, p2, beta)]
        fn(*leaves).backward(dy.to(dtype))
        grads.append(leaves[3].grad.double())
    fused, ref = grads
    assert ref[:, :2].isfinite().all() and fused[:, :2].isfinite().all(), fused
    assert (fused[:, 0] == 0).all()
    torch.testing.assert_close(fused[:, 1], ref[:, 1], rtol=1e-4, atol=0)


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (7, 7), (3, 6)])
def test_short_rows_at_any_thread_count(native_mode, counted, hw):
    """Short rows (16-63 values) cross chunk boundaries (5×7: the row walker blends two rows' parameters and
    splits their sums) or end in a tail of 1-2 values run with other rows' tails (7×7, 3×6: the aligned
    walker); the rows are split into blocks by the thread count. At 1, 2 and 3 threads the gradients repeat
    bit for bit, run after run, and match the reference (the module's gradients against the paper form in
    fp64); where the aligned walker runs, they are also the same bit for bit whatever the thread count (the
    row walker's chunks start at each block's first row, so its sums follow the blocks)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, *hw, generator=g)
    dy = torch.randn(x.shape, generator=g)
    m, ref = AconC(37, impl="fused"), AconC(37, impl="reference").double()
    ref.load_state_dict(m.state_dict())
    xr = x.double().requires_grad_()
    ref(xr).backward(dy.double())
    want = [xr.grad] + [p.grad for p in ref.parameters()]
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for _ in range(2):
                m.zero_grad()
                xi = x.clone().requires_grad_()
                m(xi).backward(dy)
                runs.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
    finally:
        torch.set_num_threads(old)
    aligned = native.aligned_rows(hw[0] * hw[1], torch.float32, backward=True)
    for i, run in enumerate(runs):
        for a, b in zip(run, runs[0 if aligned else i - i % 2], strict=True):
            assert torch.equal(a, b)
    for a, w in zip(runs[0], want, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-4)
    assert counted["backward"] == 6


def test_backward_is_bit_deterministic(native_mode):
    torch.manual_seed(0)
    for cl in (False, True):
        m = MetaAconC(24, impl="fused")
        x = torch.randn(4, 24, 9, 9)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        grads = []
        for _ in range(2):
            m.zero_grad()
            xi = x.clone().requires_grad_()
            m(xi).square().sum().backward()
            grads.append([xi.grad.clone()] + [p.grad.clone() for p in m.parameters()])
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)


def test_modules_use_the_native_kernels_by_default(counted):
    assert cpu.mode() == "native"
    for m in (AconC(16, impl="auto"), MetaAconC(16, impl="auto")):
        x = torch.randn(8, 16, 16, 16, requires_grad=True)
        m(x).sum().backward()
    assert counted == {"forward": 2, "backward": 2}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector-width flags")
@pytest.mark.parametrize("flags", ["-mno-avx512f", "-mno-avx"])
def test_narrower_vector_builds_match_reference(native_mode, counted, monkeypatch, flags):
    """Rebuild at 8 (AVX2) and 4 (SSE) lanes and rerun the shape matrix in fp32 and bf16, and a 7×7 backward
    (the aligned walker's at these widths) at 1 and 3 threads, the same bit for bit. The builds go to the
    shared kernel cache (keyed by the flags), where the fuzz tests' builds at these widths find them."""
    monkeypatch.setenv("ACON_KERNEL_CFLAGS", flags)
    native.library.cache_clear()
    threads = torch.get_num_threads()
    try:
        assert native.available()
        assert native.vector_width() == {"-mno-avx512f": 8, "-mno-avx": 4}[flags]
        assert native.aligned_rows(49, torch.float32, backward=True)
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                check_against_reference(acon.fused.acon_c, shape, dtype, True, channels_last=len(shape) == 4)
        g = torch.Generator().manual_seed(0)
        x, dy = torch.randn(5, 37, 7, 7, generator=g), torch.randn(5, 37, 7, 7, generator=g)
        m, grads = AconC(37, impl="fused"), []
        for n in (1, 3):
            torch.set_num_threads(n)
            m.zero_grad()
            xi = x.clone().requires_grad_()
            m(xi).backward(dy)
            grads.append([xi.grad] + [p.grad.clone() for p in m.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    finally:
        torch.set_num_threads(threads)
        native.library.cache_clear()
    assert counted["backward"] == 2 * len(SHAPES) + 2


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("ACON_KERNEL_CACHE", str(tmp_path))
    first = native.build()
    mtime = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == mtime  # no rebuild
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path, counted):
    """A compiler that fails: one warning, then the Inductor/eager formulas serve the same calls."""
    monkeypatch.setenv("ACON_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(native, "compiler", lambda: "/bin/false")
    native.library.cache_clear()
    cpu.set_mode("native")
    try:
        with pytest.warns(UserWarning, match="C\\+\\+ CPU kernels unavailable"):
            assert not native.available()
        cpu.set_mode("eager")  # keep this test free of Inductor compiles; the fallback order is checked below
        check_against_reference(acon.fused.acon_c, (2, 5, 7, 7), torch.float32, False, False)
        cpu.set_mode("native")
        assert cpu.execution(torch.empty(2, 3, 4)) in ("compiled", "eager")
    finally:
        cpu.set_mode(None)
        native.library.cache_clear()
    assert counted == {"forward": 0, "backward": 0}


# The module-level checks of test_fused (eager formulas there), rerun on the C++ kernels.
@pytest.mark.parametrize("cls,kw", [(AconC, {}), (MetaAconC, {"r": 4})])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_native_modules_match_reference(native_mode, counted, cls, kw, channels_last, batch):
    test_fused.test_module_fused_matches_reference(None, cls, kw, torch.float32, channels_last, batch)
    assert counted["backward"] >= 1


@pytest.mark.parametrize("cls,kw", [(AconC, {}), (MetaAconC, {"r": 4})])
def test_native_modules_under_bf16_autocast(native_mode, counted, cls, kw):
    test_fused.test_module_under_bf16_autocast(None, cls, kw)
    assert counted["backward"] >= 1


def test_native_under_ddp(native_mode, counted, tmp_path):
    test_fused.test_ddp_single_process(None, tmp_path)
    assert counted["backward"] >= 2


@pytest.mark.parametrize("fullgraph", [False, True])
def test_whole_model_torch_compile_traces_the_formula(native_mode, counted, fullgraph):
    """The modules give traced code the plain formula in forward (for Inductor to fuse), not the opaque C++
    kernel; backward runs the C++ backward kernel (``acon.fused.traced``), once per ACON layer."""
    test_fused.test_whole_model_torch_compile(None, fullgraph)
    assert counted == {"forward": 0, "backward": 2}


def test_custom_op_called_in_traced_code_runs_the_kernels(native_mode, counted):
    """``acon::acon_c`` called directly stays usable in traced code, on the same C++ kernels at run time."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    p1, p2, beta = (torch.randn(1, 8, 1, 1, requires_grad=True) for _ in range(3))
    y = torch.compile(acon.fused.acon_c_op, backend="aot_eager", fullgraph=True)(x, p1, p2, beta)
    got = torch.autograd.grad(y.square().sum(), (x, p1, p2, beta))
    want = torch.autograd.grad(acon_c_reference(x, p1, p2, beta).square().sum(), (x, p1, p2, beta))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert counted["forward"] >= 1 and counted["backward"] >= 1
