"""β of ACON-C vs Meta-ACON from trained checkpoints (the paper's per-sample β figure).

python scripts/plot_beta.py runs/x-acon_c-s0/last.pt runs/x-meta_acon-s0/last.pt --out figures/
  → beta_last_site.png: β over the channels of the last ACON site (the last bottleneck's ``acon`` in a
    ResNet, the last ACON layer otherwise) for 7 random validation images, one panel per checkpoint;
    with ACON-C every image shares one β distribution, with Meta-ACON each image gets its own.
  → beta_layers.png / beta_layers.csv: per layer, mean ± std of the learned p1, p2 and β.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.activations import AconC, MetaAconC  # noqa: E402
from acon.checkpoint import CheckpointError  # noqa: E402

LABELS = {"acon_c": "ACON-C", "meta_acon": "Meta-ACON"}


def load_model(path: Path, data_root: str | None = None):
    """(model in eval mode, resolved config) from a full-state checkpoint written by the trainer."""
    from omegaconf import OmegaConf

    from acon.builders import build_model
    from acon.checkpoint import load_checkpoint, load_model_state

    state = load_checkpoint(path)
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a trainer checkpoint (no 'config'/'model' entries)")
    cfg = OmegaConf.create(state["config"])
    if data_root:
        cfg.data.root = data_root
    model = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
    load_model_state(model, state["model"], str(path))
    return model.eval(), cfg


def acon_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every ACON-C / Meta-ACON module, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AconC, MetaAconC))]


def validation_images(cfg, count: int, seed: int) -> torch.Tensor:
    """``count`` random validation images (fixed by ``seed``) through the run's own val transform."""
    from acon.data import build_datasets

    _, val = build_datasets(cfg.data)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(val), generator=g)[: count * 2].tolist()
    images = [item[0] for item in (val[i] for i in picks) if item is not None][:count]
    if len(images) < count:
        raise ValueError(f"the validation set of {cfg.data.name} has fewer than {count} readable images")
    return torch.stack(images)


@torch.no_grad()
def layer_betas(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """β per ACON layer as (images, channels): learned (shared by all images) or generated (Meta-ACON)."""
    layers, out, hooks = acon_layers(model), {}, []
    for name, mod in layers:
        if isinstance(mod, MetaAconC):

            def hook(m, inp, _out, name=name):
                out[name] = m.generate_beta(inp[0]).flatten(1).float()

            hooks.append(mod.register_forward_hook(hook))
    model(images)
    for h in hooks:
        h.remove()
    for name, mod in layers:
        if isinstance(mod, AconC):
            out[name] = mod.beta.detach().flatten().float().expand(len(images), -1)
    return {name: out[name] for name, _ in layers}


def summarize(model: torch.nn.Module, betas: dict[str, torch.Tensor]) -> list[dict]:
    """Per layer: mean and std over channels of p1 and p2, and of β over channels and images."""
    rows = []
    for i, (name, mod) in enumerate(acon_layers(model)):
        p1, p2, b = mod.p1.detach().flatten(), mod.p2.detach().flatten(), betas[name]
        rows.append(
            {
                "layer": i,
                "name": name,
                "channels": p1.numel(),
                "p1_mean": p1.mean().item(),
                "p1_std": p1.std().item(),
                "p2_mean": p2.mean().item(),
                "p2_std": p2.std().item(),
                "beta_mean": b.mean().item(),
                "beta_std": b.std().item(),
                "beta_std_across_images": b.std(0).mean().item() if len(b) > 1 else 0.0,
            }
        )
    return rows


def plot(results: list[dict], out: Path) -> list[Path]:
    """beta_last_site.png (violins per image, one panel per checkpoint) and beta_layers.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results, strict=True):
        beta = r["last_beta"]
        ax.violinplot([b.numpy() for b in beta], showmedians=True)
        ax.set_xticks(range(1, len(beta) + 1))
        ax.set_xlabel("validation image")
        ax.set_title(f"{LABELS.get(r['activation'], r['activation'])}: {r['model']} {r['site']}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("β over channels")
    fig.tight_layout()
    fig.savefig(out / "beta_last_site.png", dpi=120)
    plt.close(fig)

    fig = plot_layers(results)
    legend = fig.axes[0].get_legend()
    fig.savefig(out / "beta_layers.png", dpi=120, bbox_inches="tight", bbox_extra_artists=[*fig.axes, legend])
    plt.close(fig)
    return [out / "beta_last_site.png", out / "beta_layers.png"]


def plot_layers(results: list[dict]):
    """beta_layers.png's figure: p1, p2 and β per layer, one line per checkpoint with a ±std band over
    channels (lines, not overlapping error bars, so two checkpoints stay readable); legend below."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))
    for i, r in enumerate(results):
        label = f"{LABELS.get(r['activation'], r['activation'])} ({r['path'].parent.name})"
        xs = [row["layer"] for row in r["rows"]]
        for ax, key in zip(axes, ("p1", "p2", "beta"), strict=True):
            mean = [row[f"{key}_mean"] for row in r["rows"]]
            std = [row[f"{key}_std"] for row in r["rows"]]
            ax.plot(xs, mean, marker="o", ms=3, lw=1.5, color=f"C{i}", label=label)
            lo, hi = (
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
            )
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15, lw=0)
    for ax, key in zip(axes, ("p1", "p2", "β"), strict=True):
        ax.set_title(f"{key} per layer: mean over channels, band ± std", fontsize=10)
        ax.set_xlabel("ACON layer index (input → output)")
        ax.axhline(0 if key != "β" else 1, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    legend = axes[0].legend(
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        bbox_transform=fig.transFigure,
        ncol=len(results),
        frameon=False,
        fontsize=9,
    )
    legend.set_in_layout(False)
    return fig


def main(argv: list[str] | None = None) -> int:
    """Plot the β figures for the given checkpoints; 2 on an unusable checkpoint."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("."), help="output folder")
    ap.add_argument("--images", type=int, default=7, help="random validation images (paper: 7)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the image draw")
    ap.add_argument("--data-root", default=None, help="override the checkpoint's data.root")
    args = ap.parse_args(argv)
    results = []
    try:
        for path in args.checkpoints:
            model, cfg = load_model(path, args.data_root)
            layers = acon_layers(model)
            if not layers:
                raise CheckpointError(f"{path}: {cfg.activation.name} model has no ACON-C / Meta-ACON layer")
            betas = layer_betas(model, validation_images(cfg, args.images, args.seed))
            site = layers[-1][0]
            rows = summarize(model, betas)
            results.append(
                {"path": path, "activation": str(cfg.activation.name), "model": str(cfg.model.name)}
                | {"site": site, "last_beta": betas[site], "rows": rows}
            )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in plot(results, args.out):
        print(p)
    with open(args.out / "beta_layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["checkpoint", "activation", *results[0]["rows"][0]])
        w.writeheader()
        for r in results:
            for row in r["rows"]:
                w.writerow({"checkpoint": str(r["path"]), "activation": r["activation"], **row})
    for r in results:
        spread = r["rows"][-1]["beta_std_across_images"]
        print(f"{r['path']}: {r['activation']} last site {r['site']}: β std across images {spread:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
