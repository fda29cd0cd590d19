"""The compiled CPU kernels fall back to the eager formulas when Dynamo gives up, never crash."""

from __future__ import annotations

import os

import pytest
import torch

from acon.functional import acon_c_reference
from acon.fused import cpu, native


def test_compiled_kernel_failure_falls_back_to_eager(monkeypatch):
    def refuse(kind, key):
        def fail(*args):
            raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile limit")

        return fail

    monkeypatch.setattr(cpu, "_compiled", refuse)
    monkeypatch.setattr(cpu, "_EAGER_FALLBACK", set())
    monkeypatch.setattr(cpu, "_MODE", {"cpu": "compiled"})
    from acon.fused import acon_c

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    p1, p2, beta = (torch.randn(1, 3, 1, 1, requires_grad=True) for _ in range(3))
    with pytest.warns(UserWarning, match="using the eager formulas"):
        y = acon_c(x, p1, p2, beta)
    ref = acon_c_reference(x, p1, p2, beta)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    torch.testing.assert_close(gx, x.grad)
    assert {k for k, _ in cpu._EAGER_FALLBACK} == {"fwd", "bwd"}


@pytest.fixture
def fresh_selfcheck():
    from acon import fallbacks
    from acon.fused import selfcheck

    selfcheck.reset()
    fallbacks.clear()
    yield fallbacks
    selfcheck.reset()
    fallbacks.clear()


def _grads(fn, x, p1, p2, beta):
    leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, torch.ones_like(y))]


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_launch_failure_falls_back_once(monkeypatch, fresh_selfcheck, channels_last):
    """Triton kernels launched on CPU tensors without the interpreter fail, as a broken GPU build would:
    one warning, the reference result, and a record for results.json."""
    pytest.importorskip("triton")
    import warnings

    from acon.fused import acon_c, ops

    monkeypatch.setattr(ops, "triton_on_cpu", lambda: True)  # route CPU tensors to the Triton kernels
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    p1, p2, beta = torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1), torch.rand(2, 3, 1, 1)
    with pytest.warns(UserWarning, match="failed its self-check") as caught:
        got = _grads(acon_c, x, p1, p2, beta)
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    for a, b in zip(got, _grads(acon_c_reference, x, p1, p2, beta), strict=True):
        torch.testing.assert_close(a, b)
    fmt = "channels_last" if channels_last else "contiguous"
    assert list(fresh_selfcheck.recorded()) == [f"acon_c triton cpu float32 {fmt}"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning
        _grads(acon_c, x, p1, p2, beta)


def test_triton_mismatch_falls_back(monkeypatch, fresh_selfcheck):
    """Kernels that run but compute something else are caught by the comparison, in bf16 too."""
    pytest.importorskip("triton")
    from acon.fused import acon_c, ops, selfcheck

    monkeypatch.setattr(ops, "triton_on_cpu", lambda: True)
    wrong = lambda *a: [t * 1.05 for t in selfcheck.reference_grads(*a)]  # noqa: E731
    monkeypatch.setattr(selfcheck, "_triton_run", wrong)
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    p1, p2, beta = (torch.randn(1, 6) for _ in range(3))
    with pytest.warns(UserWarning, match="dbeta|dp1|dx|y differs"):
        got = _grads(acon_c, x, p1, p2, beta)
    want = acon_c_reference(x.float(), p1, p2, beta)
    torch.testing.assert_close(got[0].float(), want, rtol=1.6e-2, atol=2e-2)
    assert "acon_c triton cpu bfloat16 contiguous" in fresh_selfcheck.recorded()


def test_results_name_the_ranks_a_fallback_happened_on():
    from acon.fallbacks import across_ranks

    assert across_ranks([{}, {}]) == {}
    assert across_ranks([{"p": "why"}, {"p": "why"}]) == {"p": "why"}
    assert across_ranks([{}, {"p": "why"}, {"p": "why", "q": "bad"}]) == {
        "p": "why (ranks 1, 2 of 3)",
        "q": "bad (rank 2 of 3)",
    }


def test_the_cpu_kernels_build_wherever_a_compiler_is_found():
    """The kernel tests skip where the C++ kernels are unavailable; so that a source that stops compiling
    fails the suite instead of skipping those tests, the library must build here when a compiler exists."""
    if native.compiler() is None or os.environ.get("ACON_FUSED_NO_NATIVE") == "1":
        pytest.skip("no C++ compiler, or the C++ kernels are switched off")
    native.build()  # raises with the compiler's message if the source does not compile
    assert native.available()
