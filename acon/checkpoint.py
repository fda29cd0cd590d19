"""Full-state checkpoints: written atomically, loaded without executing code, checked before use."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from acon.storage import is_write_refusal, refused_writes, state_bytes

FORMAT = "acon-suite/1"
HOST_KEYS = ("rng",)  # top-level checkpoint entries that stay CPU tensors whatever the map_location


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message says which file and why."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # e.g. a read-only filesystem, where it was never written


def atomic_save(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temp file in the same folder, flush + fsync, then rename over ``path``.

    A failure leaves ``path`` as it was and removes the temp file; a refused write (disk full, quota,
    read-only, permission) raises :class:`acon.storage.WriteFailed` naming the file and the space.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with refused_writes(path, lambda: state_bytes(obj)):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        _remove(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` an atomic copy of ``src`` (a hard link where the filesystem allows)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with refused_writes(dst, lambda: src.stat().st_size):
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError as e:
                if is_write_refusal(e):  # a copy would need more space, not less
                    raise
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, dst)
    finally:
        _remove(tmp)
    _fsync_dir(dst.parent)
    return dst


def _rejection_reason(e: Exception) -> str:
    """The informative line of torch's weights-only refusal (e.g. the blocked global it names)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or ln.startswith("Unsupported"):
            return ln
    return lines[-1] if lines else type(e).__name__


def _is_host(map_location) -> bool:
    return map_location is None or torch.device(map_location).type == "cpu"


def place_on_device(obj, device: str | torch.device, host_keys: tuple[str, ...] = HOST_KEYS):
    """``obj`` with its tensors moved to ``device``, except those under a top-level ``host_keys`` entry."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: v if k in host_keys else place_on_device(v, device, ()) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(place_on_device(v, device, ()) for v in obj)
    return obj


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only, never code.

    ``mmap=True`` maps the tensors instead of reading them (a cheap look at a large checkpoint). With a
    device ``map_location`` (``cuda:N``), everything is read to the host first and then moved there,
    except the entries that must stay on the host (``HOST_KEYS``: the RNG states), which stay CPU tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not isinstance(map_location, str | torch.device | None):
        raise TypeError(f"map_location must be a device or a device name, not {type(map_location).__name__}")
    try:
        mmap = mmap and zipfile.is_zipfile(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {str(path)!r}: weights-only loading rejected it ({_rejection_reason(e)}); "
            f"only tensors and plain containers are accepted, so nothing in it was run (a corrupt file "
            f"fails the same way)"
        ) from None
    except EOFError:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: the file is empty or truncated"
        ) from None
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    except (
        IndexError,
        KeyError,
        TypeError,
        ValueError,
    ) as e:  # a malformed pickle stream trips the unpickler
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: not a valid checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is a {type(obj).__name__}, not a dict")
    return obj if _is_host(map_location) else place_on_device(obj, map_location)


def load_model_state(model: nn.Module, state: dict, source: str) -> None:
    """Load a state_dict strictly; a mismatch lists the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(xs):
            return ", ".join(xs[:12]) + (f" … (+{len(xs) - 12})" if len(xs) > 12 else "") if xs else "none"

        raise CheckpointError(
            f"{source} does not fit this model ({type(model).__name__}): missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shape mismatches: {show(shapes)}"
        )
    model.load_state_dict(state)


def capture_rng(device: torch.device | None = None) -> dict:
    """This process's python, numpy, torch and CUDA RNG states, in weights-only-loadable types: the CUDA
    state of ``device`` when it is a GPU (none for a CPU run: no GPU is touched), of the current GPU when
    ``device`` is None and CUDA is available."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if device is None and torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()  # the current GPU
    elif device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)  # this rank's GPU
    return state


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of an RNG state tensor (they are host byte arrays, whatever device a load put them on)."""
    if t.device.type == "meta":
        raise CheckpointError("an RNG state was loaded to the meta device: it holds no values to restore")
    return t if t.device.type == "cpu" else t.cpu()


def restore_rng(state: dict) -> None:
    """Inverse of :func:`capture_rng`; RNG states on a device are restored from CPU copies."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _host(keys).numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_host(state["torch"]))
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:  # this rank's GPU, whichever index it has in this job's layout
        torch.cuda.set_rng_state(_host(state["cuda_device"]))
    elif "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        # an older checkpoint's state of every visible GPU, restorable by index only in the same layout
        torch.cuda.set_rng_state_all([_host(t) for t in state["cuda"]])


def assert_finite(model: nn.Module) -> None:
    """Refuse to checkpoint weights holding NaN or Inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to save a checkpoint: {name} holds NaN/Inf")


def prune_step_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step_<n>.pt files (called after the new one is on disk)."""
    files = sorted(folder.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    for old in files[: max(len(files) - keep, 0)]:
        old.unlink(missing_ok=True)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temp files that a process killed mid-save left behind (``.<name>.pt.tmp<pid>``)."""
    removed = []
    for tmp in Path(folder).glob(".*.pt.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
