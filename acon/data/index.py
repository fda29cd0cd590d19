"""A cached file index of an ImageFolder split, so that a run on ImageNet lists 1.28M files once, not at
every start and on every rank.

The index holds, per directory under the split, the sorted image file names; it is kept valid by the
modification times of every directory it covers (adding, removing or renaming a file changes its
folder's mtime) and by the class list. A folder modified within ``RACY_S`` seconds of being listed
could change again within the same timestamp tick, so for such folders the file count is checked too.

Where it lives: ``<data.root>/.acon-index/`` beside the splits, or ``$ACON_CACHE/index`` (default
``~/.cache/acon-suite/index``) when the dataset is read-only, or ``data.index_cache_dir``. Processes that
start together (the ranks of a node, or of every node on a shared file system) take a file lock on the
index: the first one scans and writes it, the others wait and read it.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from acon.runlock import NO_LOCKS

FORMAT = 1
RACY_S = 2.0  # a folder modified this close to being listed has its file count checked as well
PROGRESS_EVERY_S = 5.0
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class IndexedSamples(Sequence):
    """(path, class index) pairs built on access from per-folder names: 1.28M entries load in a fraction
    of a second and take a third of the memory of a list of tuples."""

    def __init__(self, dirs: list[str], counts: list[int], names: list[str], targets: list[int]) -> None:
        self.dirs, self.names, self.targets = dirs, names, targets
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tolist()

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        d = bisect.bisect_right(self._starts, index) - 1
        return os.path.join(self.dirs[d], self.names[index]), self.targets[index]

    def __iter__(self) -> Iterator[tuple[str, int]]:
        i = 0
        for d, (a, b) in enumerate(zip(self._starts[:-1], self._starts[1:], strict=True)):
            for name in self.names[a:b]:
                yield os.path.join(self.dirs[d], name), self.targets[i]
                i += 1


@dataclass
class FolderIndex:
    """One split's files: per directory (relative to the split) its sorted image names and class index."""

    root: str
    classes: list[str]
    dirs: list[str] = field(default_factory=list)  # relative paths of the folders holding images
    dir_targets: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)  # class folders without images
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # every folder: (mtime_ns, count | -1)

    def samples(self, root: str | os.PathLike | None = None) -> IndexedSamples:
        """The (path, class index) sequence of the split, with paths under ``root`` (default: as scanned)."""
        root = os.fspath(root if root is not None else self.root)
        targets = np.repeat(np.asarray(self.dir_targets, np.int64), self.counts).tolist()
        dirs = [os.path.join(root, d) for d in self.dirs]
        return IndexedSamples(dirs, self.counts, self.names, targets)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def _walk(top: str, rel: str, out: list) -> None:
    """Append (relative dir, image names, listing time, entry count) for ``top`` and every folder below it,
    following symlinks (as ``os.walk(followlinks=True)``)."""
    listed = time.time_ns()
    files, subdirs, n = [], [], 0
    with os.scandir(top) as it:
        for entry in it:
            n += 1
            if entry.is_dir():
                subdirs.append(entry.name)
            else:
                files.append(entry.name)
    out.append((rel, sorted(f for f in files if _is_image(f)), listed, n))
    for name in subdirs:
        _walk(os.path.join(top, name), f"{rel}/{name}", out)


class _Progress:
    """Scan progress on stderr: a rewritten line on a terminal, a line every few seconds in a log."""

    def __init__(self, root: str, total: int, show: bool) -> None:
        self.root, self.total, self.show = root, total, show
        self.tty = show and sys.stderr.isatty()
        self.last, self.printed = time.perf_counter(), False

    def update(self, classes_done: int, files: int) -> None:
        now = time.perf_counter()
        if not self.show or now - self.last < (0.5 if self.tty else PROGRESS_EVERY_S):
            return
        self.last = now
        end = "\r" if self.tty else "\n"
        msg = f"acon: indexing {self.root}: {files:,} files, {classes_done}/{self.total} class folders"
        print(msg, end=end, file=sys.stderr, flush=True)
        self.printed = True

    def done(self) -> None:
        """End a rewritten terminal line."""
        if self.tty and self.printed:
            print(file=sys.stderr, flush=True)


def scan(root: str | os.PathLike, classes: list[str], show: bool = False) -> FolderIndex:
    """List every image file under root/<class>/ (recursively, sorted as ``sorted(os.walk(...))``)."""
    root = os.fspath(root)
    index = FolderIndex(root, list(classes))
    progress = _Progress(root, len(classes), show)
    for target, cls in enumerate(classes):
        found: list = []
        _walk(os.path.join(root, cls), cls, found)
        found.sort(key=lambda f: os.path.join(root, f[0]))  # the order of sorted(os.walk(root/cls))
        n_before = len(index.names)
        for rel, names, listed, n in found:
            mtime = os.stat(os.path.join(root, rel)).st_mtime_ns
            index.stamps[rel] = (mtime, n if mtime > listed - RACY_S * 1e9 else -1)
            if names:
                index.dirs.append(rel)
                index.dir_targets.append(target)
                index.counts.append(len(names))
                index.names.extend(names)
        if len(index.names) == n_before:
            index.empty.append(cls)
        progress.update(target + 1, len(index.names))
    progress.done()
    return index


