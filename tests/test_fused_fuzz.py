"""Property test: the fused ACON-C ops against the paper form, fuzzed, on every CPU backend.

Each case draws a shape (1×1 and odd maps, 2-D/3-D/4-D input, N = 1), a layout (contiguous, channels-last,
a strided view), a dtype (fp32, fp64, bf16 under autocast), per-channel or per-sample β (Meta-ACON),
magnitudes from 1e-20 to 1e20, exact zeros, p1 = p2 or β = 0 in a channel, and NaN/±Inf in x or in one
element of p1, p2 or β. The fused op (as the modules call it, ``impl="fused"``) and the paper form
(``impl="reference"``) are both compared with the paper form evaluated in fp64 on the same inputs:

- NaN/Inf pattern: the fused output and every gradient (dx, dp1, dp2, dβ) are NaN, +Inf and -Inf exactly
  where the fp64 paper form's are, with one documented exception (``acon.fused``): where x is ±Inf the
  paper form's p1·x - p2·x is ∞ - ∞ = NaN, and the fused output is the value of (p1 - p2)·x·σ(·) + p2·x,
  which is ±Inf where that limit exists (every gradient there is NaN in both);
- accuracy on the finite entries: |fused - truth| <= 4·|paper - truth| + floor·scale, per element, with
  ``scale`` the sum of the absolute values of the terms of that entry (its conditioning) and ``floor``
  a few rounding errors of the result's dtype.

Backends: the C++ kernels at each vector width (AVX-512, AVX2 via -mno-avx512f, SSE via -mno-avx), the
Inductor-compiled formulas, the eager formulas, and the Triton kernels through the interpreter (a
subprocess with ``TRITON_INTERPRET=1 ACON_FUSED_CPU_BACKEND=triton``). The default suite runs a few cases
per backend with a fixed seed; ``-m slow`` runs many more.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import re
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from acon import AconC, MetaAconC
from acon.activations import _acon_c
from acon.fused import cpu, native

SEED = 20261206
ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = (
    os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("ACON_FUSED_CPU_BACKEND") == "triton"
)
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 4e-3}
POISON = (float("nan"), float("inf"), -float("inf"))
NAMES = ("y", "dx", "dp1", "dp2", "dbeta")


@dataclass
class Case:
    shape: tuple
    layout: str  # "contiguous", "channels_last" (3-D/4-D) or "strided"
    dtype: str  # "fp32", "fp64" or "bf16-autocast"
    per_sample: bool
    x_scale: float
    p_scale: float
    poison: list = field(default_factory=list)  # (tensor name, flat index, value)
    zero_d: bool = False  # p1 = p2 in one channel
    zero_beta: bool = False

    def __str__(self) -> str:
        return (
            f"shape={self.shape} {self.layout} {self.dtype} per_sample={self.per_sample} "
            f"x~{self.x_scale:g} p~{self.p_scale:g} poison={self.poison} p1=p2:{self.zero_d} β=0:{self.zero_beta}"
        )


def draw_case(rng: random.Random, dtypes=("fp32", "fp64", "bf16-autocast")) -> Case:
    """One random case (see the module docstring for what varies)."""
    n, c = rng.choice((1, 1, 2, 3)), rng.choice((1, 2, 3, 5, 8, 16, 17, 37))
    spatial = rng.choice([(), (1,), (7,), (1, 1), (2, 2), (3, 3), (5, 7), (7, 7), (4, 17), (13, 9)])
    shape = (n, c) + spatial
    layouts = ["contiguous", "strided"] + (["channels_last"] if len(shape) >= 3 else [])
    case = Case(
        shape=shape,
        layout=rng.choice(layouts),
        dtype=rng.choice(dtypes),
        per_sample=rng.random() < 0.5,
        x_scale=rng.choice((1e-20, 1e-3, 1.0, 1.0, 3.0, 50.0, 1e20)),
        p_scale=rng.choice((1e-2, 1.0, 1.0, 10.0)),
        zero_d=rng.random() < 0.15,
        zero_beta=rng.random() < 0.1,
    )
    numel = {"x": math.prod(shape), "p1": c, "p2": c, "beta": (n if case.per_sample else 1) * c}
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        name = rng.choice(("x", "x", "p1", "p2", "beta"))
        case.poison.append((name, rng.randrange(numel[name]), rng.choice(POISON)))
    return case


def make_inputs(case: Case) -> dict:
    """fp64 x, p1, p2, β (as the modules store them: (1|N, C, 1, 1)) and dy, poisoned as the case says."""
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    n, c = case.shape[:2]
    t = {
        "x": torch.randn(case.shape, generator=g, dtype=torch.float64) * case.x_scale,
        "p1": torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64) * case.p_scale,
        "p2": torch.randn(1, c, 1, 1, generator=g, dtype=torch.float64) * case.p_scale,
        "beta": torch.randn(n if case.per_sample else 1, c, 1, 1, generator=g, dtype=torch.float64) * 2,
        "dy": torch.randn(case.shape, generator=g, dtype=torch.float64),
    }
    t["x"].view(-1)[:: max(3, t["x"].numel() // 2)] = 0.0  # exact zeros: 0·∞ where a parameter is ∞
    if case.zero_d:
        t["p2"][0, 0] = t["p1"][0, 0]
    if case.zero_beta:
        t["beta"][:, -1] = 0.0
    for name, i, v in case.poison:
        t[name].view(-1)[i] = v
    return t


def _layout(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaf, view) where ``view`` has ``x``'s values in the case's layout and gradients reach ``leaf``."""
    if layout == "channels_last":
        leaf = x.movedim(1, -1).contiguous().requires_grad_()  # (N, ..., C) memory
        return leaf, leaf.movedim(-1, 1)
    if layout == "strided":  # every other element of a wider tensor: neither contiguous nor channels-last
        wide = torch.stack([x, torch.full_like(x, 7.0)], dim=-1).requires_grad_()
        return wide, wide[..., 0]
    leaf = x.clone().requires_grad_()
    return leaf, leaf


