"""Turn ImageNet's official flat validation folder into class folders (val/<wnid>/<file>).

The official layout is 50,000 files ILSVRC2012_val_000NNNNN.JPEG in one folder plus labels in one of:
  * LOC_val_solution.csv (``ImageId,PredictionString``; the wnid is the first word of PredictionString);
  * a text file with one wnid per line, in file-number order;
  * the devkit's ILSVRC2012_validation_ground_truth.txt (ILSVRC2012_ID per line) with --synsets, a text
    file listing the 1000 wnids in ILSVRC2012_ID order (1-based).

Usage: python scripts/prepare_imagenet.py VAL_DIR LABELS [--synsets FILE] [--out OUT] [--mode move|copy|symlink]
       [--dry-run]

Rerunning is safe: images already in their class folder are left alone, so a run that was interrupted
continues where it stopped. --dry-run only reports what would be done.
"""

from __future__ import annotations

import argparse
import csv
import errno
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
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


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DONE = {"move": "moved", "copy": "copied", "symlink": "linked"}


@dataclass
class Report:
    """What a run did (or, with ``dry_run``, would do): images placed now per class, and those already in
    place from an earlier or interrupted run."""

    placed: dict[str, int] = field(default_factory=dict)
    already: int = 0
    examples: list[str] = field(default_factory=list)


def place(src: Path, dst: Path, mode: str) -> None:
    """Move, copy or symlink one file; ``dst`` appears complete or not at all (an interrupted copy leaves
    only a hidden temp file, which the next run replaces)."""
    if mode == "symlink":
        dst.symlink_to(src.resolve())
        return
    if mode == "move":
        try:
            os.replace(src, dst)
            return
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
    tmp = dst.with_name(f".{dst.name}.part")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    if mode == "move":
        src.unlink()


def sorted_images(out: Path) -> dict[str, Path]:
    """Images already inside a class folder ``out/<wnid>/``: image stem → path."""
    found: dict[str, Path] = {}
    if not out.is_dir():
        return found
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and WNID.match(p.name)):
        for f in folder.iterdir():
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."):
                found[f.stem] = f
    return found


def check_layout(val_dir: Path, labels: Path, mapping: dict[str, str], flat: list[Path], done: dict) -> None:
    """Fail, before anything moves, on an unlabelled image, a labelled image found nowhere, or an image
    sorted into another class than its label's."""
    unlabeled = [p.name for p in flat if p.stem not in mapping]
    if unlabeled:
        raise ValueError(
            f"{len(unlabeled)} images in {val_dir} have no label in {labels}, e.g. {unlabeled[:3]}"
        )
    wrong = [str(p) for stem, p in done.items() if stem in mapping and p.parent.name != mapping[stem]]
    if wrong:
        raise ValueError(
            f"{len(wrong)} images sit in another class folder than {labels} gives them, e.g. {wrong[:3]}"
        )
    missing = sorted(set(mapping) - {p.stem for p in flat} - set(done))
    if missing:
        raise ValueError(
            f"{len(missing)} labelled images are missing from {val_dir} (neither there nor in a class "
            f"folder), e.g. {missing[:3]}"
        )


def prepare(
    val_dir: Path,
    labels: Path,
    out: Path | None = None,
    synsets: Path | None = None,
    mode: str = "move",
    dry_run: bool = False,
) -> Report:
    """Sort every image of ``val_dir`` into out/<wnid>/. Images already in their class folder (a rerun,
    or a run that was interrupted) are left as they are. Fails before placing anything if an image has
    no label, a labelled image is nowhere, or an image is in the wrong class folder."""
    out = out or val_dir
    if not val_dir.is_dir():
        raise FileNotFoundError(f"validation folder {str(val_dir)!r} does not exist")
    mapping = read_labels(labels, synsets)
    flat = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    done = sorted_images(out)
    check_layout(val_dir, labels, mapping, flat, done)
    report = Report(already=sum(stem in mapping for stem in done))
    for p in flat:
        if p.stem in done:
            continue
        wnid = mapping[p.stem]
        if len(report.examples) < 3:
            report.examples.append(f"{p} -> {out / wnid / p.name}")
        if not dry_run:
            (out / wnid).mkdir(parents=True, exist_ok=True)
            place(p, out / wnid / p.name, mode)
        report.placed[wnid] = report.placed.get(wnid, 0) + 1
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("val_dir", type=Path)
    ap.add_argument("labels", type=Path)
    ap.add_argument("--synsets", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="destination (default: in place)")
    ap.add_argument("--mode", choices=("move", "copy", "symlink"), default="move")
    ap.add_argument("--dry-run", action="store_true", help="only say what would be done")
    args = ap.parse_args(argv)
    out = args.out or args.val_dir
    try:
        report = prepare(args.val_dir, args.labels, args.out, args.synsets, args.mode, args.dry_run)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(report.placed.values())
    verb = f"would {args.mode}" if args.dry_run else DONE[args.mode]
    for line in report.examples:
        print(f"  {line}")
    print(
        f"{'dry run: ' if args.dry_run else ''}{verb} {n} images into {len(report.placed)} class folders "
        f"under {out}; {report.already} were already in their class folders"
        + ("; nothing was changed" if args.dry_run else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
