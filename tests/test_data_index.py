"""The cached file index of ImageFolder splits: same samples as a listing, invalidated by changes to the
folder, written once when several ranks start together."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from acon.data.folder import ImageFolderDataset, find_classes, scan_samples
from acon.data.index import cache_file, load_index
from tests.conftest import ROOT, write_image_folder


@pytest.fixture
def tree(tmp_path) -> Path:
    root = write_image_folder(tmp_path / "data", classes=3, per_class=(4, 2))
    nested = root / "train" / "n00000001" / "extra"
    nested.mkdir()
    shutil.copy(next((root / "train" / "n00000001").glob("*.JPEG")), nested / "a.jpeg")
    return root


def cached(root: Path) -> ImageFolderDataset:
    return ImageFolderDataset(root / "train", index_cache=True)


def test_index_matches_listing_and_is_reused(tree, capsys):
    split = tree / "train"
    listed, _ = scan_samples(split, find_classes(split))
    first = cached(tree)
    assert first.index_source == "scan" and list(first.samples) == listed
    assert first.targets == [t for _, t in listed] and first.samples[-1] == listed[-1]
    assert "indexed" in capsys.readouterr().err and cache_file(split.resolve(), None).is_file()
    again = cached(tree)
    assert again.index_source == "cache" and list(again.samples) == listed
    assert f"{len(listed):,} files in 3 classes" in capsys.readouterr().err


def test_added_and_removed_files_invalidate(tree):
    cached(tree)
    cls = tree / "train" / "n00000002"
    shutil.copy(next(cls.glob("*.JPEG")), cls / "new.JPEG")  # same second as the scan: caught by the count
    ds = cached(tree)
    assert ds.index_source == "scan" and str(cls / "new.JPEG") in {p for p, _ in ds.samples}
    (tree / "train" / "n00000001" / "extra" / "a.jpeg").unlink()  # a nested folder
    ds = cached(tree)
    assert ds.index_source == "scan" and len(ds) == 13
    assert cached(tree).index_source == "cache"


def test_old_folder_change_invalidates_by_mtime(tree):
    """Folders untouched for a while are checked by mtime alone: an added file changes it."""
    for d, _, _ in os.walk(tree):
        os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    cached(tree)
    assert cached(tree).index_source == "cache"
    cls = tree / "train" / "n00000000"
    shutil.copy(next(cls.glob("*.JPEG")), cls / "added.JPEG")
    ds = cached(tree)
    assert ds.index_source == "scan" and len(ds) == 14


def test_removed_class_is_dropped(tree):
    """The remaining classes are a subset of the indexed ones: their part of the index, renumbered."""
    assert cached(tree).classes == ["n00000000", "n00000001", "n00000002"]
    shutil.rmtree(tree / "train" / "n00000001")
    ds = cached(tree)
    assert ds.index_source == "cache" and ds.classes == ["n00000000", "n00000002"]
    assert list(ds.samples) == scan_samples(tree / "train", ds.classes)[0]
    assert {t for _, t in ds.samples} == {0, 1} and len(ds) == 8


def test_cache_dir_option_and_off(tree, tmp_path):
    elsewhere = tmp_path / "idx"
    ds = ImageFolderDataset(tree / "train", index_cache=True, index_cache_dir=elsewhere)
    assert ds.index_source == "scan" and len(list(elsewhere.glob("train-*.index"))) == 1
    assert not (tree / ".acon-index").exists()
    index, source = load_index(tree / "train", find_classes(tree / "train"), cache=False)
    assert source == "scan" and len(index.names) == 13


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_dataset_uses_the_user_cache(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("ACON_CACHE", str(tmp_path / "cache"))
    tree.chmod(0o555)
    try:
        assert cached(tree).index_source == "scan"
        assert cached(tree).index_source == "cache"
    finally:
        tree.chmod(0o755)
    assert list((tmp_path / "cache" / "index").glob("train-*.index"))


RANK = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from acon.data.folder import ImageFolderDataset
    ds = ImageFolderDataset({split!r}, index_cache=True)
    print(ds.index_source, len(ds))
    """
)


def test_two_ranks_scan_once(tree):
    """Two processes of a node start together: one lists the folder, the other waits and reads its index."""
    code = RANK.format(root=str(ROOT), split=str(tree / "train"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sorted(o.split()[0] for o, _ in outs) == ["cache", "scan"]
    assert all(o.split()[1] == "13" for o, _ in outs)
    assert "13 files in 3 classes" in outs[0][1] and outs[1][1] == ""  # only local rank 0 reports


def test_class_subset_is_read_from_the_whole_split_index(tree, capsys):
    """A class subset (data.class_subset) after a whole-split run reads its part of the index, in its own class
    order, without listing the folders or replacing the index; a change in one of its folders still counts."""
    split = tree / "train"
    cached(tree)
    subset = ["n00000002", "n00000000"]
    listed, _ = scan_samples(split, subset)
    sub = ImageFolderDataset(split, classes=subset, index_cache=True)
    assert (
        sub.index_source == "cache" and list(sub.samples) == listed and sub.targets == [t for _, t in listed]
    )
    assert "in 2 of 3 classes" in capsys.readouterr().err
    assert cached(tree).index_source == "cache"  # the whole split's index was kept
    (split / "n00000001" / "extra" / "a.jpeg").unlink()  # outside the subset
    assert ImageFolderDataset(split, classes=subset, index_cache=True).index_source == "cache"
    cls = split / "n00000002"
    shutil.copy(next(cls.glob("*.JPEG")), cls / "new.JPEG")
    again = ImageFolderDataset(split, classes=subset, index_cache=True)
    assert again.index_source == "scan" and str(cls / "new.JPEG") in {p for p, _ in again.samples}


@pytest.mark.parametrize("errno_name", ["ENOSYS", "ENOLCK"])
def test_a_file_system_without_locks_still_indexes(tree, tmp_path, monkeypatch, errno_name):
    """Lustre mounted -o noflock (ENOSYS), NFSv3 without lockd (ENOLCK): flock fails; the index is built
    and cached all the same (before: the run crashed with that OSError). Other errors still raise."""
    import errno

    from acon.data import index as index_mod

    def no_locks(fh, op):
        raise OSError(getattr(errno, errno_name), "flock")

    monkeypatch.setattr(index_mod.fcntl, "flock", no_locks)
    split = tree / "train"
    classes = find_classes(split)
    idx, source = index_mod.load_index(split, classes, cache_dir=tmp_path / "c")
    assert source == "scan" and len(idx.names) == len(scan_samples(split, classes)[0])
    assert index_mod.load_index(split, classes, cache_dir=tmp_path / "c")[1] == "cache"

    def broken(fh, op):
        raise OSError(errno.EIO, "flock")

    monkeypatch.setattr(index_mod.fcntl, "flock", broken)
    with pytest.raises(OSError, match="flock"):
        index_mod.load_index(split, classes, cache_dir=tmp_path / "d")