DTYPES = {  # case dtype -> (x's dtype, the parameters' dtype, autocast)
    "fp32": (torch.float32, torch.float32, False),
    "fp64": (torch.float64, torch.float64, False),
    "bf16-autocast": (torch.bfloat16, torch.float32, True),
}


def working(case: Case, t: dict) -> dict:
    """The case's inputs rounded to its dtypes (the ground truth evaluates exactly these values in fp64)."""
    xdt, pdt, _ = DTYPES[case.dtype]
    return {k: v.to(pdt if k in ("p1", "p2", "beta") else xdt) for k, v in t.items()}


def run(case: Case, w: dict, impl: str, fp64: bool = False) -> list[torch.Tensor]:
    """[y, dx, dp1, dp2, dβ] of ``_acon_c`` (what the modules call) on the working inputs ``w``, in the
    case's layout; under autocast for bf16 cases; or, with ``fp64``, on ``w`` converted to fp64."""
    w = {k: v.double() for k, v in w.items()} if fp64 else w
    leaf, xv = _layout(w["x"], case.layout)
    params = [w[k].clone().requires_grad_() for k in ("p1", "p2", "beta")]
    autocast = DTYPES[case.dtype][2] and not fp64
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        y = _acon_c(xv, *params, impl)
    grads = torch.autograd.grad(y, [leaf, *params], w["dy"].to(y.dtype))
    dx = grads[0].movedim(-1, 1) if case.layout == "channels_last" else grads[0]
    dx = dx[..., 0] if case.layout == "strided" else dx
    return [y.detach(), dx, *grads[1:]]


def exact(w: dict, per_sample: bool) -> list[list[torch.Tensor]]:
    """The ground truth for accuracy: [y, dx, dp1, dp2, dβ] differentiated by hand in fp64 with σ'(z) formed
    as e^-|z|/(1 + e^-|z|)² (the paper form's autograd in fp64 rounds σ' to 0 beyond |z| ≈ 37), and per
    entry the sum of the absolute values of its terms (its conditioning) and that sum with σ and σ' taken
    as 1 (it bounds what an absolute error of σ or σ' costs), all flattened. u = (p1 - p2)·x is exact in
    fp64 for fp32/bf16 inputs."""
    x, p1, p2, beta, dy = (w[k].double() for k in ("x", "p1", "p2", "beta", "dy"))
    view = lambda p: p.reshape(p.shape[:2] + (1,) * (x.dim() - 2))  # noqa: E731
    p1, p2, beta = view(p1), view(p2), view(beta)
    d = p1 - p2
    u = d * x
    z = beta * u
    s = torch.sigmoid(z)
    e = torch.exp(-z.abs())
    sp = e / (1 + e) ** 2
    g = s + z * sp
    ga = s + z.abs() * sp
    rows = [0] + list(range(2, x.dim()))
    bdims = list(range(2, x.dim())) + ([] if per_sample else [0])
    total = lambda v, dims: v.sum(dims, keepdim=True) if dims else v  # noqa: E731
    values = [
        u * s + p2 * x,
        dy * (d * g + p2),
        total(dy * x * g, rows),
        total(dy * x * (1 - g), rows),
        total(dy * u * (u * sp), bdims),
    ]
    scale = [
        (u * s).abs() + (p2 * x).abs(),
        dy.abs() * (d.abs() * ga + p2.abs()),
        total((dy * x).abs() * ga, rows),
        total((dy * x).abs() * (1 + ga), rows),
        total(dy.abs() * u * (u * sp), bdims),
    ]
    under = [  # the same terms with σ and σ' taken as 1: what an absolute error in them is multiplied by
        u.abs(),
        dy.abs() * d.abs() * (1 + z.abs()),
        total((dy * x).abs() * (1 + z.abs()), rows),
        total((dy * x).abs() * (1 + z.abs()), rows),
        total(dy.abs() * u * u, bdims),
    ]
    return [[v.reshape(-1) for v in vs] for vs in (values, scale, under)]


def pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    t = t.double()
    return t.isnan().int() + 2 * t.isposinf().int() + 3 * t.isneginf().int()


