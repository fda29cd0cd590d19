"""The C++ BatchNorm + ACON-C row kernels behind ``acon.fuse_bn_acon`` (contiguous fp32/bf16 maps whose
rows hold at least one vector): the same values, gradients and running statistics as the two unfused
modules in float64 and as the multi-pass path (``acon.fused.bn_act.single_pass(False)``), in every
BatchNorm mode, thread count and vector width, and the same NaN/±Inf pattern as the unfused modules."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from test_fused_bn_acon import close
from test_fused_fuzz import X86, native_build
from test_fused_fuzz_cases import POISON, pattern
from torch import nn

from acon import AconC, MetaAconC, fuse_bn_acon
from acon.fused import bn_act, bn_native, cpu, native

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")

MODES = ("train", "eval", "frozen", "no_affine", "cumulative")


@pytest.fixture
def row_calls(monkeypatch):
    """Calls of the row kernels' forward and backward: a silent fallback to the multi-pass path fails."""
    calls = {"forward": 0, "backward": 0}
    for name, key in (("bn_acon_forward", "forward"), ("bn_acon_backward", "backward")):
        fn = getattr(bn_native, name)

        def wrapper(*a, _fn=fn, _key=key):
            calls[_key] += 1
            return _fn(*a)

        monkeypatch.setattr(bn_native, name, wrapper)
    cpu.set_mode("native")
    yield calls
    cpu.set_mode(None)


def model(act: type, mode: str, c: int = 6) -> nn.Sequential:
    """BatchNorm → activation, fp64, in one of MODES (eval: the BatchNorm alone, as in transfer)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    kw = {"affine": False} if mode == "no_affine" else {"momentum": None} if mode == "cumulative" else {}
    torch.manual_seed(0)
    net = nn.Sequential(nn.BatchNorm2d(c, **kw), act(c)).double()
    with torch.no_grad():
        if net[0].affine:
            net[0].weight.uniform_(0.5, 1.5), net[0].bias.uniform_(-0.5, 0.5)
        net[0].running_mean.uniform_(-1, 1), net[0].running_var.uniform_(0.5, 2)
    if mode == "frozen":
        frozen = FrozenBatchNorm2d(c).double()
        frozen.load_state_dict({k: v for k, v in net[0].state_dict().items() if k != "num_batches_tracked"})
        net[0] = frozen
    if mode == "eval":
        net[0].eval()
    return net


def results(net: nn.Module, x: torch.Tensor, dy: torch.Tensor, steps: int = 1) -> list[torch.Tensor]:
    """[y, dx, every parameter's gradient..., every buffer...] after ``steps`` training steps (bf16 x under
    autocast, as a bf16 convolution output reaches the pair)."""
    for _ in range(steps):
        net.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=x.dtype == torch.bfloat16):
            y = net(xi)
        y.backward(dy)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
    return [y.detach(), xi.grad, *grads, *(b.detach().clone() for b in net.buffers())]


def fused_copy(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The fused pair with fp32 parameters (what autocast runs bf16 activations with)."""
    return fuse_bn_acon(copy.deepcopy(net).float())


def max_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float((a.double() - exact).abs().max())


