"""Real-world image folders: odd formats decode to RGB; broken files follow data.bad_image_policy."""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import compose, run_cli, tiny_overrides, write_image_folder
from PIL import Image

from acon.data import build_datasets
from acon.data.folder import BadImageError, ImageFolderDataset, collate_skipping_bad
from acon.validate import ConfigError

RUN = "folder-resnet18_small-relu-s0"


def _rgb_array(seed: int, size=(24, 20)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def add_odd_but_valid(folder) -> dict:
    """The formats ImageNet really contains, each with the RGB array it must decode to."""
    rgb = Image.fromarray(_rgb_array(1))
    rgb.convert("CMYK").save(folder / "cmyk.JPEG", quality=95)
    Image.fromarray(_rgb_array(2)[..., 0]).save(folder / "gray.JPEG", quality=95)
    rgb.save(folder / "png_named.JPEG", format="PNG")
    return {
        "cmyk.JPEG": np.asarray(Image.open(folder / "cmyk.JPEG").convert("RGB")),
        "gray.JPEG": np.repeat(np.asarray(Image.open(folder / "gray.JPEG"))[..., None], 3, axis=2),
        "png_named.JPEG": np.asarray(rgb),  # lossless: exactly the pixels written
    }


def add_broken(folder) -> list[str]:
    """A truncated JPEG, a zero-byte file and random bytes, all with image names; returns their names."""
    Image.fromarray(_rgb_array(3, (64, 64))).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "whole.jpg").unlink()
    (folder / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "garbage.JPEG").write_bytes(np.random.default_rng(4).bytes(700))
    return ["truncated.JPEG", "empty.JPEG", "garbage.JPEG"]


def add_junk(folder) -> None:
    """Non-image files users leave behind."""
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "notes.txt").write_text("not an image")
    (folder / "._hidden.JPEG").write_bytes(b"AppleDouble")


def test_odd_formats_decode_to_rgb_by_content(tmp_path):
    cls = tmp_path / "a"
    cls.mkdir()
    expected = add_odd_but_valid(cls)
    add_junk(cls)
    ds = ImageFolderDataset(tmp_path, transform=lambda im: np.asarray(im.convert("RGB")))
    names = sorted(p.rsplit("/", 1)[1] for p, _ in ds.samples)
    assert names == sorted(expected)  # .DS_Store, .txt and dot-files are not samples
    for i, (path, _) in enumerate(ds.samples):
        arr, target = ds[i]
        assert arr.shape[2] == 3 and target == 0
        assert np.array_equal(arr, expected[path.rsplit("/", 1)[1]]), path
    from acon.data.transforms import val_transform

    ds.transform = val_transform(16, 16)
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and torch.isfinite(x).all()
    assert Image.open(cls / "png_named.JPEG").format == "PNG"
    assert Image.open(cls / "cmyk.JPEG").mode == "CMYK"


def test_broken_files_raise_naming_the_file_or_are_skipped(tmp_path):
    cls = tmp_path / "a"
    cls.mkdir()
    bad = add_broken(cls)
    Image.fromarray(_rgb_array(5)).save(cls / "good.JPEG")
    to_array = lambda im: torch.from_numpy(np.asarray(im.convert("RGB")).copy())  # noqa: E731
    strict = ImageFolderDataset(tmp_path, transform=to_array)
    for i, (path, _) in enumerate(strict.samples):
        if path.endswith("good.JPEG"):
            assert strict[i][0].shape == (20, 24, 3)
            continue
        with pytest.raises(BadImageError, match=str(path)):
            strict[i]
    lenient = ImageFolderDataset(tmp_path, transform=to_array, bad_image_policy="skip")
    with pytest.warns(UserWarning, match="skipping bad image"):
        batch = [lenient[i] for i in range(len(lenient))]
    images, targets, n_bad = collate_skipping_bad(batch)
    assert n_bad == len(bad) == 3 and images.shape[0] == 1 and targets.tolist() == [0]
    # a batch with nothing readable is skipped by the trainer on every rank (and counted), not an error
    images, targets, n_bad = collate_skipping_bad([None] * 3)
    assert images is None and targets is None and n_bad == 3


def test_worker_error_names_the_file_in_main_process(tmp_path, monkeypatch):
    cls = tmp_path / "a"
    cls.mkdir()
    for i in range(6):
        Image.fromarray(_rgb_array(10 + i)).save(cls / f"ok{i}.JPEG")
    (cls / "ok3.JPEG").write_bytes((cls / "ok3.JPEG").read_bytes()[:100])  # truncated mid-stream
    from acon.data.transforms import val_transform

    ds = ImageFolderDataset(tmp_path, transform=val_transform(16, 16))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skipping_bad)
    batches = iter(loader)
    with pytest.raises(BadImageError, match=r"(?s)worker process.*ok3\.JPEG"):
        list(batches)
    # After a worker's error, DataLoader's shutdown waits out a 5 s join per worker; end the workers here
    # with a short join instead of leaving that to whichever later test collects the iterator (20 s there).
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    del batches
    gc.collect()


