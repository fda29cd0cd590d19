"""The fuzz cases and checks of ``tests/test_fused_fuzz.py``: random ACON-C inputs, the fused op and the
paper form on them, and the comparison with the fp64 paper form and the exact value (that file's
docstring states the properties)."""

from __future__ import annotations

import contextlib
import math
import random
import zlib
from dataclasses import dataclass, field

import torch

from acon.activations import _acon_c

SEED = 20261206
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
