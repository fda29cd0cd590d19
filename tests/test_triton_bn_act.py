"""The fused BatchNorm → ACON-C / Meta-ACON op on its Triton kernels (``acon.fused.triton_bn_act``).

Without a GPU the kernels run on CPU tensors in the Triton interpreter: the ``inner`` tests run in a subprocess
with ``TRITON_INTERPRET=1 ACON_FUSED_CPU_BACKEND=triton`` (the interpreter must be on before ``triton`` is
imported). The interpreter is slow: the tests not marked slow run in the process that
``tests/test_triton_interpret.py`` starts for the ACON-C kernels, and the launcher below runs the rest
(``-m slow``). The CUDA tests
are in ``tests/test_triton_bn_cuda.py``. Tolerances are those of ``tests/test_fused_bn_acon.py`` (fp64, fp32) and of the
kernels' self-check (``acon.fused.selfcheck.TOLERANCE``: bf16, fp16).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from acon import AconC, MetaAconC, fallbacks, fuse_bn_acon
from acon.functional import acon_c_reference
from acon.fused import bn_act, selfcheck
from tests.test_fused_bn_acon import close, grads_close, pair, step_both

INTERPRETING = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
)
ROOT = Path(__file__).resolve().parents[1]
inner = pytest.mark.skipif(not INTERPRETING, reason="runs inside the TRITON_INTERPRET=1 subprocess")


def _interpret(marker: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", ACON_FUSED_CPU_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", marker, __file__]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_slow_kernel_tests_in_the_interpreter():
    """The -m slow set in the interpreter (the default set runs in tests/test_triton_interpret.py's process)."""
    pytest.importorskip("triton")
    res = _interpret("slow")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    passed = re.search(r"(\d+) passed", res.stdout.strip().splitlines()[-1])
    assert passed and int(passed.group(1)) >= 23, res.stdout[-2000:]


class CallCounts:
    """How often each wrapped kernel function ran: ``counts["forward"]``."""

    def __init__(self, mocks: dict):
        self.mocks = mocks

    def __getitem__(self, name: str) -> int:
        return self.mocks[name].call_count


def triton_only_calls(monkeypatch):
    """Fail if ``acon.fused.bn_act``'s torch op serves a pair (its statistics are never computed on the
    Triton path), and if any kernel fell back; yields the counts of the Triton kernel launches."""
    from acon.fused import triton_bn_kernels as tk

    def torch_op(*a, **k):
        raise AssertionError("acon.fused.bn_act's torch op ran instead of the Triton kernels")

    monkeypatch.setattr(bn_act, "batch_statistics", torch_op)
    mocks = {name: mock.Mock(wraps=getattr(tk, name)) for name in ("forward", "backward_sums", "backward_dx")}
    for name, wrapped in mocks.items():
        monkeypatch.setattr(tk, name, wrapped)
    calls = CallCounts(mocks)
    fallbacks.clear()
    yield calls
    assert fallbacks.recorded() == {}


@pytest.fixture
def triton_only(monkeypatch):
    yield from triton_only_calls(monkeypatch)


def _check_pair(act, dtype, channels_last: bool, n: int, device="cpu") -> None:
    """Values, every gradient (input via the conv, BN weight/bias, p1, p2, β, Meta's β network) and the
    running statistics of a fused pair against the two modules, then eval mode."""
    ref = pair(act, dtype=dtype).to(device)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = (torch.randn(n, 3, 7, 5, dtype=dtype) * 2 + 0.5).to(device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ya, yb = step_both(ref, fused, x, steps=2)
    assert close(yb, ya, dtype) and yb.stride() == ya.stride()
    grads_close(ref, fused, dtype)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        assert close(b, a, dtype), name
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert close(fused(x), ref(x), dtype)


@inner
@pytest.mark.parametrize(
    "act,dtype,layout,n",
    [
        (MetaAconC, torch.float32, "channels_last", 3),
        pytest.param(MetaAconC, torch.float64, "nchw", 1, marks=pytest.mark.slow),
        pytest.param(AconC, torch.float32, "nchw", 4, marks=pytest.mark.slow),
        pytest.param(AconC, torch.float64, "channels_last", 1, marks=pytest.mark.slow),
        pytest.param(AconC, torch.float32, "channels_last", 3, marks=pytest.mark.slow),
        pytest.param(MetaAconC, torch.float32, "nchw", 4, marks=pytest.mark.slow),
        pytest.param(MetaAconC, torch.float64, "channels_last", 2, marks=pytest.mark.slow),
    ],
)
def test_pairs_match_the_two_modules(triton_only, act, dtype, layout, n):
    _check_pair(act, dtype, layout == "channels_last", n)
    assert triton_only["forward"] >= 3 and triton_only["backward_sums"] >= 2


@inner
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_running_statistics_follow_batchnorm2d(triton_only, layout):
    """momentum 0.1 and None (cumulative average), batches of growing mean and spread: the buffers of the
    fused pair's BatchNorm equal nn.BatchNorm2d's to float32 rounding."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    batches = [(torch.randn(5, 3, 6, 6) * (k + 1) + 3 * k).contiguous(memory_format=fmt) for k in range(3)]
    for momentum in (0.1, None):
        ref = pair(AconC, dtype=torch.float32, momentum=momentum)
        fused = fuse_bn_acon(copy.deepcopy(ref))
        _ = [(ref(x), fused(x)) for x in batches]
        want, got = dict(ref[1].named_buffers()), dict(fused[1].named_buffers())
        assert int(got.pop("num_batches_tracked")) == int(want.pop("num_batches_tracked")) == 3
        assert all(torch.allclose(got[k], v, rtol=1e-6, atol=1e-6) for k, v in want.items()), momentum


@inner
@pytest.mark.slow
def test_saves_no_more_than_conv_bn_relu(triton_only):
    """``tests/test_fused_bn_acon.py``'s saved-bytes check on the Triton path: conv → fused pair → conv
    keeps no more for backward than conv → BN → ReLU(inplace) → conv (ACON-C and Meta-ACON)."""
    from tests.test_fused_bn_acon import test_backward_keeps_no_batchnorm_output

    test_backward_keeps_no_batchnorm_output()
    assert triton_only["forward"] >= 2


@inner
def test_eval_and_frozen_batchnorm(triton_only):
    """Running statistics: ACON-C backward is one pass (dx = a·dz), Meta-ACON's needs the second (its
    dzbar/S term); the affine and the activation still train."""
    for act, second_pass in ((AconC, 0), (MetaAconC, 1)):
        ref = pair(act)
        ref[1].eval()
        fused = fuse_bn_acon(copy.deepcopy(ref))
        x, g = torch.randn(2, 3, 5, 4, dtype=torch.float64), torch.randn(2, 6, 5, 4, dtype=torch.float64)
        ya, yb = ref(x), fused(x)  # the first call's self-check runs both passes: count after it
        before = triton_only["backward_dx"]
        ya.backward(g), yb.backward(g)
        grads_close(ref, fused, torch.float64)
        assert triton_only["backward_dx"] - before == second_pass
        assert torch.equal(ref[1].running_mean, fused[1].running_mean)


@inner
def test_statistics_are_exact_in_fp64_and_stable_in_fp32(monkeypatch):
    """fp64: torch's mean and variance to rounding; fp32 data far from 0 (mean 1000, std 1) and several
    slices per row: the variance to 1e-5 relative (Σx² - (Σx)²/m in fp32 would lose it all)."""
    from acon.fused import triton_bn_kernels as tk

    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 1
    mean, var, rows = tk.moments(x)
    assert torch.allclose(mean, x.mean((0, 2, 3)), rtol=1e-13, atol=1e-14)
    assert torch.allclose(var, x.var((0, 2, 3), unbiased=False), rtol=1e-13, atol=1e-14)
    assert torch.allclose(rows, x.mean((2, 3)), rtol=1e-13, atol=1e-14)
    from acon.fused import triton_kernels

    monkeypatch.setattr(triton_kernels, "TILE", 64)  # 16-value tiles along S here
    monkeypatch.setattr(tk, "TARGET_PROGRAMS", 8)  # several tiles per slice
    x = (torch.randn(2, 3, 40, 40, dtype=torch.float64) + 1000).float().to(memory_format=torch.channels_last)
    mean, var, _ = tk.moments(x)
    assert torch.allclose(var, x.double().var((0, 2, 3), unbiased=False), rtol=1e-5)


@inner
@pytest.mark.slow
@pytest.mark.parametrize("act", [AconC, MetaAconC])
def test_batchnorm_without_affine(triton_only, act):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False), act(4)).double()
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 2 + 1
    ya, yb = step_both(ref, fused, x, steps=2)
    assert close(yb, ya, torch.float64)
    grads_close(ref, fused, torch.float64)
    for (name, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        assert close(b, a, torch.float64), name


def _functional_case(dtype, per_sample: bool, channels_last: bool, shape=(3, 4, 5, 6), batch_stats=True):
    """Inputs of ``bn_act.bn_acon_c`` (x in ``dtype``; BN weight and bias fp32, as under autocast)."""
    g = torch.Generator().manual_seed(3)
    n, c = shape[:2]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    p1, p2 = (torch.randn(1, c, 1, 1, generator=g).to(dtype) for _ in range(2))
    beta = (torch.rand((n if per_sample else 1, c, 1, 1), generator=g) * 2).to(dtype)
    rm, rv = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    st = bn_act.BNState(w, b, rm, rv, 1e-5, 0.0, batch_stats, False)
    return x, st, p1, p2, beta, torch.randn(shape, generator=g).to(dtype)


def _fused_and_reference(dtype, per_sample, channels_last, **kw):
    x, st, p1, p2, beta, dy = _functional_case(dtype, per_sample, channels_last, **kw)
    leaves = [t.detach().clone().requires_grad_() for t in (x, st.weight, st.bias, p1, p2, beta)]
    st.weight, st.bias = leaves[1], leaves[2]
    y = bn_act.bn_acon_c(leaves[0], st, *leaves[3:])
    got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rm, rv = (None, None) if st.batch_stats else (st.running_mean.double(), st.running_var.double())
    z = F.batch_norm(ref_leaves[0], rm, rv, ref_leaves[1], ref_leaves[2], st.batch_stats, 0.0, st.eps)
    ry = acon_c_reference(z, *ref_leaves[3:])
    return got, [ry.detach(), *torch.autograd.grad(ry, ref_leaves, dy.double())]


_MORE_DTYPES = [
    (torch.bfloat16, False),
    (torch.float16, False),
    (torch.float16, True),
    (torch.float32, False),
]


@inner
@pytest.mark.parametrize(
    "dtype,channels_last",
    [(torch.bfloat16, True)] + [pytest.param(*case, marks=pytest.mark.slow) for case in _MORE_DTYPES],
)
def test_low_precision_inputs_compute_in_fp32(triton_only, dtype, channels_last):
    """bf16/fp16/fp32 x with fp32 BatchNorm parameters (autocast's mix): y and dx in x's dtype and
    strides, parameter gradients in the parameters' dtypes, all within the self-check's tolerances of
    the fp64 reference on the same rounded inputs."""
    got, want = _fused_and_reference(dtype, True, channels_last)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[0].stride() == got[1].stride()
    assert [t.dtype for t in got[2:]] == [torch.float32, torch.float32, dtype, dtype, dtype]
    names = ("y", "dx", "dweight", "dbias", "dp1", "dp2", "dbeta")
    assert selfcheck.mismatch(got, want, dtype, names) is None


@inner
@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiles_splits_and_channel_blocks(triton_only, monkeypatch, channels_last):
    """S beyond one tile, C beyond one channel block, several tiles per reducing program."""
    from acon.fused import triton_bn_kernels as tk

    monkeypatch.setattr(tk, "TARGET_PROGRAMS", 1)
    shape = (2, 300, 3, 3) if channels_last else (2, 3, 50, 50)
    got, want = _fused_and_reference(torch.float32, True, channels_last, shape=shape)
    assert (
        selfcheck.mismatch(got, want, torch.float32, ("y", "dx", "dw", "db", "dp1", "dp2", "dbeta")) is None
    )


@inner
@pytest.mark.slow
def test_backward_bitwise_deterministic(triton_only):
    a, _ = _fused_and_reference(torch.float32, True, True, shape=(3, 40, 17, 19))
    b, _ = _fused_and_reference(torch.float32, True, True, shape=(3, 40, 17, 19))
    assert all(torch.equal(ga, gb) for ga, gb in zip(a, b, strict=True))


@inner
@pytest.mark.slow
@pytest.mark.parametrize("act", [AconC, MetaAconC])
def test_gradcheck_fp64(triton_only, act):
    torch.manual_seed(1)
    seq = fuse_bn_acon(torch.nn.Sequential(torch.nn.BatchNorm2d(3), act(3)).double())
    with torch.no_grad():
        seq[0].weight.uniform_(0.5, 1.5), seq[0].bias.uniform_(-1, 1)
    names = [n for n, _ in seq.named_parameters()]
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(seq, dict(zip(names, ps, strict=True))):
            return seq(x)

    assert torch.autograd.gradcheck(f, (x, *seq.parameters()), eps=1e-6, atol=1e-6)


@inner
@pytest.mark.slow
def test_nan_and_inf_as_the_unfused_modules(triton_only):
    """Eval: ±inf/NaN in x give NaN/±inf where the unfused BatchNorm + fused ACON-C give them (the ACON
    convention of acon.fused.cpu); training: a NaN in a channel's batch makes that channel NaN in both."""
    ref = pair(AconC, dtype=torch.float32)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 1, 1], x[1, 1, 2, 3], x[0, 2, 0, 0] = float("inf"), float("-inf"), float("nan")
    for train in (False, True):
        ref.train(train), fused.train(train)
        with torch.no_grad():
            a, b = ref(x), fused(x)
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), train
        fin = a.isfinite()
        assert torch.allclose(a[fin], b[fin], rtol=1e-4, atol=1e-5)
    assert bool(b[:, 2].isnan().all()) and bool(b[:, 0].isnan().all())


