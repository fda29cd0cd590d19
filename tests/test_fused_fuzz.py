"""Property test: the fused ACON-C ops against the paper form, fuzzed, on every CPU backend.

Each case draws a shape (1×1 and odd maps, 2-D/3-D/4-D input, N = 1), a layout (contiguous, channels-last,
a strided view), a dtype (fp32, fp64, bf16 under autocast), per-channel or per-sample β (Meta-ACON),
magnitudes from 1e-20 to 1e20, exact zeros, p1 = p2 or β = 0 in a channel, and NaN/±Inf in x or in one
element of p1, p2 or β. The fused op (as the modules call it, ``impl="fused"``) and the paper form
(``impl="reference"``, in the case's dtype) run on the same inputs, and:

- NaN/Inf pattern: the fused output and every gradient (dx, dp1, dp2, dβ) are NaN, +Inf and -Inf exactly
  where the paper form evaluated in fp64 has them, with the convention stated in ``acon.fused.cpu``: where
  x is ±Inf the fused output is the value of (p1 - p2)·x·σ(·) + p2·x (±Inf where that limit exists; the
  paper form's p1·x - p2·x is NaN there). Where the fp64 value is finite but the paper form in the case's
  dtype is not (terms beyond fp32's range), the fused value may be non-finite too;
- accuracy on the finite entries, against the exact value (differentiated by hand in fp64 with a σ' that
  does not underflow, see ``exact``): |fused - exact| <= 4·|paper - exact| + floor·scale + 4·tiny·under,
  per element, with ``scale`` the sum of the absolute values of the entry's terms, ``floor`` a few
  rounding errors of the result's dtype, and ``under`` what an error of σ or σ' at the smallest normal
  number (``tiny``) costs: fp32 resolves σ only down to there.

Backends: the C++ kernels at each vector width (AVX-512, AVX2 via -mno-avx512f, SSE via -mno-avx), the
Inductor-compiled formulas (what serves with ``ACON_FUSED_NO_NATIVE=1``), the eager formulas, and the
Triton kernels through the interpreter (a subprocess with ``TRITON_INTERPRET=1
ACON_FUSED_CPU_BACKEND=triton``). The default suite runs a few cases per backend with a fixed seed;
``-m slow`` runs many more.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fused_fuzz_cases import FLOOR, SEED, cases, check_case, pattern

from acon import AconC, MetaAconC
from acon.fused import cpu, native

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
)


# ---- backends ---------------------------------------------------------------------------------------

WIDTH_FLAGS = {"native": "", "avx2": "-mno-avx512f", "sse": "-mno-avx"}
X86 = platform.machine() in ("x86_64", "AMD64")


@contextlib.contextmanager
def native_build(width: str):
    """The C++ kernels built at ``width`` (cached like any build, keyed by the flags) serve the fused op."""
    old = os.environ.get("ACON_KERNEL_CFLAGS")
    os.environ["ACON_KERNEL_CFLAGS"] = WIDTH_FLAGS[width]
    native.library.cache_clear()
    cpu.set_mode("native")
    try:
        if not native.available():
            if width == "native":
                pytest.skip("C++ kernels could not be built here")
            pytest.fail(f"the C++ kernels did not build with {WIDTH_FLAGS[width]}")
        yield native.vector_width()
    finally:
        cpu.set_mode(None)
        if old is None:
            os.environ.pop("ACON_KERNEL_CFLAGS", None)
        else:
            os.environ["ACON_KERNEL_CFLAGS"] = old
        native.library.cache_clear()


def fuzz_native(width: str, n: int, counted: dict) -> None:
    if width != "native" and not X86:
        pytest.skip("x86 vector-width flags")
    with native_build(width) as lanes:
        assert lanes == {"avx2": 8, "sse": 4}.get(width, lanes)
        for case in cases(n, dtypes=("fp32", "bf16-autocast")):
            check_case(case)
    assert counted["forward"] >= n and counted["backward"] >= n  # (the paper form never calls them)


@pytest.fixture
def mode():
    yield cpu.set_mode
    cpu.set_mode(None)


@pytest.mark.parametrize("width", list(WIDTH_FLAGS))
def test_fuzz_native(counted, width):
    fuzz_native(width, 24, counted)


@pytest.mark.slow
@pytest.mark.parametrize("width", list(WIDTH_FLAGS))
def test_fuzz_native_many(counted, width):
    fuzz_native(width, 600, counted)


def test_fuzz_eager(mode):
    mode("eager")
    for case in cases(40):
        check_case(case)


@pytest.mark.slow
def test_fuzz_eager_many(mode):
    mode("eager")
    for case in cases(600, seed=SEED + 1):
        check_case(case)


@pytest.fixture
def compiled(monkeypatch):
    """The Inductor-compiled formulas serve every case: Dynamo may recompile each variant for new sizes
    (a limit of 8 would silently hand later cases to the eager formulas), and a fallback fails the test."""
    if not cpu.compile_supported():
        pytest.skip("no C compiler for torch.compile")
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    monkeypatch.setattr(cpu, "_EAGER_FALLBACK", set())
    calls = {"n": 0}
    run = cpu._run_compiled

    def counted_run(*a):
        calls["n"] += 1
        return run(*a)

    monkeypatch.setattr(cpu, "_run_compiled", counted_run)
    cpu.set_mode("compiled")
    yield calls
    cpu.set_mode(None)
    assert not cpu._EAGER_FALLBACK, (
        f"compiled variants fell back to the eager formulas: {cpu._EAGER_FALLBACK}"
    )


def fuzz_compiled(picked: list, calls: dict) -> None:
    for case in picked:
        check_case(case)
    assert calls["n"] >= 2 * len(picked)  # forward and backward of every case ran compiled


def test_fuzz_inductor(compiled):
    """The compiled formulas (what serves when the C++ kernels are off: ACON_FUSED_NO_NATIVE=1); one
    variant in the default suite since each costs a compile."""
    picked = [
        c
        for c in cases(200)
        if c.dtype == "fp32" and c.layout != "channels_last" and not c.per_sample and len(c.shape) == 4
    ]
    fuzz_compiled(picked[:4], compiled)


@pytest.mark.slow
def test_fuzz_inductor_many(compiled):
    fuzz_compiled(cases(100, seed=SEED + 2), compiled)


# ---- Triton kernels through the interpreter (a subprocess: the interpreter is chosen at import) ------


def _interpreter_run(selection: str, marks: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ACON_FUSED_CPU_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-m", marks, "-k", selection, __file__]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert re.search(r"\b1 passed", res.stdout.strip().splitlines()[-1]), res.stdout[-2000:]


inner = pytest.mark.skipif(not INTERPRETING, reason="runs inside the TRITON_INTERPRET=1 subprocess")


@pytest.fixture
def triton_counted(monkeypatch):
    from acon.fused import selfcheck, triton_kernels

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        fn = getattr(triton_kernels, name)

        def wrapper(*a, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*a)

        monkeypatch.setattr(triton_kernels, name, wrapper)
    monkeypatch.setattr(selfcheck, "triton_ok", lambda x: True)  # the kernels themselves, never a fallback
    return calls


# The interpreter converts fp32 to bf16 by truncation (GPUs round to nearest), so bf16 results may be one
# bf16 ulp (2^-7 relative) off there instead of half of one.
INTERPRETER_FLOOR = {**FLOOR, torch.bfloat16: 8e-3}


@inner
def test_fuzz_triton_inner(triton_counted):
    for case in cases(6, seed=SEED + 3):
        check_case(case, INTERPRETER_FLOOR)
    assert triton_counted["forward"] >= 6 and triton_counted["backward"] >= 6


@inner
@pytest.mark.slow
def test_fuzz_triton_inner_many(triton_counted):
    for case in cases(200, seed=SEED + 4):
        check_case(case, INTERPRETER_FLOOR)


@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_fuzz_triton_interpreter():
    _interpreter_run("test_fuzz_triton_inner and not many", "not slow")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
def test_fuzz_triton_interpreter_many():
    _interpreter_run("test_fuzz_triton_inner_many", "slow")


# ---- regressions ------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", list(WIDTH_FLAGS))
def test_nan_beta_gives_nan_outputs_and_dbeta(width):
    """A NaN β makes every output of its channel and its dβ NaN, as in the paper form (the C++ kernels
    once clamped the sigmoid's NaN argument to a bound and returned finite values)."""
    if width != "native" and not X86:
        pytest.skip("x86 vector-width flags")
    x = torch.randn(2, 4, 3, 3)
    counts = {}
    with native_build(width):
        for impl in ("reference", "fused"):
            m = AconC(4, impl=impl)
            with torch.no_grad():
                m.beta[0, 1] = float("nan")
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            y.sum().backward()
            counts[impl] = (int(y[:, 1].isnan().sum()), int(m.beta.grad.isnan().sum()))
    assert counts == {"reference": (18, 1), "fused": (18, 1)}


@pytest.mark.parametrize("mode_name", ["native", "eager"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_meta_acon_nan_pixel_spreads_like_the_reference(mode, mode_name, channels_last):
    """One NaN input pixel: the spatial mean and the batch statistics of Meta-ACON's β network spread it to
    every β of the batch, so every output and every gradient is NaN with the fused op as with the paper
    form (a training run then stops under trainer.nan_policy=stop instead of training on clamped values)."""
    mode(mode_name)
    torch.manual_seed(0)
    ref = MetaAconC(8, r=4, impl="reference")
    fused = MetaAconC(8, r=4, impl="fused")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 5, 5)
    x[1, 2, 3, 4] = float("nan")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = {}
    for name, m in (("reference", ref), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[name] = [y.detach(), xi.grad] + [p.grad for _, p in sorted(m.named_parameters())]
    assert out["reference"][0].isnan().all()
    for a, b in zip(out["reference"], out["fused"], strict=True):
        assert torch.equal(pattern(a), pattern(b))
