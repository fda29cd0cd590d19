"""scripts/prepare_imagenet.py on a tiny copy of the official flat validation layout."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
import prepare_imagenet  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n01484850"]
LABELS = [2, 0, 1, 0, 2, 1, 1]  # ILSVRC2012_val_00000001..7


def _flat_val(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    for i in range(1, len(LABELS) + 1):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(val / f"ILSVRC2012_val_{i:08d}.JPEG")
    return val


@pytest.mark.parametrize("fmt", ["csv", "wnids", "devkit"])
def test_sorts_flat_val_into_class_folders(tmp_path, fmt):
    val = _flat_val(tmp_path)
    labels, synsets = tmp_path / "labels.txt", None
    if fmt == "csv":
        rows = [f"ILSVRC2012_val_{i:08d},{WNIDS[c]} 1 2 3 4" for i, c in enumerate(LABELS, 1)]
        labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif fmt == "wnids":
        labels.write_text("\n".join(WNIDS[c] for c in LABELS) + "\n")
    else:
        labels.write_text("\n".join(str(c + 1) for c in LABELS) + "\n")
        synsets = tmp_path / "synsets.txt"
        synsets.write_text("\n".join(f"{w} some words" for w in WNIDS) + "\n")
    args = [sys.executable, "scripts/prepare_imagenet.py", str(val), str(labels)]
    run_cli(args + (["--synsets", str(synsets)] if synsets else []))
    assert sorted(p.name for p in val.iterdir()) == sorted(WNIDS)
    for i, c in enumerate(LABELS, 1):
        assert (val / WNIDS[c] / f"ILSVRC2012_val_{i:08d}.JPEG").is_file()
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(val))
    assert ds.classes == WNIDS and len(ds) == len(LABELS)


def test_unlabelled_image_fails_before_moving_anything(tmp_path):
    val = _flat_val(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(WNIDS[c] for c in LABELS[:-1]) + "\n")
    with pytest.raises(ValueError, match="no label"):
        prepare_imagenet.prepare(val, labels)
    assert len(list(val.glob("*.JPEG"))) == len(LABELS)


def test_class_ids_without_synsets_is_a_clear_error(tmp_path):
    val = _flat_val(tmp_path)
    labels = tmp_path / "gt.txt"
    labels.write_text("\n".join(str(c + 1) for c in LABELS) + "\n")
    proc = run_cli([sys.executable, "scripts/prepare_imagenet.py", str(val), str(labels)], check=False)
    assert proc.returncode == 2 and "--synsets" in proc.stderr


def _wnid_labels(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(WNIDS[c] for c in LABELS) + "\n")
    return labels


def _placed(val):
    return sorted(str(p.relative_to(val)) for p in val.glob("n*/*.JPEG"))


def test_interrupted_move_continues_and_reruns_are_no_ops(tmp_path, monkeypatch):
    val, labels = _flat_val(tmp_path), _wnid_labels(tmp_path)
    real_place, calls = prepare_imagenet.place, []

    def interrupted(src, dst, mode):  # the 4th move is cut off (Ctrl-C, job killed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(src)
        real_place(src, dst, mode)

    monkeypatch.setattr(prepare_imagenet, "place", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_imagenet.prepare(val, labels)
    monkeypatch.undo()
    half = _placed(val)
    assert len(half) == 3 and len(list(val.glob("*.JPEG"))) == len(LABELS) - 3  # a real half-moved folder
    script = [sys.executable, "scripts/prepare_imagenet.py", str(val), str(labels)]
    dry = run_cli([*script, "--dry-run"])
    assert "would move 4 images" in dry.stdout and "3 were already in their class folders" in dry.stdout
    assert "nothing was changed" in dry.stdout and _placed(val) == half
    done = run_cli(script)
    assert "moved 4 images" in done.stdout and "3 were already" in done.stdout
    expected = sorted(f"{WNIDS[c]}/ILSVRC2012_val_{i:08d}.JPEG" for i, c in enumerate(LABELS, 1))
    assert _placed(val) == expected and not list(val.glob("*.JPEG"))
    again = run_cli(script)
    assert "moved 0 images" in again.stdout and f"{len(LABELS)} were already" in again.stdout
    assert _placed(val) == expected


def test_rerun_still_refuses_missing_and_missorted_images(tmp_path):
    val, labels = _flat_val(tmp_path), _wnid_labels(tmp_path)
    prepare_imagenet.prepare(val, labels)
    first = val / WNIDS[LABELS[0]] / "ILSVRC2012_val_00000001.JPEG"
    first.rename(val / WNIDS[(LABELS[0] + 1) % 3] / first.name)
    with pytest.raises(ValueError, match="another class folder"):
        prepare_imagenet.prepare(val, labels)
    (val / WNIDS[(LABELS[0] + 1) % 3] / first.name).unlink()
    with pytest.raises(ValueError, match=r"1 labelled images are missing.*ILSVRC2012_val_00000001"):
        prepare_imagenet.prepare(val, labels)
