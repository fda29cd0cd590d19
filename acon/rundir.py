"""A run dir's life for one training command, in one place: which checkpoint it continues from and
whether it may (the identity check and ``resume_mode``), its lock (one writer at a time), a previous
run set aside or a resumed run's checkpoints carried over, and its closing.

``train()`` opens a :class:`RunDir` (checks the resume choice, takes the lock on rank 0 and tells
every rank the outcome), the :class:`~acon.trainer.Trainer` asks it which checkpoint to load and how
(:meth:`RunDir.resume_kind`), :meth:`RunDir.prepare` lays the dir out for the run, and
:meth:`RunDir.close` releases the lock.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from acon import checkpoint as ckpt
from acon.errors import ConfigError
from acon.runlock import RunDirBusy, RunLock
from acon.storage import (
    WRITE_EXIT_CODE,
    WriteFailed,
    kept_checkpoints,
    refused_writes,
    space_shortfall,
    state_bytes,
)
from acon.validate import RESUME_MODES

PREVIOUS_OUTPUTS = ("tb", "metrics.jsonl", "results.json", "last.pt", "best.pt")
NETWORK_KEYS = ("model", "activation", "num_classes", "task", "backbone")
LENGTH_KEYS = ("recipe.epochs", "recipe.iterations")
REFUSALS = (RunDirBusy, WriteFailed)  # end every rank of the run: exit 2 and WRITE_EXIT_CODE


class RunDir:
    """One training command's run dir: its resume checkpoint (and how to use it), its lock, its layout."""

    def __init__(self, cfg: DictConfig, is_main: bool = True) -> None:
        from acon.report import run_dir_of

        self.cfg, self.path, self.is_main = cfg, run_dir_of(cfg), is_main
        self.lock = RunLock(self.path)
        self.resume_from: Path | None = None

    @classmethod
    def open(cls, cfg: DictConfig, is_main: bool = True) -> RunDir:
        """Check the resume choice, take the run dir's lock (rank 0; every rank learns the outcome) and
        settle which checkpoint the run continues from. Raises on a refused resume or a busy dir."""
        run = cls(cfg, is_main)
        checked = check_resume(cfg)  # read-only: a refused resume leaves no run dir behind
        run.take_lock()
        try:
            run.resume_from = resume_path(cfg, run.path)
            if run.resume_from != checked:  # the dir changed before the lock was ours: check again
                check_resume(cfg)
        except BaseException:
            run.close()
            raise
        return run

    @classmethod
    def unlocked(cls, cfg: DictConfig, is_main: bool = True) -> RunDir:
        """The run dir without its lock and without the identity check (a Trainer built by hand)."""
        run = cls(cfg, is_main)
        run.resume_from = resume_path(cfg, run.path)
        return run

    def take_lock(self) -> None:
        """Rank 0 takes the lock; a refusal ends every rank with the same status (rank 0 prints it)."""
        refusal = None
        if self.is_main:
            try:
                self.lock.acquire()
            except REFUSALS as e:
                refusal = e
        raise_on_every_rank(refusal)
        previous = self.lock.previous
        if self.is_main and previous:
            print(
                f"acon: took over {self.path} from a run that ended without releasing it "
                f"(host {previous.get('host')}, pid {previous.get('pid')}, started {previous.get('started')})",
                file=sys.stderr,
                flush=True,
            )

    def resume_kind(self, state: dict) -> str:
        """How to use the loaded resume checkpoint: continue | extend | finetune."""
        return resume_kind(self.cfg, state)

    def prepare(self, resumed_from: Path | None, carry_over: bool, best_step: int | None) -> None:
        """Rank 0: remove dead processes' temp files; set a previous run aside (a fresh start) or give a
        run resumed from another folder its own checkpoints; write config.yaml."""
        if not self.is_main:
            return
        with refused_writes(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temp_files(self.path)
        if resumed_from is None:
            with refused_writes(self.path):
                set_aside_previous_run(self.path)
        elif carry_over:  # False for extend/finetune: they write their own checkpoints as they go
            carry_over_checkpoints(resumed_from, self.path, best_step)
        with refused_writes(self.path / "config.yaml"):
            OmegaConf.save(self.cfg, self.path / "config.yaml", resolve=True)

    def write_checkpoints(self, state: dict, step: int, best: bool) -> None:
        """Rank 0: last.pt, its step_<step>.pt copy (pruned to ``trainer.keep_step_checkpoints``) and
        best.pt when asked; raises :class:`WriteFailed` when the filesystem refuses one."""
        last = ckpt.atomic_save(state, self.path / "last.pt")
        keep = int(self.cfg.trainer.keep_step_checkpoints)
        if keep > 0:
            ckpt.atomic_copy(last, self.path / f"step_{step}.pt")
            ckpt.prune_step_checkpoints(self.path, keep)
        if best:
            ckpt.atomic_copy(last, self.path / "best.pt")

    def warn_if_short_of_space(self, model) -> str | None:
        """Rank 0, before the first step: warn when free space is below what the run keeps."""
        if not self.is_main:
            return None
        size = checkpoint_bytes(state_bytes(model.state_dict()), self.cfg.recipe)
        kept = kept_checkpoints(int(self.cfg.trainer.keep_step_checkpoints))
        warning = space_shortfall(self.path, size, kept)
        if warning:
            logging.getLogger("acon").warning(f"acon: warning: {warning}")
        return warning

    def close(self) -> None:
        """Release the lock (readers then see the run as finished or stopped)."""
        self.lock.release()


def raise_on_every_rank(refusal: BaseException | None) -> None:
    """Rank 0's refusal (a busy run dir, a refused write), raised on every rank: rank 0 raises its own,
    the others an echo that exits with the same status without repeating the line. A collective."""
    from acon import distributed

    outcome = distributed.broadcast_object(refusal and (isinstance(refusal, WriteFailed), str(refusal)))
    if refusal is not None:
        raise refusal
    if outcome:
        echo = WriteFailed(outcome[1], Path(), 0) if outcome[0] else RunDirBusy(outcome[1])
        echo.echo_of_rank0 = True
        raise echo


def checkpoint_bytes(model_state_bytes: int, recipe: DictConfig) -> int:
    """About the size of one checkpoint: the weights, SGD's momentum and the EMA copy when kept."""
    copies = 1 + (float(recipe.get("momentum") or 0) > 0) + bool(recipe.get("ema_decay"))
    return model_state_bytes * copies


def estimated_checkpoint_bytes(cfg: DictConfig) -> int:
    """:func:`checkpoint_bytes` for a config, its model built on the meta device (no memory, no data)."""
    import torch

    from acon.tasks import task_of

    with torch.device("meta"):
        model = task_of(cfg).build_model(cfg)
    return checkpoint_bytes(state_bytes(model.state_dict()), cfg.recipe)


def exit_status(e: BaseException) -> int:
    """train.py's exit status for a refusal: 2 (busy run dir), :data:`WRITE_EXIT_CODE` (refused write)."""
    return WRITE_EXIT_CODE if isinstance(e, WriteFailed) else 2


def stop_quietly_if_echo(e: BaseException) -> None:
    """Ranks other than 0 end with rank 0's status without repeating its ``error:`` line."""
    if getattr(e, "echo_of_rank0", False):
        logging.shutdown()
        sys.stdout.flush()
        os._exit(exit_status(e))


# ---------------------------------------------------------------- which checkpoint, and may it


def keys_differ(keys: list[str]) -> str:
    """``"a differs"`` or ``"a, b differ"``: the keys of an identity difference, for an error message."""
    return f"{', '.join(keys)} {'differs' if len(keys) == 1 else 'differ'}"


def identity_diff(mine: dict, theirs) -> list[str]:
    """The identity keys in which a checkpoint differs from this run (recipe keys as ``recipe.<key>``)."""
    if not isinstance(theirs, dict):
        return list(mine)
    diff = []
    for key in [*mine, *(k for k in theirs if k not in mine)]:
        a, b = mine.get(key), theirs.get(key)
        if key == "recipe" and isinstance(a, dict) and isinstance(b, dict):
            diff += [f"recipe.{k}" for k in [*a, *(k for k in b if k not in a)] if a.get(k) != b.get(k)]
        elif a != b:
            diff.append(key)
    return diff


def _identity_of(path: Path):
    return ckpt.load_checkpoint(path, mmap=True).get("identity")


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run will resume from (resume=auto: run_dir/last.pt), if it exists.

    An extended or fine-tuned run that already saved its own last.pt (same identity, resume_mode
    included) continues from that one, so a requeued job keeps its progress.
    """
    from acon.builders import run_identity

    r, own = cfg.resume, Path(run_dir) / "last.pt"
    if cfg.get("resume_mode", "strict") != "strict" and r != "none" and own.is_file():
        if not identity_diff(run_identity(cfg), _identity_of(own)):
            return own
    path = own if r in ("auto", None) else None if r == "none" else Path(r)
    return path if path is not None and path.is_file() else None


def resume_kind(cfg: DictConfig, state: dict) -> str:
    """continue (the checkpoint is this run's own), or the run's resume_mode: extend | finetune."""
    from acon.builders import run_identity

    if not identity_diff(run_identity(cfg), state.get("identity")):
        return "continue"
    return str(cfg.get("resume_mode", "strict"))


def _length(recipe) -> tuple[str, int]:
    return (
        ("iterations", int(recipe["iterations"]))
        if recipe.get("iterations")
        else ("epochs", int(recipe["epochs"]))
    )


def check_extended_length(total_steps: int, checkpoint_step: int, path: Path) -> None:
    """resume_mode=extend must leave steps to train."""
    if total_steps <= checkpoint_step:
        raise ConfigError(
            f"resume_mode=extend needs a longer schedule: this run has {total_steps} steps and {path} is "
            f"already at step {checkpoint_step}; raise recipe.epochs or recipe.iterations"
        )


def _check_mode(cfg: DictConfig, path: Path, diff: list[str], theirs: dict) -> None:
    """What resume_mode=extend|finetune may change: extend the schedule length, finetune the recipe."""
    mode = cfg.resume_mode
    network = [k for k in diff if k in NETWORK_KEYS]
    if network:
        raise ConfigError(
            f"resume_mode={mode} continues the same network, but {path} has another {', '.join(network)}"
        )
    other = [k for k in diff if k != "resume_mode" and k not in LENGTH_KEYS]
    if mode == "extend" and other:
        raise ConfigError(
            f"resume_mode=extend changes only the schedule length (recipe.epochs / recipe.iterations), but "
            f"{keys_differ(other)} from {path}; use resume_mode=finetune for a new recipe"
        )
    if mode == "extend":
        (unit, new), (old_unit, old) = _length(cfg.recipe), _length(theirs["recipe"])
        if unit == old_unit and new <= old:
            raise ConfigError(
                f"resume_mode=extend needs a longer schedule: recipe.{unit}={new} is not more than the "
                f"{old} of {path}"
            )


def check_resume(cfg: DictConfig) -> Path | None:
    """Refuse, before any data is scanned, a resume checkpoint made by another model, activation or recipe;
    returns the checkpoint the run would resume from (None: a fresh start).

    A checkpoint of another architecture is refused with its missing and unexpected keys. With
    ``resume_mode=extend`` the schedule may be longer; with ``resume_mode=finetune`` the recipe may differ.
    """
    import torch

    from acon.builders import run_identity
    from acon.report import run_dir_of
    from acon.tasks import task_of

    mode = cfg.get("resume_mode", "strict")
    if mode not in RESUME_MODES:
        raise ConfigError(f"resume_mode={mode!r} is not one of: {', '.join(RESUME_MODES)}")
    run_dir = run_dir_of(cfg)
    path = resume_path(cfg, run_dir)
    if path is None:
        if mode != "strict":
            where = "resume=none" if cfg.resume == "none" else f"no checkpoint at resume={cfg.resume}"
            if cfg.resume in ("auto", None):
                where = f"resume=auto found no last.pt in {run_dir}"
            raise ConfigError(f"resume_mode={mode} needs a checkpoint to start from, but {where}")
        return None
    state = ckpt.load_checkpoint(path, mmap=True)
    theirs = state.get("identity")
    diff = identity_diff(run_identity(cfg), theirs)
    if not diff:
        return path
    if ("model" in diff or "num_classes" in diff) and isinstance(state.get("model"), dict):
        with torch.device("meta"):
            model = task_of(cfg).build_model(cfg)
        ckpt.load_model_state(model, state["model"], f"resume checkpoint {path}")
    if mode == "strict":
        raise ckpt.CheckpointError(
            f"refusing to resume from {path}: its {keys_differ(diff)} from this run's config; "
            f"use a different run dir (out_dir/run_name) or resume=none, or on purpose resume_mode=extend "
            f"(a longer schedule) or resume_mode=finetune (its weights, a fresh optimiser and schedule)"
        )
    _check_mode(cfg, path, diff, theirs)
    return path


# ---------------------------------------------------------------- what the dir holds when a run starts


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
