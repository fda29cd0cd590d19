"""Writes into the run dir that the filesystem refuses (full, over quota, read-only, no permission).

Such a write ends the run with one ``error:`` line naming the file, the cause and the space needed vs
free, and exit status :data:`WRITE_EXIT_CODE` (train.py). Other ``OSError``s pass through unchanged.
Before the first step the trainer (and ``python -m acon.doctor``) compares the free space with what the
run keeps (:func:`space_shortfall`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

WRITE_EXIT_CODE = 4  # not 75: a full disk is not fixed by requeueing the job
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
}
MARGIN_BYTES = 64 << 20  # room for metrics, TensorBoard events, results.json and the log


class WriteFailed(RuntimeError):
    """A run-dir write the filesystem refused; the message names the file, the cause and the space."""

    def __init__(self, message: str, path: Path, errno_: int) -> None:
        super().__init__(message)
        self.path, self.errno = path, errno_


def human(n: int | None) -> str:
    """Bytes in words: ``12.3 MiB``."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def existing_ancestor(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for this user) on the filesystem holding ``path``; None if it cannot be asked."""
    try:
        return shutil.disk_usage(existing_ancestor(Path(path))).free
    except OSError:
        return None


def is_write_refusal(e: BaseException) -> bool:
    """An OSError that means the filesystem will not take the write (full, quota, read-only, access)."""
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def refusal_in(e: BaseException | None) -> OSError | None:
    """The refused-write OSError that ``e`` is or was raised while handling (torch.save's zip writer
    reports a full disk as a RuntimeError from its clean-up, with the OSError as its context)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if is_write_refusal(e):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_failed(path: str | os.PathLike, e: OSError, needed=None) -> WriteFailed:
    """The :class:`WriteFailed` for ``e`` while writing ``path`` (``needed``: the bytes the write needs,
    or a function returning them)."""
    path = Path(path)
    if callable(needed):
        try:
            needed = needed()
        except Exception:
            needed = None
    cause = WRITE_ERRNOS.get(e.errno, os.strerror(e.errno or 0))
    name = errno.errorcode.get(e.errno, str(e.errno))
    free = free_bytes(path.parent)
    fix = (
        "free space"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make the run dir writable"
        if e.errno in (errno.EROFS, errno.EACCES)
        else "fix the run dir"
    )
    message = (
        f"cannot write {path}: {cause} ({name}); needs about {human(needed)}, {human(free)} free there; "
        f"{fix} and rerun the same command to resume from the last complete checkpoint"
    )
    return WriteFailed(message, path, e.errno)


@contextlib.contextmanager
def refused_writes(path: str | os.PathLike, needed=None) -> Iterator[None]:
    """Turn a refused write of ``path`` (:data:`WRITE_ERRNOS`) into :class:`WriteFailed` (``needed``: the
    bytes it needs, or a function returning them, asked only on failure)."""
    try:
        yield
    except Exception as e:
        refusal = refusal_in(e)
        if refusal is None:
            raise
        raise write_failed(path, refusal, needed) from None


def state_bytes(obj) -> int:
    """The bytes of every tensor in a (nested) checkpoint dict: about its size on disk."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.nelement()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def kept_checkpoints(keep_step_checkpoints: int) -> int:
    """Checkpoints a run holds at once: last.pt (the newest step copy is a hard link to it), the other
    step copies, best.pt, and the next one while it is written."""
    return max(int(keep_step_checkpoints), 1) + 2


def space_shortfall(run_dir: str | os.PathLike, checkpoint_bytes: int, kept: int) -> str | None:
    """A warning naming both numbers when the run dir's free space is below checkpoints × kept + margin."""
    need = checkpoint_bytes * kept + MARGIN_BYTES
    free = free_bytes(run_dir)
    if free is None or free >= need:
        return None
    return (
        f"{human(free)} free for {run_dir}, below the {human(need)} the run keeps "
        f"({kept} checkpoints of about {human(checkpoint_bytes)} + {human(MARGIN_BYTES)} margin); "
        f"it stops with exit status {WRITE_EXIT_CODE} when the disk fills"
    )


class HeldRefusals:
    """Rank 0's run-dir writer (``acon.logging.RunLogger``) under DDP: a refused write is held, not
    raised, and the writes after it are skipped, so rank 0 does not leave the job alone while the other
    ranks wait for it in the next collective. Every rank learns of it at the next point where they agree
    anyway (the per-step flag sum, a checkpoint save, the end of the run) and ends with the one
    ``error:`` line of rank 0 and exit status :data:`WRITE_EXIT_CODE`. Without DDP writes raise at once."""

    def __init__(self, make, hold: bool) -> None:
        """``make()`` builds the writer (its own first writes may be refused too)."""
        self.hold, self.failure, self.target = hold, None, None
        self.target = self._guarded(make)()

    def _guarded(self, method):
        def call(*args, **kwargs):
            if self.failure is not None:
                return None
            try:
                return method(*args, **kwargs)
            except WriteFailed as e:
                if not self.hold:
                    raise
                self.failure = e
                return None

        return call

    def __getattr__(self, name: str):
        if self.target is None:  # building the writer was refused: nothing more is written
            return lambda *args, **kwargs: None
        attr = getattr(self.target, name)
        return self._guarded(attr) if callable(attr) else attr