def compare(act, mode, shape, dtype=torch.float32, steps=2, seed=0):
    """Single-pass results against the unfused modules in fp64: fp32 within the fused-op tolerances; bf16
    no worse than 1.5x the multi-pass path's error plus one bf16 rounding of the largest value, except the
    gradients of Meta-ACON's β network, which autocast runs in bf16 (noise there; fp32 checks them)."""
    net = model(act, mode, shape[1])
    torch.manual_seed(seed)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    want = results(copy.deepcopy(net), x.double(), dy.double(), steps)
    got = results(fused_copy(net, dtype), x, dy, steps)
    if dtype == torch.float32:
        scale = max(float(w.abs().max()) for w in want[2:] if w.is_floating_point())
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert close(g.double(), w, torch.float32, None if i < 2 else scale), (i, mode)
        return
    with bn_act.single_pass(False):
        old = results(fused_copy(net, dtype), x, dy, steps)
    names = ["y", "dx"] + [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    for name, g, o, w in zip(names, got, old, want, strict=True):
        if name.startswith(("1.fc", "1.bn")):
            continue
        assert max_err(g, w) <= 1.5 * max_err(o, w) + 8e-3 * float(w.abs().max()), (name, mode)


@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("mode", MODES)
def test_every_batchnorm_mode_matches_the_unfused_modules(row_calls, act, mode):
    for shape in [(4, 6, 7, 5), (1, 6, 4, 4), (3, 1, 9, 9)]:  # rows of 35, exactly 16 and 81 values; batch 1
        compare(act, mode, shape)
    assert row_calls["forward"] >= 6 and row_calls["backward"] >= 6


@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bf16_is_as_accurate_as_the_multi_pass_path(row_calls, act, mode):
    compare(act, mode, (3, 6, 8, 9), torch.bfloat16)
    assert row_calls["backward"] >= 2


def served_by_aligned_rows(s: int, dtype: torch.dtype = torch.float32) -> bool:
    """Whether every pass of the row kernels walks rows of ``s`` values with the aligned walker in this build
    (the statistics and input-gradient passes take the forward rule, the dz pass the backward one)."""
    return native.aligned_rows(s, dtype, backward=False) and native.aligned_rows(s, dtype, backward=True)


def thread_runs(
    net: nn.Module, x: torch.Tensor, dy: torch.Tensor, counts=(1, 3, 2)
) -> list[list[torch.Tensor]]:
    """:func:`results` at each thread count, each checked bit-identical on a rerun at that count."""
    old = torch.get_num_threads()
    runs = []
    try:
        for threads in counts:
            torch.set_num_threads(threads)
            runs.append(results(copy.deepcopy(net), x, dy))
            again = results(copy.deepcopy(net), x, dy)
            assert all(torch.equal(a, b) for a, b in zip(runs[-1], again, strict=True))
    finally:
        torch.set_num_threads(old)
    return runs


@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("shape", [(5, 24, 6, 7), (5, 37, 7, 7)])
def test_results_are_bit_deterministic_at_any_thread_count(row_calls, act, shape):
    """Rerun at a thread count: bit-identical (sums in fixed slots, fixed order). Across thread counts: where
    the aligned walker runs every pass (7×7 at 16 and 8 lanes; 6×7 at 8), a row's sums are in an order fixed
    by its length, so results are bit-identical too (groups of rows here cross a sample's end); on the row
    walker the work split moves chunk boundaries, so only rounding differs."""
    net = fused_copy(model(act, "train", shape[1]), torch.float32)
    torch.manual_seed(0)
    x, dy = torch.randn(shape), torch.randn(shape)
    runs = thread_runs(net, x, dy)
    aligned = served_by_aligned_rows(shape[2] * shape[3])
    scale = max(float(t.abs().max()) for t in runs[0][2:] if t.is_floating_point())  # grads, buffers
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other, strict=True)):
            if aligned:
                assert torch.equal(a, b), i
            assert close(b.double(), a.double(), torch.float32, None if i < 2 else scale)
    if shape[2:] == (7, 7):
        assert aligned == (native.vector_width() in (8, 16))


@pytest.mark.parametrize("act", [AconC, MetaAconC])
def test_inference_matches_the_multi_pass_path(row_calls, act):
    """Without autograd (evaluation, and a training-mode forward under no_grad that moves the statistics)."""
    torch.manual_seed(0)
    net = fused_copy(model(act, "train", 6), torch.float32)
    x = torch.randn(3, 6, 5, 5) * 3 + 1
    for train in (True, False):
        net.train(train)
        a, b = copy.deepcopy(net), copy.deepcopy(net)
        with torch.no_grad():
            ya = a(x)
            with bn_act.single_pass(False):
                yb = b(x)
        assert close(ya, yb, torch.float32)
        for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
            assert close(ba.double(), bb.double(), torch.float32)
    assert row_calls["forward"] == 2


def test_other_layouts_dtypes_and_small_maps_keep_the_multi_pass_path(row_calls):
    lanes = native.vector_width()
    contiguous = torch.randn(2, 3, 4, lanes // 4)
    assert bn_act.rows_path(contiguous)
    small, channels_last = (
        torch.randn(2, 6, 1, lanes - 1),
        torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last),
    )
    for x in (contiguous.double(), small, channels_last, torch.randn(2, 3, 4, 2 * lanes)[..., ::2]):
        assert not bn_act.rows_path(x)
    with bn_act.single_pass(False):
        assert not bn_act.rows_path(contiguous)
    for x in (small, channels_last):
        net = model(AconC, "train")
        dy = torch.randn(x.shape)
        want = results(copy.deepcopy(net), x.double(), dy.double())
        got = results(fused_copy(net, torch.float32), x, dy)
        assert all(close(g.double(), w, torch.float32) for g, w in zip(got[:2], want[:2], strict=True))
    assert row_calls == {"forward": 0, "backward": 0}


# ---- NaN and ±Inf: the same pattern as the unfused modules ------------------------------------------

SITES = ("x", "dy", "p1", "p2", "beta", "weight", "bias", "running_var")


