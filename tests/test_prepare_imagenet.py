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
