"""The eager shortcuts of ACON-C and Meta-ACON against the paths they shortcut: the β network's BatchNorms on
(N, C) rows vs the module call, the cached kernel plans and shape checks, fp32 copies of parameters, and
AconC's direct call of the C++ kernels' op vs the general dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import acon.fused
from acon import AconC, MetaAconC
from acon.activations import BatchNorm2dB1
from acon.fused import native

needs_native = pytest.mark.skipif(not native.available(), reason="C++ kernels not built here")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("n", [1, 4])
def test_forward_rows_matches_the_module_call(training, momentum, track, n):
    torch.manual_seed(0)
    a = BatchNorm2dB1(6, momentum=momentum, track_running_stats=track)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5), a.bias.uniform_(-0.5, 0.5)
        if track:
            a.running_mean.uniform_(-1, 1), a.running_var.uniform_(0.5, 2)
    b = copy.deepcopy(a)
    a.train(training), b.train(training)
    h = torch.randn(n, 6)
    if not track and n == 1:  # batch statistics of one value: nn.BatchNorm2d refuses them; so do the rows
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            b(h.view(n, 6, 1, 1))
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            a.forward_rows(h)
        return
    for _ in range(3):  # repeated: running statistics and num_batches_tracked evolve alike
        ha, hb = h.clone().requires_grad_(), h.clone().requires_grad_()
        ya, yb = a.forward_rows(ha), b(hb.view(n, 6, 1, 1)).flatten(1)
        torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(ha.grad, hb.grad, rtol=1e-5, atol=1e-6)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-6, atol=1e-7, msg=k)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_meta_acon_beta_network_keeps_batchnorm_hooks_and_swaps():
    """A forward or backward hook on a β-network BatchNorm, or a BatchNorm of another type, makes Meta-ACON
    call the module."""
    meta = MetaAconC(8, r=2)
    seen = []
    meta.bn1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    meta(torch.randn(3, 8, 5, 5))
    assert seen == [(3, 4, 1, 1)]

    class OtherBN(nn.BatchNorm2d):
        calls = 0

        def forward(self, x):
            OtherBN.calls += 1
            return super().forward(x)

    grads = []
    meta.bn2.register_full_backward_hook(lambda m, gi, go: grads.append(tuple(go[0].shape)))
    meta(torch.randn(3, 8, 5, 5)).sum().backward()
    assert grads == [(3, 8, 1, 1)]

    swapped = MetaAconC(8, r=2)
    swapped.bn2 = OtherBN(8)
    swapped.bn2.load_state_dict(meta.bn2.state_dict())
    y = swapped(torch.randn(3, 8, 5, 5))
    assert OtherBN.calls == 1 and y.shape == (3, 8, 5, 5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_native_kernels_keep_converted_parameters_alive(dtype):
    """Parameters that are not fp32 are converted for the call; the copies must outlive it (they are
    freed and their memory reused otherwise, so p1, p2 and β would alias)."""
    torch.manual_seed(0)
    x, dy = torch.randn(2, 5, 6, 7), torch.randn(2, 5, 6, 7)
    p1, p2, beta = torch.randn(1, 5, 1, 1), torch.randn(1, 5, 1, 1), torch.rand(2, 5, 1, 1) + 0.5
    p1, p2, beta = p1.to(dtype), p2.to(dtype), beta.to(dtype)
    want = native.forward(x, p1.float(), p2.float(), beta.float())
    torch.testing.assert_close(native.forward(x, p1, p2, beta), want, rtol=0, atol=0)
    got = native.backward(dy, x, p1, p2, beta)
    ref = native.backward(dy, x, p1.float(), p2.float(), beta.float())
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


@needs_native
def test_native_plan_follows_strides_and_threads():
    """The cached launch plan is keyed by strides and thread count: a channels-last tensor of a cached
    shape, a non-dense one, and another thread count each get their own (or a clear error)."""
    torch.manual_seed(0)
    p1, p2, beta = torch.randn(1, 6, 1, 1), torch.randn(1, 6, 1, 1), torch.ones(1, 6, 1, 1)
    x = torch.randn(3, 6, 5, 5)
    y = native.forward(x, p1, p2, beta)
    xc = x.to(memory_format=torch.channels_last)
    yc = native.forward(xc, p1, p2, beta)
    assert yc.stride() == xc.stride()
    torch.testing.assert_close(yc, y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="contiguous or channels-last"):
        native.forward(x.transpose(2, 3), p1, p2, beta)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        torch.testing.assert_close(native.forward(x, p1, p2, beta), y, rtol=1e-6, atol=1e-6)
    finally:
        torch.set_num_threads(threads)


def test_fused_shape_check_is_per_shape_combination():
    """A shape combination that passed once does not let a different β shape through."""
    x = torch.randn(2, 4, 3, 3)
    p = torch.randn(1, 4, 1, 1)
    acon.fused.acon_c(x, p, p, torch.ones(1, 4, 1, 1))
    acon.fused.acon_c(x, p, p, torch.ones(2, 4, 1, 1))
    with pytest.raises(ValueError, match="beta must be"):
        acon.fused.acon_c(x, p, p, torch.ones(3, 4, 1, 1))
    with pytest.raises(ValueError, match="p1 must be"):
        acon.fused.acon_c(x, torch.randn(1, 5, 1, 1), p, torch.ones(1, 4, 1, 1))


@needs_native
@pytest.mark.parametrize("impl", ["auto", "fused"])
def test_native_path_serves_aconc_directly(monkeypatch, impl):
    """On the CPU AconC runs the C++ kernels' autograd op without the general dispatch, with the same results
    and gradients as acon.fused.acon_c, and still names a wrong channel count."""
    c, applied = 4, []
    real_apply = acon.activations.NativeAconC.apply
    monkeypatch.setattr(
        acon.activations.NativeAconC, "apply", lambda *a: applied.append(a[4]) or real_apply(*a)
    )
    monkeypatch.setattr(acon.fused, "available", lambda *a: pytest.fail("general dispatch consulted"))
    act = AconC(c, impl=impl)
    x = torch.randn(3, c, 5, 5, requires_grad=True)
    y = act(x)
    y.backward(torch.ones_like(y))
    assert len(applied) == 1 and applied[0].c == c and applied[0].s == 25
    x2 = x.detach().requires_grad_()
    p = [t.detach().requires_grad_() for t in (act.p1, act.p2, act.beta)]
    y2 = acon.fused.acon_c(x2, *p)
    y2.backward(torch.ones_like(y2))
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    for mine, theirs in zip((act.p1, act.p2, act.beta), p, strict=True):
        assert torch.equal(mine.grad, theirs.grad)
    with pytest.raises(ValueError, match=f"activation has {c} channels but its input has shape"):
        act(torch.randn(2, c + 1, 3, 3))
