"""Every Triton kernel compiles to an sm_90 (H100) binary through Triton's own compiler and ptxas, which
needs no GPU: type and constexpr errors that the interpreter (``TRITON_INTERPRET=1``) lets through fail here
before a GPU run would. ``-m slow`` (about 15 s)."""

from __future__ import annotations

import pytest

from tests.test_triton_bn_act import INTERPRETING

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(INTERPRETING, reason="the interpreter replaces the compiler"),
]
DTYPES = ["fp32", "bf16", "fp16", "fp64"]


def _compile_for_sm90(fn, pointers: dict, constexprs: dict) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: pointers.get(n, "i32") for n in names if n not in constexprs}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bn_act_kernels_compile_for_sm90(dtype):
    """Every BatchNorm+ACON kernel and flag combination compiles to an sm_90 binary (Triton's compiler and ptxas; no GPU
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_acon_c_kernels_compile_for_sm90(dtype):
    """The ACON-C (and Meta-ACON, per-sample β) forward and backward kernels that every CUDA activation call
    runs, for x in each dtype with fp32 parameters (autocast) and with parameters in x's dtype."""
    pytest.importorskip("triton")
    from acon.fused import triton_kernels as tk

    x, ct = f"*{dtype}", "*fp64" if dtype == "fp64" else "*fp32"
    for param in sorted({ct, x}):
        params = dict(p1_ptr=param, p2_ptr=param, b_ptr=param)
        for tile in (dict(BLOCK_C=8, BLOCK_S=256), dict(BLOCK_C=256, BLOCK_S=8)):  # NCHW-like, channels-last
            tile["F64"] = dtype == "fp64"
            _compile_for_sm90(tk._acon_c_fwd_kernel, dict(x_ptr=x, y_ptr=x, **params), tile)
            ptrs = dict(dy_ptr=x, x_ptr=x, dx_ptr=x, part_ptr=ct, **params)
            _compile_for_sm90(tk._acon_c_bwd_kernel, ptrs, tile)
