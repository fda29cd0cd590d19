"""Test fault injection: reading a file whose name matches a pattern never returns (a hung mount).

In a subprocess through ``tests/inject/sitecustomize.py`` with ``ACON_HANG_READS=<glob>`` and
``tests/inject`` on ``PYTHONPATH``: ``open`` of a matching file for reading opens it (so the process is
seen holding it) and then sleeps forever; it is inherited by forked DataLoader workers.
"""

from __future__ import annotations

import builtins
import fnmatch
import io
import os
import time


def hanging_open(pattern: str):
    """An ``open`` replacement that never returns for reads of basenames matching ``pattern``."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        named = isinstance(file, (str, bytes, os.PathLike))
        if named and "r" in mode and fnmatch.fnmatch(os.path.basename(os.fsdecode(file)), pattern):
            while True:
                time.sleep(3600)
        return f

    return fake_open


def install_from_env() -> None:
    """Patch open/io.open process-wide from ``ACON_HANG_READS`` (subprocess injection)."""
    pattern = os.environ.get("ACON_HANG_READS")
    if pattern:
        builtins.open = io.open = hanging_open(pattern)