def _data_cfg(root):
    return compose(tiny_overrides(root, root.parent / "out")).data


def test_empty_class_folder_and_differing_class_sets(tmp_path):
    root = write_image_folder(tmp_path / "d", classes=3, per_class=(2, 1))
    empty = root / "train" / "n00000001"
    for f in empty.iterdir():
        f.unlink()
    (empty / "notes.txt").write_text("only junk here")
    with pytest.raises(ConfigError, match=f"empty class folders in .*{empty}"):
        build_datasets(_data_cfg(root))
    shutil.rmtree(empty)
    (root / "val" / "n00000009").mkdir()
    with pytest.raises(ConfigError) as info:
        build_datasets(_data_cfg(root))
    msg = str(info.value)
    assert str(root / "train") in msg and str(root / "val") in msg
    assert "only in train: []" in msg and "only in val: ['n00000001', 'n00000009']" in msg


def test_wrong_root_layout_names_the_folder(tmp_path):
    (tmp_path / "d" / "train" / "x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "d" / "val")):
        build_datasets(_data_cfg(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


@pytest.fixture(scope="module")
def messy_imagenet(tmp_path_factory):
    """The tiny 3-class folder plus valid odd formats, junk and 4 broken files (3 in train, 1 in val)."""
    root = write_image_folder(tmp_path_factory.mktemp("messy"), classes=3, per_class=(6, 2))
    train0 = root / "train" / "n00000000"
    add_odd_but_valid(train0)  # 18 + 3 = 21 valid training images
    add_junk(train0)
    add_broken(root / "train" / "n00000001")  # 24 training files: 6 batches of 4, none dropped
    (root / "val" / "n00000002" / "empty.JPEG").write_bytes(b"")
    return root


def test_skip_policy_counts_bad_images_and_completes(messy_imagenet, tmp_path):
    from acon.trainer import train

    cfg = compose(
        tiny_overrides(messy_imagenet, tmp_path)
        + ["model=resnet18_small", "activation=relu", "recipe.epochs=2", "data.bad_image_policy=skip"]
        + ["data.max_bad_images=3"]  # 3 of 24 training files: past the default budget (0.1 %, at least 1)
    )
    with pytest.warns(UserWarning, match="skipping bad image"):
        results = train(cfg)
    # per epoch: 3 bad training files (every training file is read once) + 1 bad validation file
    assert results["status"] == "complete" and results["bad_images_skipped"] == 2 * (3 + 1)
    saved = json.loads((tmp_path / RUN / "results.json").read_text())
    assert saved["bad_images_skipped"] == 8 and saved["steps"] == 12


def test_in_process_train_that_raises_ends_its_workers_at_once(messy_imagenet, tmp_path, no_cycle_collector):
    """An in-process ``train()`` stopped by a bad image (raise policy) ends its persistent loader workers
    before the error reaches the caller, so a caller that keeps the error (a notebook's ``except ... as
    err``, pytest's ``raises``) does not keep them: left to the cycle collector, the error's frames would
    hold the epoch's iterator, and its out-of-order shutdown costs 10 s per worker."""
    from test_fault_checkpoints import descendants

    from acon.trainer import train

    cfg = compose(
        tiny_overrides(messy_imagenet, tmp_path)
        + ["model=resnet18_small", "activation=relu", "data.num_workers=2", "data.persistent_workers=true"]
    )
    children = set(descendants(os.getpid()))
    with pytest.raises(BadImageError) as caught:
        train(cfg)
    assert "n00000001" in str(caught.value)  # the error itself, with its traceback, is still the caller's
    assert caught.value.__traceback__ is not None
    assert set(descendants(os.getpid())) - children == set()


@pytest.mark.parametrize("pipeline", ["reference", pytest.param("fast", marks=pytest.mark.slow)])
def test_raise_policy_stops_naming_the_file_through_workers(messy_imagenet, tmp_path, pipeline):
    """A bad file read in a DataLoader worker: one line naming the file and the reason, as in the main
    process (not PyTorch's wrapped worker traceback)."""
    proc = run_cli(
        [
            sys.executable,
            "train.py",
            *tiny_overrides(messy_imagenet, tmp_path),
            "model=resnet18_small",
            "activation=relu",
            "data.num_workers=2",
            "data.persistent_workers=false",
            f"data.pipeline={pipeline}",
        ],
        check=False,
        timeout=180,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    # progress lines (the file index) start with 'acon:'; the failure itself is one 'error:' line
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("acon: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "worker process" not in proc.stderr, lines
    names = [f"n00000001/{n}" for n in ("truncated.JPEG", "empty.JPEG", "garbage.JPEG")]
    assert any(lines[0].startswith(f"error: {messy_imagenet / 'train' / n}: ") for n in names), lines