@inner
@pytest.mark.slow
def test_autocast_training_and_a_first_call_under_inference_mode(triton_only):
    """bf16 autocast (conv output bf16, BatchNorm parameters fp32) trains through the kernels close to the
    unfused modules; a first call (self-check included) inside torch.inference_mode works."""
    ref = pair(MetaAconC, dtype=torch.float32)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    x = torch.randn(3, 3, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(x), fused(x)
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), ya.float(), rtol=5e-2, atol=5e-2)
    yb.float().sum().backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in fused.parameters())
    selfcheck.reset()
    ref = pair(MetaAconC, dtype=torch.float32).eval()
    fused = fuse_bn_acon(copy.deepcopy(ref))
    with torch.inference_mode():
        assert torch.allclose(fused(x), ref(x), rtol=1e-4, atol=1e-5)
    assert triton_only["forward"] >= 2


@inner
def test_selfcheck_catches_a_wrong_kernel(monkeypatch):
    """A wrong kernel: one warning naming the path, then acon.fused.bn_act's torch op serves (right values)."""
    from acon.fused import triton_bn_kernels as tk

    selfcheck.reset(), fallbacks.clear()
    fwd = tk.forward
    monkeypatch.setattr(tk, "forward", lambda *a: fwd(*a) * 1.1)
    try:
        with pytest.warns(UserWarning, match="bn_acon_c triton cpu float32 contiguous failed its self-check"):
            _check_pair(AconC, torch.float32, False, 3)
        assert list(fallbacks.recorded()) == ["bn_acon_c triton cpu float32 contiguous"]
        assert "batch: y differs" in fallbacks.recorded()["bn_acon_c triton cpu float32 contiguous"]
    finally:
        selfcheck.reset(), fallbacks.clear()