def limit_form(w: dict) -> torch.Tensor:
    """(p1 - p2)·x·σ(β(p1 - p2)·x) + p2·x in fp64 IEEE arithmetic: the fused ops' value where x is ±Inf."""
    x, p1, p2, beta = (w[k].double() for k in ("x", "p1", "p2", "beta"))
    view = lambda p: p.reshape(p.shape[:2] + (1,) * (x.dim() - 2))  # noqa: E731
    u = (view(p1) - view(p2)) * x
    return u * torch.sigmoid(view(beta) * u) + view(p2) * x


def check_case(case: Case, floor: dict | None = None) -> None:
    """Assert the fused op's NaN/Inf pattern and accuracy against the fp64 paper form (module docstring)."""
    w = working(case, make_inputs(case))
    paper64 = run(case, w, "reference", fp64=True)
    paper = run(case, w, "reference")
    fused = run(case, w, "fused")
    xinf = w["x"].double().isinf().reshape(-1)
    out_dtypes = [w["x"].dtype, w["x"].dtype, w["p1"].dtype, w["p2"].dtype, w["beta"].dtype]
    truths, scales, unders = exact(w, case.per_sample)
    tiny = torch.finfo(torch.float64 if case.dtype == "fp64" else torch.float32).tiny
    rows = zip(NAMES, fused, paper, paper64, truths, scales, unders, out_dtypes, strict=True)
    for name, f, p, p64, tr, sc, under, odt in rows:
        assert f.dtype == p.dtype == odt and f.shape == p64.shape, f"{name}: {f.dtype} {f.shape} ({case})"
        f, p, p64 = f.reshape(-1), p.reshape(-1), p64.reshape(-1)
        tr = torch.where(tr.isfinite(), tr, p64)
        want = pattern(p64)
        if name == "y":  # the documented exception: x = ±Inf gives the limit form's value
            want = torch.where(xinf, pattern(limit_form(w)).reshape(-1), want)
        # a finite truth whose terms overflow the working precision: the paper form is not finite there
        # either, and the fused op need not be
        overflow = (want == 0) & ~p.isfinite()
        bad = ((pattern(f) != want) & ~overflow).nonzero().reshape(-1)
        assert bad.numel() == 0, (
            f"{name}: NaN/Inf pattern differs at {bad[:5].tolist()}: fused {f[bad[:5]].tolist()}, "
            f"paper fp64 {p64[bad[:5]].tolist()} ({case})"
        )
        fin = (want == 0) & f.isfinite()
        f, p, tr = f[fin].double(), p[fin].double(), tr[fin]
        sc, under = sc[fin].nan_to_num(0.0, 0.0, 0.0), under[fin].nan_to_num(0.0, 0.0, 0.0)
        err_f = (f - tr).abs()
        err_p = torch.where(p.isfinite(), (p - tr).abs(), torch.inf)
        # rounding of the result's dtype, plus σ and σ' resolved only to the smallest normal number
        allowed = 4 * err_p + (floor or FLOOR)[odt] * sc + 4 * tiny * under + tiny
        worst = (err_f - allowed).argmax() if err_f.numel() else None
        assert worst is None or err_f[worst] <= allowed[worst], (
            f"{name}: fused {f[worst].item()!r} vs exact {tr[worst].item()!r} (paper {p[worst].item()!r}, "
            f"scale {sc[worst].item():.3g}) ({case})"
        )


def cases(n: int, seed: int = SEED, dtypes=("fp32", "fp64", "bf16-autocast")) -> list[Case]:
    rng = random.Random(seed)
    return [draw_case(rng, dtypes) for _ in range(n)]


# ---- backends ---------------------------------------------------------------------------------------

WIDTH_FLAGS = {"native": "", "avx2": "-mno-avx512f", "sse": "-mno-avx"}
X86 = platform.machine() in ("x86_64", "AMD64")


@pytest.fixture
def counted(monkeypatch):
    """Calls into the C++ kernels, so a silent fallback to another path fails the test."""
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        fn = getattr(native, name)

        def wrapper(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(native, name, wrapper)
    return calls


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


def test_fuzz_inductor(mode):
    """The compiled formulas (what serves when the C++ kernels are off: ACON_FUSED_NO_NATIVE=1); one
    variant in the default suite since each costs a compile."""
    if not cpu.compile_supported():
        pytest.skip("no C compiler for torch.compile")
    mode("compiled")
    picked = [
        c
        for c in cases(200)
        if c.dtype == "fp32" and c.layout != "channels_last" and not c.per_sample and len(c.shape) == 4
    ]
    for case in picked[:4]:
        check_case(case)


@pytest.mark.slow
def test_fuzz_inductor_many(mode):
    if not cpu.compile_supported():
        pytest.skip("no C compiler for torch.compile")
    mode("compiled")
    for case in cases(300, seed=SEED + 2):
        check_case(case)


# ---- Triton kernels through the interpreter (a subprocess: the interpreter is chosen at import) ------


def _interpreter_run(selection: str, marks: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", ACON_FUSED_CPU_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", marks, "-k", selection, __file__]
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
    for case in cases(12, seed=SEED + 3):
        check_case(case, INTERPRETER_FLOOR)
    assert triton_counted["forward"] >= 12 and triton_counted["backward"] >= 12


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