def poisoned_case(rng: random.Random):
    """(act, mode, net, x, dy): random shape and magnitude, one or two poisoned entries (or none)."""
    act, mode = rng.choice((AconC, MetaAconC)), rng.choice(("train", "train", "eval", "frozen"))
    shape = (rng.choice((1, 2, 3)), rng.choice((1, 3, 8))) + rng.choice(((4, 4), (5, 7), (9, 9), (1, 17)))
    torch.manual_seed(rng.randrange(1 << 30))
    net = model(act, mode, shape[1]).float()
    x = torch.randn(shape) * rng.choice((1e-20, 1.0, 1e3, 1e20))
    dy = torch.randn(shape)
    for _ in range(rng.choice((0, 1, 1, 2))):
        site, value = rng.choice(SITES), rng.choice(POISON)
        t = {"x": x, "dy": dy}.get(site)
        if t is None:
            t = dict(net.named_parameters(), **dict(net.named_buffers())).get(
                {"p1": "1.p1", "p2": "1.p2", "beta": "1.beta"}.get(site, "0." + site)
            )
        if t is None or not t.is_floating_point():
            continue  # Meta-ACON has no β parameter; affine-free BatchNorms no weight
        with torch.no_grad():
            t.view(-1)[rng.randrange(t.numel())] = value
    return act, mode, net, x, dy


@pytest.mark.parametrize("seed", range(3))
def test_nan_and_inf_follow_the_unfused_modules(row_calls, seed):
    """Exactly the NaN/+Inf/-Inf entries of the two unfused modules (nn.BatchNorm2d, then the activation on
    the fused ACON-C kernels) in y, dx, every gradient and buffer; on the entries finite in both and in
    float64, the error against float64 within twice the modules' largest plus the fused-op tolerances
    (absolute ones scaled by the largest value of the tensor, or of all gradients and buffers). The
    multi-pass path differs from the modules where a BatchNorm weight is infinite (its normalisation
    forms 0·∞)."""
    rng = random.Random(seed)
    for _ in range(12):
        act, mode, net, x, dy = poisoned_case(rng)
        want = results(copy.deepcopy(net), x, dy)
        got = results(fuse_bn_acon(copy.deepcopy(net)), x, dy)
        cpu.set_mode("eager")  # float64: the torch formulas, no Inductor build
        exact = [e.double() for e in results(copy.deepcopy(net).double(), x.double(), dy.double())]
        cpu.set_mode("native")
        finite = [e[e.isfinite()].abs() for e in exact[2:]]
        grad_scale = max((float(f.max()) for f in finite if f.numel()), default=0.0)
        for i, (g, w, e) in enumerate(zip(got, want, exact, strict=True)):
            where = (act.__name__, mode, tuple(x.shape), i)
            assert torch.equal(pattern(g), pattern(w)), where
            fin = w.isfinite() & e.isfinite()
            if fin.any():
                e = e[fin]
                scale = float(e.abs().max()) if i < 2 else grad_scale
                bound = 2 * max_err(w[fin], e) + 1e-5 * (1 + scale) + 1e-4 * e.abs()
                assert ((g[fin].double() - e).abs() <= bound).all(), where
    assert row_calls["backward"] >= 12


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 43))
def test_nan_and_inf_follow_the_unfused_modules_many(row_calls, seed):
    test_nan_and_inf_follow_the_unfused_modules(row_calls, seed)


@pytest.mark.skipif(not X86, reason="x86 vector-width flags")
@pytest.mark.parametrize("width", ["avx2", "sse"])
def test_narrower_vector_builds(row_calls, width):
    """Rebuilt at 8 (AVX2) and 4 (SSE) lanes: rows of exactly one vector and rows crossing chunks, and at 8
    lanes (where the aligned walker runs every pass) a 7×7 training step the same bit for bit at 1 and 3
    threads."""
    with native_build(width) as lanes:
        for act in (AconC, MetaAconC):
            compare(act, "train", (2, 5, 1, lanes))
            compare(act, "eval", (3, 4, 3, lanes - 1))
            compare(act, "train", (2, 3, 3, 3), torch.bfloat16)
        assert served_by_aligned_rows(49) == (lanes == 8)
        if lanes == 8:
            torch.manual_seed(0)
            x, dy = torch.randn(5, 37, 7, 7), torch.randn(5, 37, 7, 7)
            net = fused_copy(model(MetaAconC, "train", 37), torch.float32)
            one, three = thread_runs(net, x, dy, counts=(1, 3))
            assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))
    assert row_calls["backward"] >= 6
