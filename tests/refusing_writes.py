"""Test fault injection: writes to files whose name matches a pattern fail with a chosen errno.

In-process through the ``refuse_writes`` fixture (``monkeypatch``); in a subprocess through
``tests/inject/sitecustomize.py`` with ``ACON_REFUSE_WRITES=<glob>=<errno name>[@<opens to let through>]``
and ``tests/inject`` on ``PYTHONPATH``. A refused file gets half of the first write, then the error (a
partial file, as a full disk leaves it). ``os.link`` to a matching name fails the same way.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os


class RefusingFile:
    """A real open file whose writes fail with ``code`` after half of the first one lands."""

    def __init__(self, f, name: str, code: int) -> None:
        self._f, self._name, self._code = f, name, code

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(self._code, os.strerror(self._code), self._name)

    def __getattr__(self, attr):
        return getattr(self._f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def refusing(pattern: str, code: int, let_through: int = 0):
    """(open, link) replacements refusing writes to basenames matching ``pattern`` after ``let_through``."""
    real_open, real_link, seen = builtins.open, os.link, [0]

    def matches(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        if not fnmatch.fnmatch(os.path.basename(os.fsdecode(path)), pattern):
            return False
        seen[0] += 1
        return seen[0] > let_through

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and matches(file):
            return RefusingFile(f, os.fsdecode(file), code)
        return f

    def fake_link(src, dst, *args, **kwargs):
        if matches(dst):
            raise OSError(code, os.strerror(code), os.fsdecode(dst))
        return real_link(src, dst, *args, **kwargs)

    return fake_open, fake_link


def install_from_env() -> None:
    """Patch open/io.open/os.link process-wide from ``ACON_REFUSE_WRITES`` (subprocess injection)."""
    spec = os.environ.get("ACON_REFUSE_WRITES")
    if not spec:
        return
    pattern, _, rest = spec.rpartition("=")
    name, _, through = rest.partition("@")
    fake_open, fake_link = refusing(pattern, getattr(errno, name), int(through or 0))
    builtins.open = io.open = fake_open
    os.link = fake_link
