"""``python -m acon.doctor``: passes on this machine, and fails clearly on a broken kernel or data folder."""

from __future__ import annotations

import shutil
import sys

import pytest

from acon import doctor
from acon.fused import native
from tests.conftest import run_cli, write_image_folder


@pytest.fixture
def data(tmp_path):
    return write_image_folder(tmp_path / "data", classes=3, per_class=(4, 2))


def overrides(root, tmp_path) -> list[str]:
    return ["data=folder", f"data.root={root}", "data.num_classes=3", f"out_dir={tmp_path / 'runs'}"]


def lines(out: str, status: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith(status + " ")]


def test_doctor_passes_here(data, tmp_path):
    proc = run_cli([sys.executable, "-m", "acon.doctor", *overrides(data, tmp_path)], timeout=600)
    out = proc.stdout
    assert proc.returncode == 0 and out.strip().splitlines()[-1].startswith("doctor: ready:"), out
    assert not lines(out, "fail")
    for expected in (
        "ok   torch: ",
        "ok   fused ACON-C cpu float32 contiguous: C++ kernels, forward and backward match",
        "ok   fused ACON-C cpu bfloat16 channels_last: ",
        "ok   data classes: 3 class folders in train and val",
        "ok   data train: 12 files in 3 classes",
        "ok   data val decode: ",
        "ok   DDP gloo: 2-process all-reduce correct",
        "ok   resume: no checkpoint in ",
    ):
        assert any(ln.startswith(expected) for ln in out.splitlines()), (expected, out)
    assert "NCCL: skipped: no GPU visible" in out or "ok   DDP NCCL" in out


def test_injected_failing_kernel_fails(data, tmp_path, monkeypatch, capsys):
    good = native.run_forward  # every path into the forward kernel
    monkeypatch.setattr(native, "run_forward", lambda *a: good(*a) * 1.5)
    assert doctor.main([*overrides(data, tmp_path), "--no-ddp"]) == 1
    out = capsys.readouterr().out
    failed = lines(out, "fail")
    assert any(
        ln.startswith("fail fused ACON-C cpu float32 contiguous: C++ kernels: ACON-C y differs")
        for ln in failed
    )
    assert out.strip().splitlines()[-1].startswith("doctor: FAILED:")


def test_flat_val_folder_fails_with_the_fix(data, tmp_path, capsys):
    val = data / "val"
    for f in list(val.rglob("*.JPEG")):
        shutil.move(f, val / f.name)
    for d in [p for p in val.iterdir() if p.is_dir()]:
        d.rmdir()
    assert doctor.main([*overrides(data, tmp_path), "--no-ddp"]) == 1
    (line,) = [ln for ln in lines(capsys.readouterr().out, "fail") if "data val" in ln]
    assert f"{val} holds 6 images directly" in line and f"python scripts/prepare_imagenet.py {val} " in line


def test_broken_data_folder_fails(data, tmp_path, capsys):
    shutil.rmtree(data / "val" / "n00000002")
    assert doctor.main([*overrides(data, tmp_path), "--no-ddp"]) == 1
    assert any("train and val class folders differ" in ln for ln in lines(capsys.readouterr().out, "fail"))
    shutil.copytree(data / "val" / "n00000001", data / "val" / "n00000002")
    bad = sorted((data / "train" / "n00000000").glob("*.JPEG"))[0]
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    assert doctor.main([*overrides(data, tmp_path), "--no-ddp", "--samples", "12"]) == 1
    (line,) = [ln for ln in lines(capsys.readouterr().out, "fail")]
    assert line.startswith(f"fail data train decode: {bad}: cannot decode")


def test_missing_coco_root_fails(tmp_path, capsys):
    args = ["task=detection_coco", "data=coco", f"data.root={tmp_path / 'nonexistent'}"]
    assert doctor.main([*args, f"out_dir={tmp_path / 'runs'}", "--no-ddp"]) == 1
    (line,) = [ln for ln in lines(capsys.readouterr().out, "fail") if ln.startswith("fail data")]
    assert "nonexistent" in line and "missing image folder" in line


def test_broken_transfer_datasets_fail(tmp_path, capsys):
    from acon.data.seg_shapes import prepare_seg_shapes
    from acon.detection.shapes import prepare_shapes

    coco = prepare_shapes(tmp_path / "coco", train_images=6, val_images=4, size=32)
    det = ["task=detection_coco", "data=coco", f"data.root={coco}", "data.train_split=train"]
    det += ["data.val_split=val", "data.num_classes=3", f"out_dir={tmp_path / 'runs'}", "--no-ddp"]
    assert doctor.main(det) == 0
    out = capsys.readouterr().out
    assert "ok   data train: " in out and "ok   data val decode: " in out
    (coco / "val" / "val_00002.png").write_bytes(b"\x89PNG broken")
    assert doctor.main([*det, "--samples", "4"]) == 1
    (line,) = lines(capsys.readouterr().out, "fail")
    assert line.startswith(f"fail data val decode: {coco / 'val' / 'val_00002.png'}: cannot decode")

    voc = prepare_seg_shapes(tmp_path / "voc", train=6, val=3, size=32)
    seg = ["task=segmentation", "data=voc", f"data.root={voc}", "data.num_classes=4"]
    seg += [f"out_dir={tmp_path / 'runs'}", "--no-ddp"]
    assert doctor.main(seg) == 0
    (voc / "SegmentationClass" / "val_00001.png").unlink()
    assert doctor.main(seg) == 1
    (line,) = lines(capsys.readouterr().out, "fail")
    assert line.startswith("fail data val: ") and "missing mask file" in line and "val_00001.png" in line
