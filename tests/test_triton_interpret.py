"""The Triton ACON-C kernels, run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``).

The interpreter must be switched on before ``triton`` is imported, so the one test collected in a normal
run re-runs this file in a subprocess with ``TRITON_INTERPRET=1 ACON_FUSED_CPU_BACKEND=triton``; in that
subprocess the kernel tests below run and the launcher skips itself. Tolerances are those of
``tests/test_fused.py`` (fp16 as bf16 but rtol 2e-3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETING = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ACON_FUSED_CPU_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # one interpreter process for the ACON-C kernels and the BatchNorm+ACON kernels' default tests
    # (their -m slow set has its own launcher in tests/test_triton_bn_act.py)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        __file__,
        str(ROOT / "tests" / "test_triton_bn_act.py"),
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = res.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    # every kernel test of both files ran; the only skip is this launcher itself
    assert passed and int(passed.group(1)) >= 25 and "1 skipped" in summary, res.stdout[-2000:]


inner = pytest.mark.skipif(not INTERPRETING, reason="runs inside the TRITON_INTERPRET=1 subprocess")

if INTERPRETING:
    import acon.fused
    from acon import fallbacks
    from acon.fused import ops, selfcheck, triton_kernels
    from tests.test_fused import TOL, _inputs, _run, check_against_reference

    TOL[torch.float16] = dict(rtol=2e-3, atol=1e-3)


@pytest.fixture
def count_kernel_calls(monkeypatch):
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = triton_kernels.forward, triton_kernels.backward

    def f(*a):
        calls["fwd"] += 1
        return fwd(*a)

    def b(*a):
        calls["bwd"] += 1
        return bwd(*a)

    monkeypatch.setattr(triton_kernels, "forward", f)
    monkeypatch.setattr(triton_kernels, "backward", b)
    monkeypatch.setattr(selfcheck, "triton_ok", lambda x: True)  # count the op's own calls (checked below)
    return calls


@inner
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kernels_match_reference(count_kernel_calls, dtype, per_sample, channels_last):
    assert ops.triton_on_cpu()
    # odd sizes: C=1, H·W=1, S not a multiple of any block, batch 1
    for shape in [(2, 5, 3, 4), (2, 1, 3, 5), (3, 7, 1, 1), (1, 3, 33, 17)]:
        check_against_reference(acon.fused.acon_c, shape, dtype, per_sample, channels_last)
    assert count_kernel_calls["fwd"] == 4 and count_kernel_calls["bwd"] == 4


@inner
@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 7)])
def test_kernels_2d_3d(count_kernel_calls, shape):
    check_against_reference(acon.fused.acon_c, shape, torch.float32, True, False)
    assert count_kernel_calls["bwd"] == 1


@inner
@pytest.mark.parametrize("channels_last", [False, True])
def test_empty_inputs_give_empty_and_zero_gradients(channels_last):
    """An empty spatial axis: the backward's block sizes were 0 (ZeroDivisionError)."""
    shape = (2, 3, 0, 4)
    x = torch.randn(shape)
    x = (x.to(memory_format=torch.channels_last) if channels_last else x).requires_grad_()
    p1, p2, beta = (torch.randn(1, shape[1], 1, 1, requires_grad=True) for _ in range(3))
    y = acon.fused.acon_c(x, p1, p2, beta)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape
    assert all(t.grad is not None and not t.grad.any() for t in (p1, p2, beta))


@inner
@pytest.mark.parametrize("channels_last", [False, True])
def test_multi_tile_and_split_paths(monkeypatch, channels_last):
    """S beyond one tile, C beyond one channel block, and several tiles per split (TARGET_PROGRAMS=1)."""
    monkeypatch.setattr(triton_kernels, "TARGET_PROGRAMS", 1)
    shape = (2, 300, 9, 9) if channels_last else (2, 3, 50, 50)
    check_against_reference(acon.fused.acon_c, shape, torch.float32, True, channels_last)


@inner
def test_backward_bitwise_deterministic():
    x, p1, p2, beta, dy = _inputs((3, 40, 17, 19), torch.float32, True, True)
    a = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    b = _run(acon.fused.acon_c, x, p1, p2, beta, dy)[1]
    assert all(torch.equal(ga, gb) for ga, gb in zip(a, b, strict=True))


@pytest.fixture
def fresh_selfcheck():
    selfcheck.reset()
    fallbacks.clear()
    yield
    selfcheck.reset()
    fallbacks.clear()


@inner
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_selfcheck_passes_real_kernels(fresh_selfcheck, dtype, channels_last):
    """The first call checks the interpreted kernels, forward and backward, and keeps them."""
    check_against_reference(acon.fused.acon_c, (2, 5, 3, 4), dtype, True, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(2, 5, 3, 4, dtype=dtype).contiguous(memory_format=fmt)
    assert selfcheck._STATE[selfcheck._key(x)] is True and fallbacks.recorded() == {}


@inner
def test_selfcheck_catches_a_wrong_kernel(fresh_selfcheck, monkeypatch):
    """An interpreted kernel with a wrong result: one warning, then the eager formulas serve the op."""
    fwd = triton_kernels.forward
    monkeypatch.setattr(triton_kernels, "forward", lambda *a: fwd(*a) * 1.1)
    with pytest.warns(UserWarning, match="y differs from the reference"):
        check_against_reference(acon.fused.acon_c, (2, 5, 3, 4), torch.float32, False, False)
    assert list(fallbacks.recorded()) == ["acon_c triton cpu float32 contiguous"]
