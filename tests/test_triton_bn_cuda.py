"""The fused BatchNorm → ACON-C / Meta-ACON Triton kernels on CUDA: ``-m gpu`` tests run the op on a GPU
(``scripts/gpu_check.sh``). That every kernel compiles to an sm_90 binary is checked without a GPU in
``tests/test_triton_sm90.py``; the interpreter tests are in ``tests/test_triton_bn_act.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acon import AconC, MetaAconC
from acon.functional import acon_c_reference
from acon.fused import bn_act, selfcheck
from tests.test_triton_bn_act import _check_pair, _functional_case, triton_only_calls

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def triton_only(monkeypatch):
    yield from triton_only_calls(monkeypatch)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("n", [8, 1])
def test_cuda_pairs_on_the_triton_kernels(triton_only, act, channels_last, n):
    """On CUDA: fp32 values, gradients, running statistics and eval of fused pairs, no fallback."""
    _check_pair(act, torch.float32, channels_last, n, device="cuda")
    assert triton_only["forward"] >= 3


def _low_precision_deterministic(dtype, device: str, shape) -> None:
    """bf16/fp16 x (fp32 BatchNorm parameters) on ``device``: within the self-check tolerances of the fp64
    reference, and two backward runs bitwise equal; NCHW and channels-last."""
    names = ("y", "dx", "dweight", "dbias", "dp1", "dp2", "dbeta")
    for channels_last in (False, True):
        x, st, p1, p2, beta, dy = _functional_case(dtype, True, channels_last, shape=shape)
        runs = []
        for _ in range(2):
            leaves = [t.detach().to(device).requires_grad_() for t in (x, st.weight, st.bias, p1, p2, beta)]
            dst = bn_act.BNState(leaves[1], leaves[2], None, None, st.eps, 0.0, True, False)
            y = bn_act.bn_acon_c(leaves[0], dst, *leaves[3:])
            runs.append([y.detach(), *torch.autograd.grad(y, leaves, dy.to(device))])
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
        ref = [t.detach().double().requires_grad_() for t in (x, st.weight, st.bias, p1, p2, beta)]
        ry = acon_c_reference(F.batch_norm(ref[0], None, None, ref[1], ref[2], True, 0.0, st.eps), *ref[3:])
        want = [ry.detach(), *torch.autograd.grad(ry, ref, dy.double())]
        assert selfcheck.mismatch([t.cpu() for t in runs[0]], want, dtype, names) is None, channels_last


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_and_determinism(triton_only, dtype):
    """bf16/fp16 on CUDA within the self-check tolerances; backward bitwise deterministic."""
    _low_precision_deterministic(dtype, "cuda", (8, 64, 28, 28))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_kernels_launch_on_the_tensors_device(triton_only):
    """With cuda:0 current, a pair on the last GPU runs there (Triton launches on the current device
    unless told otherwise)."""
    torch.cuda.set_device(0)
    _check_pair(MetaAconC, torch.float32, True, 4, device=f"cuda:{torch.cuda.device_count() - 1}")