def is_current(index: FolderIndex, root: str, classes: list[str]) -> bool:
    """Whether ``index`` still describes ``root``: same classes, same folder mtimes (and counts where racy)."""
    if index.classes != list(classes):
        return False
    for rel, (mtime, count) in index.stamps.items():
        path = os.path.join(root, rel)
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return False
            if count >= 0 and len(os.listdir(path)) != count:
                return False
        except OSError:
            return False
    return True


def class_subset(index: FolderIndex, classes: list[str]) -> FolderIndex | None:
    """The part of ``index`` that covers ``classes`` (in that order), or ``None`` when ``index`` lacks one
    of them: a class subset (``data.class_subset``) is read from the whole split's index, not listed again."""
    position = {c: i for i, c in enumerate(classes)}
    if len(position) != len(classes) or not position.keys() <= set(index.classes):
        return None
    starts = np.concatenate([[0], np.cumsum(index.counts, dtype=np.int64)]).tolist()
    owner = {old: position.get(c) for old, c in enumerate(index.classes)}  # old class index -> new
    kept = [d for d, t in enumerate(index.dir_targets) if owner[t] is not None]
    kept.sort(key=lambda d: owner[index.dir_targets[d]])  # stable: each class's folders keep their order
    sub = FolderIndex(index.root, list(classes))
    for d in kept:
        sub.dirs.append(index.dirs[d])
        sub.dir_targets.append(owner[index.dir_targets[d]])
        sub.counts.append(index.counts[d])
        sub.names.extend(index.names[starts[d] : starts[d + 1]])
    sub.empty = [c for c in classes if c in set(index.empty)]
    sub.stamps = {rel: st for rel, st in index.stamps.items() if rel.split("/", 1)[0] in position}
    return sub


def default_cache_dir(root: Path) -> Path:
    """``<data.root>/.acon-index`` beside the split when writable, else ``$ACON_CACHE/index``."""
    beside = root.parent / ".acon-index"
    if os.access(beside if beside.is_dir() else root.parent, os.W_OK):
        return beside
    return Path(os.environ.get("ACON_CACHE", Path.home() / ".cache" / "acon-suite")) / "index"


def cache_file(root: Path, cache_dir: Path | None) -> Path:
    """The index file of split ``root`` (named by the split and a hash of its absolute path)."""
    key = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    return (cache_dir or default_cache_dir(root)) / f"{root.name}-{key}.index"


@contextmanager
def _locked(lock):
    """Hold an exclusive lock on the open file ``lock``: one process scans while the others wait. On a
    file system without locks (Lustre ``-o noflock``, NFSv3 without lockd) each process scans, as without
    the cache's lock; the index is written atomically either way."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = True
    except OSError as e:
        if e.errno not in NO_LOCKS:
            lock.close()
            raise
        held = False
    try:
        yield
    finally:
        if held:
            fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _read(path: Path) -> FolderIndex | None:
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    names = data.pop("names")
    data.pop("format")
    return FolderIndex(**data, names=names.split("\0") if names else [])


def _write(path: Path, index: FolderIndex) -> None:
    data = {k: v for k, v in vars(index).items() if k != "names"}
    data.update(format=FORMAT, names="\0".join(index.names))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _speaks() -> bool:
    """Whether this process reports (one per node under torchrun: local rank 0)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _report(msg: str) -> None:
    if _speaks():
        print(f"acon: {msg}", file=sys.stderr, flush=True)


def load_index(
    root: str | os.PathLike,
    classes: list[str],
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[FolderIndex, str]:
    """The index of split ``root``, and where it came from: ``"scan"`` or ``"cache"`` (read from disk)."""
    root_p = Path(root)
    t0 = time.perf_counter()
    if not cache:
        index = scan(root_p, classes, show=_speaks())
        secs = time.perf_counter() - t0
        _report(f"indexed {root_p}: {len(index.names):,} files in {len(classes)} classes in {secs:.1f} s")
        return index, "scan"
    path = cache_file(root_p.resolve(), Path(cache_dir).expanduser() if cache_dir else None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed by _locked)
    except OSError as e:
        warnings.warn(f"file index cache {path} not usable ({e}); listing the folder", stacklevel=2)
        return load_index(root_p, classes, cache=False)
    with _locked(lock):
        index = _read(path) if path.is_file() else None
        if index is not None and is_current(index, os.fspath(root_p), classes):
            _report(f"{root_p}: {len(index.names):,} files in {len(classes)} classes (index {path})")
            return index, "cache"
        sub = class_subset(index, classes) if index is not None else None
        if sub is not None and is_current(sub, os.fspath(root_p), classes):
            n = len(index.classes)
            _report(f"{root_p}: {len(sub.names):,} files in {len(classes)} of {n} classes (index {path})")
            return sub, "cache"  # the whole split's index stays on disk for the next run
        index = scan(root_p, classes, show=_speaks())
        try:
            _write(path, index)
        except OSError as e:
            warnings.warn(f"cannot write the file index {path} ({e})", stacklevel=2)
    secs = time.perf_counter() - t0
    _report(
        f"indexed {root_p}: {len(index.names):,} files in {len(classes)} classes in {secs:.1f} s; index {path}"
    )
    return index, "scan"