def _sync_worker_on_the_kernels(rank: int, path: str, out: str) -> None:
    """``tests.test_fused_bn_acon``'s SyncBatchNorm worker, with the torch op's statistics made to fail: a
    pair that ran on anything but the Triton kernels raises in this rank."""

    def torch_op(*a, **k):
        raise AssertionError("acon.fused.bn_act's torch op ran instead of the Triton kernels")

    bn_act.batch_statistics = torch_op
    from tests.test_fused_bn_acon import _sync_worker

    _sync_worker(rank, path, out, torch.float64)


@inner
@pytest.mark.slow
def test_syncbn_under_two_gloo_ranks_runs_on_the_kernels(tmp_path):
    """Two gloo ranks, half the batch each: the kernels' all-reduced statistics and gradients give one
    process's results on the whole batch (values, every gradient, running statistics); empty batches
    are left to the torch op."""
    import torch.multiprocessing as mp

    from acon.fused import triton_bn_act

    assert not triton_bn_act.serves(torch.empty(0, 3, 4, 4))
    out = str(tmp_path / "res")
    mp.spawn(_sync_worker_on_the_kernels, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    x, g = torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.randn(6, 4, 5, 5, dtype=torch.float64)
    for act in (AconC, MetaAconC):
        ref = pair(act, c=4)
        ref(x).backward(g)
        want = [p.grad for p in ref.parameters()] + [b.double() for b in ref.buffers()]
        for rank in (0, 1):
            got = torch.load(f"{out}.{act.__name__}.{rank}")
            got = got["grads"] + [b.double() for b in got["buffers"]]
            assert all(close(a, b, torch.float64) for a, b in zip(got, want, strict=True)), (act, rank)
