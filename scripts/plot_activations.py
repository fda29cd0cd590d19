"""Seed figures of ACON-C and its first derivative, computed from the reference implementation.

Usage: python scripts/plot_activations.py --out docs/figures [--dpi 100]

Writes acon_c_beta.png (ACON-C for several β with the max and mean limits) and acon_c_panels.png
(ACON-C for several (p1, p2); its derivative for several β; its derivative for several (p1, p2)).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/plot_activations.py` from a checkout
    sys.path.insert(0, str(ROOT))

from acon.functional import acon_c_reference  # noqa: E402

BETAS = (0.1, 1.0, 10.0, 100.0)
PAIRS = ((1.0, 0.0), (1.2, -0.8), (1.0, 0.25), (0.5, -1.5))
DERIV_MAX, DERIV_MIN = 1.0998, -0.0998  # max / min of d/dz [z·σ(z)], giving the derivative bounds


def acon_c_curve(x: torch.Tensor, p1: float, p2: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ACON-C and its first derivative in x (by autograd through the reference form), as float64."""
    x = x.detach().double().requires_grad_(True)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    y = acon_c_reference(x, t(p1), t(p2), t(beta))
    (dy,) = torch.autograd.grad(y.sum(), x)
    return y.detach(), dy


def plot_beta_sweep(path: Path, dpi: int, p1: float = 1.2, p2: float = -0.8) -> None:
    """ACON-C with fixed (p1, p2) for several β, with max(p1·x, p2·x) and the mean as references."""
    x = torch.linspace(-2, 2, 2001, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.plot(x, torch.maximum(p1 * x, p2 * x), "k--", lw=2.5, label="max(p1·x, p2·x)  (β → ∞)")
    ax.plot(x, (p1 + p2) / 2 * x, "--", color="grey", lw=2.5, label="(p1+p2)/2 · x  (β → 0)")
    for beta in BETAS:
        y, _ = acon_c_curve(x, p1, p2, beta)
        ax.plot(x, y, lw=1.4, label=f"β = {beta:g}")
    ax.set(xlabel="x", ylabel="ACON-C(x)", title=f"ACON-C, p1 = {p1:g}, p2 = {p2:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _bounds(ax, p1: float, p2: float, color: str) -> None:
    for c1, c2 in ((DERIV_MAX, DERIV_MIN), (DERIV_MIN, DERIV_MAX)):
        ax.axhline(c1 * p1 + c2 * p2, color=color, ls=":", lw=0.9)


def plot_panels(path: Path, dpi: int, beta: float = 1.0, p1: float = 1.2, p2: float = -0.8) -> None:
    """Three panels: ACON-C for several (p1, p2); its derivative for several β and several (p1, p2)."""
    x = torch.linspace(-6, 6, 6001, dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for (a, b), color in zip(PAIRS, colors, strict=False):
        y, _ = acon_c_curve(x, a, b, beta)
        axes[0].plot(x, y, color=color, label=f"p1={a:g}, p2={b:g}")
    axes[0].set(title=f"ACON-C, β = {beta:g}", ylabel="f(x)")

    for value, color in zip(BETAS, colors, strict=False):
        _, dy = acon_c_curve(x, p1, p2, value)
        axes[1].plot(x, dy, color=color, label=f"β = {value:g}")
    _bounds(axes[1], p1, p2, "k")
    axes[1].set(title=f"d/dx ACON-C, p1 = {p1:g}, p2 = {p2:g} (dotted: bounds)", ylabel="f'(x)")

    for (a, b), color in zip(PAIRS, colors, strict=False):
        _, dy = acon_c_curve(x, a, b, beta)
        axes[2].plot(x, dy, color=color, label=f"p1={a:g}, p2={b:g}")
        _bounds(axes[2], a, b, color)
    axes[2].set(title=f"d/dx ACON-C, β = {beta:g} (dotted: bounds)", ylabel="f'(x)")

    for ax in axes:
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    """Write both figures into ``--out`` and return their paths."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures", help="output directory")
    parser.add_argument("--dpi", type=int, default=100, help="resolution of the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / "acon_c_beta.png", args.out / "acon_c_panels.png"]
    plot_beta_sweep(paths[0], args.dpi)
    plot_panels(paths[1], args.dpi)
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
