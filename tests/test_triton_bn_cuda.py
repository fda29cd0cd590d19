"""The fused BatchNorm → ACON-C / Meta-ACON Triton kernels for CUDA: every kernel compiles to an sm_90
binary (Triton's compiler and ptxas, no GPU needed; ``-m slow``), and ``-m gpu`` tests run the op on a
GPU (``scripts/gpu_check.sh``). The interpreter tests are in ``tests/test_triton_bn_act.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acon import AconC, MetaAconC
from acon.functional import acon_c_reference
from acon.fused import bn_act, selfcheck
from tests.test_triton_bn_act import INTERPRETING, _check_pair, _functional_case, triton_only_calls

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def triton_only(monkeypatch):
    yield from triton_only_calls(monkeypatch)


def _compile_for_sm90(fn, pointers: dict, constexprs: dict) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: pointers.get(n, "i32") for n in names if n not in constexprs}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the compiler")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "fp64"])
def test_kernels_compile_for_sm90(dtype):
    """Every kernel and flag combination compiles to an sm_90 binary (Triton's compiler and ptxas; no GPU
    needed): type errors the interpreter lets through fail here."""
    pytest.importorskip("triton")
    from acon.fused import triton_bn_channels as ch
    from acon.fused import triton_bn_kernels as tk

    f64 = dtype == "fp64"
    x, ct = f"*{dtype}", "*fp64" if f64 else "*fp32"
    tile = dict(BLOCK_C=8, BLOCK_S=256, F64=f64)
    _compile_for_sm90(tk._moments_kernel, {"x_ptr": x, "part_ptr": ct}, tile)
    _compile_for_sm90(tk._fwd_kernel, {"x_ptr": x, "y_ptr": x, "coef_ptr": ct, "b_ptr": ct}, tile)
    ptrs = dict(dy_ptr=x, x_ptr=x, dx_ptr=x, coef_ptr=ct, b_ptr=ct, e_ptr=ct, part_ptr=ct)
    for sums, write_dx, batch in ((True, False, False), (True, True, False), (False, True, True)):
        flags = dict(SUMS=sums, WRITE_DX=write_dx, BATCH_STATS=batch)
        _compile_for_sm90(tk._bwd_kernel, ptrs, {**tile, **flags})
    _compile_for_sm90(
        ch._moments_combine_kernel, {"part_ptr": ct, "row_ptr": "*fp64", "out_ptr": "*fp64"}, {"BLOCK_C": 128}
    )
    p = dict(mean_ptr="*fp64", inv_ptr="*fp64", w_ptr="*fp32", b_ptr="*fp32", p1_ptr=x, p2_ptr=x, coef_ptr=ct)
    for affine in (True, False):
        _compile_for_sm90(ch._coefficients_kernel, p, dict(HAS_W=affine, HAS_B=affine, BLOCK_C=128))
    p = dict(sums_ptr="*fp64", coef_ptr=ct, inv_ptr="*fp64", dzbar_ptr=x, row_ptr="*fp64", out_ptr=ct)
    p.update(shift_ptr=ct, bn_ptr="*fp64")
    for meta, batch in ((True, True), (True, False), (False, True)):
        _compile_for_sm90(ch._dx_coefficients_kernel, p, dict(META=meta, BATCH_STATS=batch, BLOCK_C=128))


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
