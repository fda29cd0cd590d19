"""What a run dir holds when a run starts: a previous run's outputs set aside, a resumed run's checkpoints."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from acon import checkpoint as ckpt

PREVIOUS_OUTPUTS = ("tb", "metrics.jsonl", "results.json", "last.pt", "best.pt")


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move an earlier run's TensorBoard events, metrics, results and checkpoints into ``previous-<time>/``.

    Called when a run starts from scratch (``resume=none``, or no checkpoint) in a run dir that already
    holds outputs, so the new curves do not overlap the old ones and no stale ``results.json`` remains.
    """
    run_dir = Path(run_dir)
    old = [run_dir / n for n in PREVIOUS_OUTPUTS if (run_dir / n).exists()]
    old += sorted(run_dir.glob("step_*.pt"))
    if not old:
        return None
    base = time.strftime("previous-%Y%m%d-%H%M%S")
    dest, n = run_dir / base, 1
    while dest.exists():
        dest, n = run_dir / f"{base}.{n}", n + 1
    dest.mkdir()
    for path in old:
        path.rename(dest / path.name)
    print(
        f"acon: starting afresh in {run_dir}; the previous run's {', '.join(p.name for p in old)} "
        f"moved to {dest}",
        file=sys.stderr,
        flush=True,
    )
    return dest


def carry_over_checkpoints(source: Path, run_dir: Path, best_step: int | None) -> list[Path]:
    """Give a run dir resumed from another folder's checkpoint its own last.pt, and best.pt if known.

    last.pt becomes a copy of ``source``. best.pt is the source folder's best.pt when it is the
    checkpoint of ``best_step`` (the resumed run's best), or ``source`` itself when that is; otherwise
    the next new best writes it. Without this, resuming a finished run into a new dir left neither file.
    """
    source, run_dir = Path(source), Path(run_dir)
    if source.parent.resolve() == run_dir.resolve():
        return []
    written = [ckpt.atomic_copy(source, run_dir / "last.pt")]
    candidates = [source.parent / "best.pt", source]
    for path in candidates:
        if best_step is not None and path.is_file() and _step_of(path) == best_step:
            written.append(ckpt.atomic_copy(path, run_dir / "best.pt"))
            break
    print(
        f"acon: resumed from {source}; wrote {', '.join(str(p) for p in written)}",
        file=sys.stderr,
        flush=True,
    )
    return written


def _step_of(path: Path) -> int | None:
    """The training step a checkpoint was saved at (None if it is not readable)."""
    try:
        return ckpt.load_checkpoint(path, mmap=True)["progress"]["step"]
    except (ckpt.CheckpointError, KeyError, TypeError):
        return None
