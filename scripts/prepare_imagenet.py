"""Turn ImageNet's official flat validation folder into class folders (val/<wnid>/<file>).

The official layout is 50,000 files ILSVRC2012_val_000NNNNN.JPEG in one folder plus labels in one of:
  * LOC_val_solution.csv (``ImageId,PredictionString``; the wnid is the first word of PredictionString);
  * a text file with one wnid per line, in file-number order;
  * the devkit's ILSVRC2012_validation_ground_truth.txt (ILSVRC2012_ID per line) with --synsets, a text
    file listing the 1000 wnids in ILSVRC2012_ID order (1-based).

Usage: python scripts/prepare_imagenet.py VAL_DIR LABELS [--synsets FILE] [--out OUT] [--mode move|copy|symlink]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path

WNID = re.compile(r"^n\d{8}$")


def read_labels(labels: Path, synsets: Path | None) -> dict[str, str]:
    """Map image stem (ILSVRC2012_val_00000001) → wnid, from any of the supported label files."""
    text = labels.read_text().strip()
    if not text:
        raise ValueError(f"{labels}: empty label file")
    first = text.splitlines()[0]
    if first.startswith("ImageId"):
        with open(labels, newline="") as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if all(WNID.match(ln) for ln in lines):
        wnids = lines
    elif all(ln.isdigit() for ln in lines):
        if synsets is None:
            raise ValueError(
                f"{labels} holds class numbers; pass --synsets with the wnids in ILSVRC2012_ID order"
            )
        table = [ln.split()[0] for ln in synsets.read_text().splitlines() if ln.strip()]
        wnids = []
        for n, ln in enumerate(lines, 1):
            idx = int(ln)
            if not 1 <= idx <= len(table):
                raise ValueError(f"{labels}:{n}: class id {idx} outside 1..{len(table)} of {synsets}")
            wnids.append(table[idx - 1])
    else:
        bad = next(ln for ln in lines if not (WNID.match(ln) or ln.isdigit()))
        raise ValueError(f"{labels}: unrecognised label line {bad!r} (expected a wnid, a class id or CSV)")
    return {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(wnids, 1)}


def place(src: Path, dst: Path, mode: str) -> None:
    """Move, copy or symlink one file."""
    if mode == "move":
        os.replace(src, dst)
    elif mode == "copy":
        shutil.copy2(src, dst)
    else:
        dst.symlink_to(src.resolve())


def prepare(
    val_dir: Path, labels: Path, out: Path | None = None, synsets: Path | None = None, mode: str = "move"
) -> dict[str, int]:
    """Sort every image of ``val_dir`` into out/<wnid>/; returns images per class. Fails before moving
    anything if an image has no label or a label has no image."""
    out = out or val_dir
    mapping = read_labels(labels, synsets)
    images = sorted(
        p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png")
    )
    unlabeled = [p.name for p in images if p.stem not in mapping]
    if unlabeled:
        raise ValueError(
            f"{len(unlabeled)} images in {val_dir} have no label in {labels}, e.g. {unlabeled[:3]}"
        )
    missing = sorted(set(mapping) - {p.stem for p in images})
    if missing:
        raise ValueError(f"{len(missing)} labelled images are missing from {val_dir}, e.g. {missing[:3]}")
    counts: dict[str, int] = {}
    for p in images:
        wnid = mapping[p.stem]
        (out / wnid).mkdir(parents=True, exist_ok=True)
        place(p, out / wnid / p.name, mode)
        counts[wnid] = counts.get(wnid, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("val_dir", type=Path)
    ap.add_argument("labels", type=Path)
    ap.add_argument("--synsets", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="destination (default: in place)")
    ap.add_argument("--mode", choices=("move", "copy", "symlink"), default="move")
    args = ap.parse_args(argv)
    try:
        counts = prepare(args.val_dir, args.labels, args.out, args.synsets, args.mode)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{sum(counts.values())} images into {len(counts)} class folders under {args.out or args.val_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
