"""The run's final ``results.json`` and the facts it records."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def run_dir_of(cfg) -> Path:
    """Hydra's output dir for this run, or out_dir/run_name outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.out_dir) / cfg.run_name


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current git commit of the code (with ``-dirty`` if modified), or None outside a checkout."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write JSON atomically (temp file + fsync + rename); a refused write (disk full, read-only, ...)
    raises :class:`acon.storage.WriteFailed` and leaves ``path`` as it was, without the temp file."""
    from acon.storage import refused_writes

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    data = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    try:
        with refused_writes(path, len(data.encode())):
            with open(tmp, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return path
