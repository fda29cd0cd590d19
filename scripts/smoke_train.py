"""Training smoke run: ShuffleNetV2 0.5x for N steps per activation and input pipeline, step times vs ReLU.

Builds a synthetic ImageFolder (10 classes of generated JPEGs, hard-linked up to one epoch of ``--steps``
batches, so no epoch ends early), then runs ``python train.py`` once per (pipeline, activation) and reads
each run's ``results.json``. Prints a markdown table: time per step (from the run's images/s, which
includes its first steps) and the ratio to ReLU on the same pipeline; records fallbacks a run reported.
Each row is printed as soon as its run ends.
Exit status 1 if any run failed::

    python scripts/smoke_train.py --device cuda                      # 200 steps, 224 px, batch 64
    python scripts/smoke_train.py --device cpu --steps 2 --batch 4 --img 32 --pipelines reference gpu
    python scripts/smoke_train.py --dry-run                          # print the commands only
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("relu", "swish", "acon_c", "meta_acon")  # the default: the paper's four
CONFIGS = tuple(
    sorted(f.stem for f in (ROOT / "configs" / "activation").glob("*.yaml") if f.stem != "base_activation")
)
PIPELINES = ("reference", "fast", "gpu")
CLASSES, DISTINCT = 10, 8  # distinct JPEGs per class; the rest are hard links to them


def build_folder(root: Path, n_train: int, n_val: int, size: int) -> Path:
    """root/{train,val}/<class>/*.JPEG: smooth class-coloured JPEGs, reused when already complete."""
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{n_train} {n_val} {size}":
        return root
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, total in (("train", n_train), ("val", n_val)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            sources = []
            for i in range(-(-total // CLASSES)):
                path = folder / f"{split}_{c}_{i}.JPEG"
                if path.exists():
                    continue
                if i < DISTINCT:
                    base = np.zeros((size + 32, size + 48, 3), np.float32)
                    base[..., c % 3] = 60 + 15 * c
                    img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                    Image.fromarray(img).save(path, quality=90)
                    sources.append(path)
                else:
                    os.link(sources[i % DISTINCT], path)
    marker.write_text(f"{n_train} {n_val} {size}")
    return root


def train_command(args: argparse.Namespace, data: Path, pipeline: str, activation: str) -> list[str]:
    """The ``train.py`` command of one smoke run."""
    trainer = ["trainer=gpu"] if args.device == "cuda" else ["trainer.device=cpu"]
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "model=shufflenetv2_x0_5",
        f"activation={activation}",
        "data=folder",
        f"data.root={data}",
        f"data.num_classes={CLASSES}",
        f"data.img_size={args.img}",
        f"data.val_transform.resize={int(args.img * 1.15)}",
        f"data.pipeline={pipeline}",
        f"data.num_workers={args.workers}",
        f"recipe.batch_size={args.batch}",
        f"recipe.base_batch_size={args.batch}",
        f"recipe.iterations={args.steps}",
        "recipe.warmup_steps=0",
        *trainer,
        f"trainer.eval_batch_size={args.batch}",
        "trainer.progress=false",
        "resume=none",
        f"out_dir={args.out / 'runs'}",
        f"run_name={pipeline}-{activation}",
    ]


def run_one(cmd: list[str], run_dir: Path, timeout: int) -> dict:
    """Run one training; its results.json (with ``error`` set when it failed)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    results = run_dir / "results.json"
    if proc.returncode != 0 or not results.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return {**json.loads(results.read_text()), "process_s": wall}


TABLE_HEADER = [
    "| pipeline | activation | ms/step | vs ReLU | final top-1 err | fallbacks |",
    "|---|---|---|---|---|---|",
]


def table_row(rows: list[tuple[str, str, dict]], batch: int) -> str:
    """The markdown row of the last run in ``rows`` (ReLU on its pipeline, run first, is the baseline)."""
    p, a, r = rows[-1]
    if "error" in r:
        return f"| {p} | {a} | failed | - | - | {r['error']} |"
    step_ms = {
        (q, b): 1000 * batch / s["images_per_s"] for q, b, s in rows if "error" not in s and s["images_per_s"]
    }
    relu = step_ms.get((p, "relu"))
    ratio = f"{step_ms[(p, a)] / relu:.2f}x" if relu else "-"
    fb = "; ".join(f"{k}: {v}" for k, v in r.get("fallbacks", {}).items()) or "none"
    return f"| {p} | {a} | {step_ms[(p, a)]:.1f} | {ratio} | {r['top1_err']:.1f} % | {fb} |"


def table(rows: list[tuple[str, str, dict]], batch: int) -> list[str]:
    """Markdown rows: pipeline, activation, ms per step, ratio to ReLU on the same pipeline, fallbacks."""
    return TABLE_HEADER + [table_row(rows[: i + 1], batch) for i in range(len(rows))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--activations", nargs="+", choices=CONFIGS, default=list(ACTIVATIONS), metavar="NAME")
    ap.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/acon-smoke"), help="data and run folders")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per run")
    ap.add_argument("--dry-run", action="store_true", help="print the train.py commands and stop")
    args = ap.parse_args(argv)
    activations = ["relu"] + [a for a in args.activations if a != "relu"]  # the baseline first
    data = args.out / "data"
    jobs = [(p, a, train_command(args, data, p, a)) for p in args.pipelines for a in activations]
    if args.dry_run:
        for *_, cmd in jobs:
            print(shlex.join(cmd))
        return 0
    build_folder(data, args.batch * (args.steps + 1), max(args.batch, CLASSES), args.img)
    print(f"smoke: ShuffleNetV2 0.5x, {args.steps} steps, batch {args.batch}, {args.img} px on {args.device}")
    print("\n".join(TABLE_HEADER), flush=True)
    rows = []
    for p, a, cmd in jobs:  # each row as soon as its run ends: a later timeout loses nothing
        rows.append((p, a, run_one(cmd, args.out / "runs" / f"{p}-{a}", args.timeout)))
        print(table_row(rows, args.batch), flush=True)
    print(f"smoke: runs in {args.out / 'runs'}")
    return 1 if any("error" in r for *_, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
