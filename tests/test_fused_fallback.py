"""The compiled CPU kernels fall back to the eager formulas when Dynamo gives up, never crash."""

from __future__ import annotations

import pytest
import torch

from acon.functional import acon_c_reference
from acon.fused import cpu


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
