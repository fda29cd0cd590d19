"""`python train.py task=detection` as users run it: real processes on the embedded shapes set.

All slow (minutes on 2 shared cores): the default command reaches its stated AP; a stopped deterministic
run resumes bit-exactly; eval.py reproduces the logged AP; 2 gloo ranks log the AP one process computes.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from acon.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
DEFAULT_MIN_AP = 30.0  # the default run's stated floor (docs/transfer.md "Detection"; measured 2026-12-01)


def tiny(root: Path, out: Path, run: str | None, *extra: str) -> list[str]:
    """A few CPU steps of task=detection on a 16-image shapes set (8 validation images); ``run``: the
    run_name (None: the default name)."""
    return [
        "train.py",
        "task=detection",
        f"data.root={root}",
        "data.train_samples=16",
        "data.val_samples=8",
        "recipe.batch_size=4",
        "recipe.base_batch_size=4",
        "recipe.epochs=2",
        "recipe.warmup_steps=2",
        "recipe.lr_steps=[6]",
        "trainer.eval_batch_size=4",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.threads=1",
        f"out_dir={out}",
        *([f"run_name={run}"] if run else []),
        *extra,
    ]


def logged(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl by step."""
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def eval_ap(path: Path, tmp: Path) -> dict:
    """eval.py on one checkpoint (one process): its row in <ckpt>.eval.json."""
    run_cli(
        [sys.executable, "eval.py", f"checkpoint={path}", "batch_size=4"], env={"ACON_EVAL_DIR": str(tmp)}
    )
    return json.loads(path.with_suffix(".eval.json").read_text())


def test_default_command_reaches_its_stated_ap(tmp_path):
    """`python train.py task=detection`, nothing else but where the run goes."""
    run_cli(
        [sys.executable, "train.py", "task=detection", "trainer.progress=false", f"out_dir={tmp_path}"],
        timeout=3600,
    )
    results = json.loads((tmp_path / "det_shapes-shufflenetv2_x0_5-acon_c-s0" / "results.json").read_text())
    assert results["task"] == "detection" and results["primary_metric"] == "AP"
    assert results["AP"] >= DEFAULT_MIN_AP and results["AP50"] > results["AP"]


def test_resume_is_bit_exact_and_eval_reproduces_the_logged_ap(tmp_path):
    det = ["deterministic=true", "activation=meta_acon", "trainer.ckpt_every_steps=1"]
    root = tmp_path / "shapes"
    run_cli([sys.executable, *tiny(root, tmp_path, "ref", *det)])
    run_cli([sys.executable, *tiny(root, tmp_path, "stopped", *det, "trainer.max_steps=3")])
    assert load_checkpoint(tmp_path / "stopped" / "last.pt")["progress"]["step"] == 3
    run_cli([sys.executable, *tiny(root, tmp_path, "stopped", *det)])
    ref, resumed = (load_checkpoint(tmp_path / r / "last.pt") for r in ("ref", "stopped"))
    assert ref["progress"]["step"] == resumed["progress"]["step"] == 8
    for k, v in ref["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    for key, st in ref["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], resumed["optimizer"]["state"][key]["momentum_buffer"]), key
    assert logged(tmp_path / "ref")[8]["val_AP"] == logged(tmp_path / "stopped")[8]["val_AP"]
    for name in ("last.pt", "best.pt"):
        path = tmp_path / "ref" / name
        row, record = (
            eval_ap(path, tmp_path),
            logged(tmp_path / "ref")[load_checkpoint(path)["progress"]["step"]],
        )
        assert row["task"] == "detection" and row["count"] == record["val_count"] == 8
        assert all(row[k] == record[f"val_{k}"] for k in ("AP", "AP50", "AP75")), (name, row, record)


def test_two_gloo_ranks_log_the_ap_one_process_computes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run_cli([*torchrun, *tiny(tmp_path / "shapes", tmp_path, "ddp", "activation=acon_c")])
    run_dir = tmp_path / "ddp"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2
    record = logged(run_dir)[load_checkpoint(run_dir / "last.pt")["progress"]["step"]]
    row = eval_ap(run_dir / "last.pt", tmp_path)
    assert record["val_count"] == row["count"] == 8  # every image once across the 2 ranks
    assert row["AP"] == record["val_AP"] == results["AP"]


def test_ap_table_per_backbone_and_activation_over_two_seeds(tmp_path):
    sweep = tmp_path / "detsweep"
    run_cli(
        [sys.executable, "train.py", "-m", *tiny(tmp_path / "shapes", tmp_path, None)[1:]]
        + ["model=shufflenetv2_x0_5,resnet18", "activation=relu,acon_c", "seed=0,1", "sweep_name=detsweep"],
        timeout=1800,
    )
    run_cli([sys.executable, "scripts/make_table.py", str(sweep), "--out", str(tmp_path / "tables")])
    md = (tmp_path / "tables" / "table.md").read_text()
    rows = {
        tuple(r.split(",")[1:3]): r.split(",")
        for r in (tmp_path / "tables" / "table.csv").read_text().splitlines()[1:]
    }
    for model in ("shufflenetv2_x0_5", "resnet18"):
        assert f"| {model} (det_shapes) | AP |" in md, md
        for act in ("relu", "acon_c"):
            values = [
                json.loads((sweep / f"det_shapes-{model}-{act}-s{s}" / "results.json").read_text())["AP"]
                for s in (0, 1)
            ]
            row = rows[(model, act)]
            assert row[3] == "2" and row[-1] == "AP"
            assert float(row[4]) == pytest.approx(statistics.mean(values), abs=1e-4)
            assert float(row[5]) == pytest.approx(statistics.stdev(values), abs=1e-4)
            assert f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=2)" in md


def test_bad_coco_annotations_stop_train_py_in_one_error_line(tmp_path):
    from test_detection_data import ann, write_coco

    path = write_coco(tmp_path, [ann(17, 1, 5, [1, 1, 5, 5])])  # category 5 is not among 3 and 7
    cmd = [
        sys.executable,
        "train.py",
        "task=detection",
        "data=coco",
        f"data.root={tmp_path}",
        "data.num_classes=2",
    ]
    cmd += ["data.ann_file=instances.json", "data.images_dir=img", f"out_dir={tmp_path / 'runs'}"]
    proc = run_cli(cmd, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert (
        f"{path}: annotation id 17" in errors[0] and "category_id 5 is not among the categories" in errors[0]
    )
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
