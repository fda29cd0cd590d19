"""Start-up at ImageNet scale: time from launch to the first training step, cold, warm and torchvision.

Builds (once, kept for reuse unless ``--remove``) an ImageNet-shaped tree in a scratch folder: 1000
class folders with 1,281,167 train and 50,000 val entries, all hard links to a few small real JPEGs, so
it costs directory entries, not disk (27 source files, 50,000 links each at most) (``--scale 0.01`` builds 1 % of it, for a quick check). Then each
variant runs in a fresh Python process that imports the suite, builds the train and val datasets, a
DataLoader with workers and ShuffleNetV2 0.5x, and trains one step:

- ``cold``: the suite's loader with no file index yet (it lists both splits and writes the index);
- ``warm``: the same again, reading the index;
- ``torchvision``: ``torchvision.datasets.ImageFolder`` for both splits in place of the suite's.

Everything else is identical, so the differences are the file listing. The kernel's directory cache is
warm for all three (the tree was just built or listed). Prints a table with the index/scan phase on
its own, and ends with ``startup: cold <s> s, warm <s> s, torchvision ImageFolder <s> s``::

    python scripts/bench_startup.py                 # full size under /tmp/acon-startup-bench
    python scripts/bench_startup.py --scale 0.01 --root /tmp/small --remove
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TRAIN_FILES, VAL_FILES, CLASSES = 1_281_167, 50_000, 1000
MODES = ("cold", "warm", "torchvision")
LINKS_PER_FILE = 50_000  # ext4 allows 65,000 hard links to one file


def tree_shape(scale: float) -> tuple[int, int, int]:
    """(classes, train files, val files) at ``scale`` of ImageNet-1k."""
    return (
        max(2, round(CLASSES * scale)),
        max(2, round(TRAIN_FILES * scale)),
        max(2, round(VAL_FILES * scale)),
    )


def build_tree(root: Path, scale: float) -> Path:
    """root/{train,val}/<wnid-like class>/<name>.JPEG as hard links to a few real JPEGs; reused if complete."""
    classes, n_train, n_val = tree_shape(scale)
    marker = root / ".complete"
    shape = f"{classes} {n_train} {n_val}"
    if marker.is_file() and marker.read_text() == shape:
        print(f"bench_startup: reusing the tree in {root} ({classes} classes, {n_train:,} + {n_val:,} files)")
        return root
    if root.exists():
        shutil.rmtree(root)
    import numpy as np
    from PIL import Image

    src = root / "_src"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = []
    for i in range(max(4, -(-(n_train + n_val) // LINKS_PER_FILE))):  # file systems cap links per file
        img = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        sources.append(src / f"img{i}.JPEG")
        Image.fromarray(img).save(sources[-1], quality=90)
    t0 = time.perf_counter()
    for split, total in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            count = total // classes + (c < total % classes)
            for i in range(count):
                os.link(sources[i % len(sources)], folder / f"n{c:08d}_{i}.JPEG")
    marker.write_text(shape)
    secs = time.perf_counter() - t0
    print(
        f"bench_startup: built {root} ({classes} classes, {n_train:,} + {n_val:,} hard links) in {secs:.0f} s"
    )
    return root


def child(mode: str, root: Path, launched: float, workers: int) -> None:
    """One launch: import, build both datasets, a loader and the model, train one step; print timings."""
    import torch
    import torchvision
    from omegaconf import OmegaConf

    import models
    from acon.data.build import build_datasets, build_train_loader
    from acon.data.transforms import train_transform, val_transform

    imports = time.time() - launched
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "imagenet.yaml")
    classes = len([d for d in os.scandir(root / "train") if d.is_dir()])
    overrides = dict(root=str(root), num_classes=classes, img_size=64, num_workers=workers)
    cfg.merge_with(dict(overrides, index_cache_dir=str(root / "_index")))
    t_index = time.time()
    if mode == "torchvision":
        ImageFolder = torchvision.datasets.ImageFolder
        train = ImageFolder(str(root / "train"), train_transform(64))
        val = ImageFolder(str(root / "val"), val_transform(64, 73))
    else:
        train, val = build_datasets(cfg)
        assert train.index_source == ("scan" if mode == "cold" else "cache"), train.index_source
    t_index = time.time() - t_index
    assert len(train) == tree_shape_from(root)[1], len(train)
    loader = build_train_loader(train, cfg, 64, 0, 1, 0)
    model = models.create_model("shufflenetv2_x0_5", activation="relu", num_classes=classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images, targets, _ = next(iter(loader))
    torch.nn.functional.cross_entropy(model(images), targets).backward()
    opt.step()
    first_step = time.time() - launched
    print(
        json.dumps(
            {
                "mode": mode,
                "first_step_s": first_step,
                "index_s": t_index,
                "imports_s": imports,
                "val": len(val),
            }
        )
    )


def tree_shape_from(root: Path) -> list[int]:
    """(classes, train files, val files) recorded when the tree was built."""
    return [int(v) for v in (root / ".complete").read_text().split()]


def run_child(mode: str, root: Path, workers: int) -> dict:
    """Launch one variant in a fresh interpreter and return its timings."""
    cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--workers", str(workers)]
    launched = time.time()
    res = subprocess.run(
        [*cmd, "--launched", repr(launched)], capture_output=True, text=True, cwd=ROOT, timeout=3600
    )
    if res.returncode != 0:
        raise SystemExit(f"error: the {mode} launch failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def load_note() -> str:
    """CPU count and load average, for the header (the machine may be shared)."""
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load} (1/5/15 min)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/acon-startup-bench"), help="scratch folder")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of ImageNet's size (1.0: full)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--repeats", type=int, default=1, help="launches per variant (the fastest is kept)")
    ap.add_argument("--remove", action="store_true", help="delete the tree afterwards")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.root, args.launched, args.workers)
    if not 0 < args.scale <= 1:
        raise SystemExit(f"error: --scale={args.scale} must be in (0, 1]")
    print(f"bench_startup: {platform.processor() or platform.machine()}, {load_note()}")
    root = build_tree(args.root.expanduser(), args.scale)
    best: dict[str, dict] = {}
    try:
        for _ in range(args.repeats):
            shutil.rmtree(root / "_index", ignore_errors=True)
            for mode in MODES:
                r = run_child(mode, root, args.workers)
                if mode not in best or r["first_step_s"] < best[mode]["first_step_s"]:
                    best[mode] = r
        report(best, root)
    finally:
        if args.remove:
            shutil.rmtree(root, ignore_errors=True)
            print(f"bench_startup: removed {root}")


def report(best: dict[str, dict], root: Path) -> None:
    """The table, the target check and the summary line."""
    classes, n_train, n_val = tree_shape_from(root)
    print(f"\ntree: {classes} classes, {n_train:,} train + {n_val:,} val files ({root})")
    print(f"after: {load_note()}\n")
    print("| launch | to first training step (s) | file listing / index of both splits (s) | imports (s) |")
    print("|---|---|---|---|")
    for mode in MODES:
        r = best[mode]
        print(f"| {mode} | {r['first_step_s']:.2f} | {r['index_s']:.2f} | {r['imports_s']:.2f} |")
    cold, warm, tv = (best[m]["first_step_s"] for m in MODES)
    ci, wi, ti = (best[m]["index_s"] for m in MODES)
    print(
        f"\nwarm vs torchvision: {tv / warm:.1f}x faster to the first step, {ti / wi:.1f}x on the listing; "
        f"cold vs torchvision: {tv / cold:.2f}x to the first step, {ti / ci:.2f}x on the listing"
    )
    print(f"startup: cold {cold:.2f} s, warm {warm:.2f} s, torchvision ImageFolder {tv:.2f} s")


if __name__ == "__main__":
    main()
