"""`python train.py task=segmentation` end to end as a user runs it: the embedded set's stated mIoU, bit-exact
resume, eval.py equal to the logged metric, 2-process gloo DDP and the mIoU table over seeds (all slow)."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
import torch
from conftest import run_cli

from acon.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
STATED_MIOU = 60.0  # docs/transfer.md: the embedded default run's final mIoU is above this (measured there)


def tiny(root, out, *extra) -> list[str]:
    """A 32-image shapes set at 32 px, batch 8, 2 epochs, one thread: seconds per run."""
    return [
        "task=segmentation",
        f"data.root={root}",
        "data.train_samples=32",
        "data.val_samples=7",  # odd: 4 + 3 images on 2 ranks, each counted once
        "data.shapes_size=32",
        "data.img_size=32",
        "recipe.batch_size=8",
        "recipe.base_batch_size=8",
        "recipe.epochs=2",
        "recipe.warmup_steps=2",
        "trainer.threads=1",
        "trainer.progress=false",
        "trainer.eval_batch_size=4",
        "trainer.device=cpu",
        f"out_dir={out}",
        *extra,
    ]


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("seg") / "shapes"


def test_embedded_default_run_reaches_its_stated_miou(tmp_path):
    env = {"ACON_CACHE": str(tmp_path / "cache")}  # the set is written on first use, here
    proc = run_cli(
        [
            sys.executable,
            "train.py",
            "task=segmentation",
            "trainer.progress=false",
            "trainer.threads=1",
            f"out_dir={tmp_path}",
        ],
        env=env,
        timeout=900,
    )
    run_dir = tmp_path / "seg_shapes-shufflenetv2_x0_5_small-acon_c-s0"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["task"] == "segmentation" and res["primary_metric"] == "mIoU"
    assert res["mIoU"] >= STATED_MIOU, res["mIoU"]
    assert len(res["iou_per_class"]) == 4 and res["pixel_acc"] > 85
    assert f"done: final mIoU {res['mIoU']:.2f}%" in proc.stdout and (run_dir / "best.pt").is_file()
    assert list((tmp_path / "cache").glob("seg_shapes_*/JPEGImages/train_00000.jpg"))


def test_resume_is_bit_exact_and_eval_py_equals_the_logged_miou(shapes_root, tmp_path):
    det = ["deterministic=true", "data.num_workers=0"]
    run_cli([sys.executable, "train.py", *tiny(shapes_root, tmp_path, *det, "run_name=straight")])
    cut = tiny(shapes_root, tmp_path, *det, "run_name=cut")
    stopped = run_cli([sys.executable, "train.py", *cut, "trainer.max_steps=3"])
    assert "stopped at trainer.max_steps=3" in stopped.stdout
    resumed = run_cli([sys.executable, "train.py", *cut])
    assert "resuming from" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert history(tmp_path / "straight") == [
        {**r, "epoch_time_s": h["epoch_time_s"]}
        for r, h in zip(history(tmp_path / "cut"), history(tmp_path / "straight"), strict=True)
    ]
    logged = {r["step"]: r for r in history(tmp_path / "straight")}
    for name in ("best.pt", "last.pt"):
        path = tmp_path / "straight" / name
        run_cli(
            [sys.executable, "eval.py", f"checkpoint={path}"], env={"ACON_EVAL_DIR": str(tmp_path / "eval")}
        )
        row = json.loads(path.with_suffix(".eval.json").read_text())
        val = logged[load_checkpoint(path)["progress"]["step"]]
        assert row["mIoU"] == val["val_mIoU"] and row["pixel_acc"] == val["val_pixel_acc"], name
        assert row["count"] == val["val_count"] == 7 and row["loss"] == pytest.approx(
            val["val_loss"], rel=1e-6
        )


def test_two_gloo_ranks_sum_the_confusion_matrix(shapes_root, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_cli([*torchrun, "train.py", *tiny(shapes_root, tmp_path, "run_name=ddp")], timeout=600)
    run_dir = tmp_path / "ddp"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["world_size"] == 2
    last = history(run_dir)[-1]
    assert last["val_count"] == 7  # 4 + 3 images, none twice
    run_cli(
        [sys.executable, "eval.py", f"checkpoint={run_dir / 'last.pt'}"], env={"ACON_EVAL_DIR": str(tmp_path)}
    )
    row = json.loads((run_dir / "last.eval.json").read_text())  # one process, the whole set
    assert row["mIoU"] == pytest.approx(last["val_mIoU"], abs=1e-9) and row["count"] == 7


def test_miou_table_over_two_seeds_and_two_activations(shapes_root, tmp_path):
    run_cli(
        [
            sys.executable,
            "train.py",
            "-m",
            *tiny(shapes_root, tmp_path, "recipe.epochs=1"),
            "activation=relu,acon_c",
            "seed=0,1",
            "sweep_name=segsweep",
        ],
        timeout=900,
    )
    sweep = tmp_path / "segsweep"
    proc = run_cli([sys.executable, "scripts/make_table.py", str(sweep), "--out", str(tmp_path / "tables")])
    md = (tmp_path / "tables" / "table.md").read_text()
    assert "| shufflenetv2_x0_5_small (seg_shapes) | mIoU % |" in md and "| | paper |  |  |" in md, md
    rows = {
        r.split(",")[2]: r.split(",")
        for r in (tmp_path / "tables" / "table.csv").read_text().splitlines()[1:]
    }
    for act in ("relu", "acon_c"):
        values = [
            json.loads(
                (sweep / f"seg_shapes-shufflenetv2_x0_5_small-{act}-s{s}" / "results.json").read_text()
            )["mIoU"]
            for s in (0, 1)
        ]
        assert rows[act][3] == "2" and rows[act][-1] == "mIoU"
        assert float(rows[act][4]) == pytest.approx(statistics.mean(values), abs=1e-4)
        assert float(rows[act][5]) == pytest.approx(statistics.stdev(values), abs=1e-4)
        assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=2)" in md
    assert "4 complete runs in 2 cells" in proc.stderr


def test_missing_mask_is_one_error_line_before_training(shapes_root, tmp_path):
    from acon.data.seg_shapes import prepare_seg_shapes

    root = prepare_seg_shapes(tmp_path / "voc", train=8, val=2, size=32)
    (root / "SegmentationClass" / "train_00003.png").unlink()
    proc = run_cli(
        [sys.executable, "train.py", *tiny(root, tmp_path, "data.train_samples=8", "data.val_samples=2")],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: train split: missing mask file") and line.endswith(
        "train_00003.png (data.bad_image_policy=skip drops such samples)"
    )
    assert "epoch" not in proc.stdout and "Traceback" not in proc.stderr
