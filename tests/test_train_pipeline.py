"""End-to-end training pipeline: real configs, real JPEG folders, real processes."""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides

from acon.checkpoint import load_checkpoint

RUN = "folder-{model}-{act}-s0"


@pytest.mark.slow  # long; run with -m slow
def test_train_then_eval_end_to_end(tiny_imagenet, tmp_path):
    out = tmp_path / "runs"
    run_cli(
        [
            sys.executable,
            "train.py",
            *tiny_overrides(tiny_imagenet, out),
            "recipe.epochs=2",
            "model=resnet18_small",
            "activation=acon_c",
            "trainer.hist_every=2",
            "trainer.log_every=2",
        ]
    )
    run_dir = out / RUN.format(model="resnet18_small", act="acon_c")
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.jsonl", "results.json"):
        assert (run_dir / name).is_file(), name
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0}).Reload()
    scalars, hists = set(events.Tags()["scalars"]), set(events.Tags()["histograms"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/top1_err"} <= scalars
    assert "val/top5_err" not in scalars  # 3 classes: every label is in the top 5
    assert {"act/layer1.0.acon1.p1", "act/layer1.0.acon1.p2", "act/layer1.0.acon1.beta"} <= hists
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["val_count"] == 9 for h in history)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 12 and results["world_size"] == 1
    assert (
        results["params"] > 1e6
        and results["flops"] > 0
        and results["top1_err"] == history[-1]["val_top1_err"]
    )
    state = load_checkpoint(run_dir / "best.pt")
    assert set(state) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "ema",
        "progress",
        "rng",
        "config",
        "identity",
    }
    best = min(history, key=lambda h: h["val_top1_err"])
    proc = run_cli(
        [sys.executable, "eval.py", f"checkpoint={run_dir / 'best.pt'}"],
        env={"ACON_EVAL_DIR": str(tmp_path / "eval")},
    )
    evaluated = json.loads((run_dir / "best.eval.json").read_text())
    assert evaluated["top1_err"] == pytest.approx(best["val_top1_err"], abs=1e-9)
    assert "top5_err" not in evaluated and "val_top5_err" not in best
    assert "top-1 error" in proc.stdout
    # a whole folder: one row per checkpoint
    run_cli(
        [sys.executable, "eval.py", f"checkpoint={run_dir}"], env={"ACON_EVAL_DIR": str(tmp_path / "eval")}
    )
    import csv

    rows = {Path(r["checkpoint"]).name: r for r in csv.DictReader(open(run_dir / "eval.csv"))}
    assert set(rows) == {"best.pt", "last.pt"}
    assert float(rows["best.pt"]["top1_err"]) == pytest.approx(evaluated["top1_err"])
    assert float(rows["last.pt"]["top1_err"]) == pytest.approx(history[-1]["val_top1_err"])


def _train(overrides):
    from acon.trainer import train

    return train(compose(overrides))


def test_resume_mid_epoch_matches_uninterrupted(tiny_imagenet, tmp_path):
    base = tiny_overrides(tiny_imagenet, tmp_path) + [
        "recipe.epochs=2",
        "deterministic=true",
        "model=shufflenetv2_x0_5_small",
        "activation=meta_acon",
        "trainer.ckpt_every_steps=2",
    ]
    _train(base + ["out_dir=" + str(tmp_path / "a")])
    stopped = _train(base + ["out_dir=" + str(tmp_path / "b"), "trainer.max_steps=3", "data.num_workers=2"])
    assert stopped is None
    mid = load_checkpoint(
        tmp_path / "b" / RUN.format(model="shufflenetv2_x0_5_small", act="meta_acon") / "last.pt"
    )
    assert mid["progress"]["step"] == 3 and mid["progress"]["batch_in_epoch"] == 3  # mid-epoch (6 per epoch)
    _train(base + ["out_dir=" + str(tmp_path / "b")])
    a, b = (
        load_checkpoint(
            tmp_path / d / RUN.format(model="shufflenetv2_x0_5_small", act="meta_acon") / "last.pt"
        )
        for d in ("a", "b")
    )
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for key, va in a["optimizer"]["state"].items():
        assert torch.equal(va["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"]), key
    strip = lambda h: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in h]  # noqa: E731
    assert strip(a["progress"]["history"]) == strip(b["progress"]["history"])


def test_resume_refuses_other_activation(tiny_imagenet, tmp_path):
    from acon.checkpoint import CheckpointError

    base = tiny_overrides(tiny_imagenet, tmp_path, steps=1) + ["model=resnet18_small", "run_name=fixed"]
    _train(base + ["activation=relu"])
    with pytest.raises(CheckpointError, match="activation"):
        _train(base + ["activation=acon_c"])


def _updates(state: dict, init: dict) -> dict:
    return {k: state["model"][k] - init[k] for k in init if init[k].is_floating_point()}


@pytest.mark.slow  # long; run with -m slow
def test_ddp_two_processes_match_one(tiny_imagenet, tmp_path):
    """2 gloo ranks with SyncBatchNorm = 1 process with the same global batch.

    The tolerance is on each tensor's update (w_final - w_init): float32 itself moves the early-layer
    gradients of this tiny, nearly constant-colour data by ~1e-3 relative to a float64 reference (for
    DDP and single process alike), so the bound is 1e-2. Without SyncBN, or with a wrong gradient scale,
    the error is of order 1.
    """
    common = tiny_overrides(tiny_imagenet, tmp_path, steps=2) + [
        "trainer.sync_bn=true",
        "deterministic=true",
        "model=resnet18_small",
        "activation=acon_c",
        "run_name=r",
        "trainer.threads=1",
        "recipe.lr=0.01",
    ]
    run_cli(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            *common,
            f"out_dir={tmp_path / 'ddp'}",
        ],
        timeout=400,
    )
    run_cli([sys.executable, "train.py", *common, f"out_dir={tmp_path / 'one'}"])
    ddp, one = (load_checkpoint(tmp_path / d / "r" / "last.pt") for d in ("ddp", "one"))
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and one["world_size"] == 1
    assert ddp["progress"]["step"] == one["progress"]["step"] == 2
    from omegaconf import OmegaConf

    from acon.builders import build_model
    from acon.checkpoint import load_model_state

    cfg = OmegaConf.create(ddp["config"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.activation, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    du, ou = _updates(ddp, init), _updates(one, init)
    worst = max(((du[k] - ou[k]).norm() / ou[k].norm()).item() for k in ou if ou[k].norm() > 1e-6)
    assert worst < 1e-2, worst
    # the DDP checkpoint loads into a single-process model
    load_model_state(model, ddp["model"], "ddp last.pt")
    # the DDP checkpoint loads into a single-process model
    from omegaconf import OmegaConf

    from acon.builders import build_model
    from acon.checkpoint import load_model_state

    cfg = OmegaConf.create(ddp["config"])
    model = build_model(cfg.model, cfg.activation, 3)
    load_model_state(model, ddp["model"], "ddp last.pt")
    # exact-once distributed evaluation: 9 val images over 2 ranks
    env = {"ACON_EVAL_DIR": str(tmp_path / "eval")}
    run_cli(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "eval.py",
            f"checkpoint={tmp_path / 'ddp' / 'r' / 'last.pt'}",
            f"out={tmp_path / 'e2.json'}",
        ],
        env=env,
    )
    run_cli(
        [
            sys.executable,
            "eval.py",
            f"checkpoint={tmp_path / 'ddp' / 'r' / 'last.pt'}",
            f"out={tmp_path / 'e1.json'}",
        ],
        env=env,
    )
    e2, e1 = (json.loads((tmp_path / f).read_text()) for f in ("e2.json", "e1.json"))
    assert e2["count"] == e1["count"] == 9
    assert e2["top1_err"] == pytest.approx(e1["top1_err"]) and e2["loss"] == pytest.approx(
        e1["loss"], rel=1e-5
    )


@pytest.mark.parametrize("pipeline", ["fast", "gpu", pytest.param("shards", marks=pytest.mark.slow)])
def test_trains_with_each_input_pipeline(tiny_imagenet, tmp_path, pipeline):
    """data.pipeline=fast|gpu|shards run through the same trainer (the device stage runs on CPU here)."""
    root = tiny_imagenet
    if pipeline == "shards":
        root = tmp_path / "shards"
        for split, extra in (("train", []), ("val", ["--no-shuffle"])):
            run_cli(
                [
                    sys.executable,
                    "scripts/prepare_fast_imagenet.py",
                    "--src",
                    str(tiny_imagenet / split),
                    "--dst",
                    str(root),
                    "--split",
                    split,
                    "--samples-per-shard",
                    "5",
                    *extra,
                ]
            )
    ov = tiny_overrides(root, tmp_path) + [
        f"data.pipeline={pipeline}",
        "model=resnet18_small",
        "activation=relu",
    ]
    results = _train(ov)
    assert results["status"] == "complete" and results["steps"] == 6
    run = tmp_path / RUN.format(model="resnet18_small", act="relu")
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["val_count"] == 9 and 0 <= results["top1_err"] <= 100


@pytest.mark.parametrize("task", ["classification", "detection"])
def test_in_process_train_leaves_nothing_for_the_cycle_collector(
    tiny_imagenet, tmp_path, task, no_cycle_collector
):
    """When an in-process ``train()`` returns, its model and loaders are already freed: no reference cycle
    holds them (a GPU gets their memory back at once) and the persistent loader workers have ended. Left to
    the cycle collector, those workers would be shut down out of order, costing 10 s each. Detection covers
    a model that torch.fx cannot trace and a data group without the classification-only keys."""
    from test_fault_checkpoints import descendants

    from acon.trainer import train

    kept = (torch.nn.Module, torch.utils.data.DataLoader)
    workers = ["data.num_workers=2", "data.persistent_workers=true", "recipe.epochs=1"]
    if task == "classification":
        ov = tiny_overrides(tiny_imagenet, tmp_path) + ["data.pipeline=fast", "model=resnet18_small"]
    else:
        ov = [
            "task=detection",
            f"data.root={tmp_path / 'shapes'}",
            "data.train_samples=8",
            "data.val_samples=6",
        ]
        ov += ["recipe.batch_size=4", "recipe.base_batch_size=4", "trainer.eval_batch_size=4"]
        ov += [f"out_dir={tmp_path / 'runs'}", "trainer.progress=false"]
    cfg = compose(ov + workers)
    before = {id(o) for o in gc.get_objects() if isinstance(o, kept)}
    children = set(descendants(os.getpid()))
    assert train(cfg)["status"] == "complete"
    left = {type(o).__name__ for o in gc.get_objects() if isinstance(o, kept) and id(o) not in before}
    assert left == set(), sorted(left)
    assert set(descendants(os.getpid())) - children == set()


@pytest.mark.parametrize("compile_model", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bf16_autocast_channels_last_and_compile_train(tiny_imagenet, tmp_path, compile_model):
    """The GPU-oriented trainer options run on CPU too: bf16 autocast, channels_last, torch.compile
    (the compiled variant takes minutes of Inductor compilation on 2 cores, so it is marked slow)."""
    ov = tiny_overrides(tiny_imagenet, tmp_path, steps=2) + [
        "model=shufflenetv2_x0_5_small",
        "activation=acon_c",
        "activation.layer.impl=reference",
        "trainer.precision=bf16",
        "trainer.channels_last=true",
        f"trainer.compile={compile_model}",
        "recipe.lr=0.01",
    ]
    assert _train(ov) is None  # stopped at max_steps with a checkpoint
    state = load_checkpoint(tmp_path / RUN.format(model="shufflenetv2_x0_5_small", act="acon_c") / "last.pt")
    assert state["progress"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # weights stay fp32


def test_synthetic_data_for_throughput(tmp_path):
    """data=synthetic trains with no files at all (throughput measurements)."""
    ov = [
        "data=synthetic",
        "data.num_classes=5",
        "data.img_size=16",
        "data.train_samples=16",
        "data.val_samples=6",
        "recipe.batch_size=4",
        "recipe.base_batch_size=4",
        "recipe.iterations=null",
        "recipe.epochs=1",
        "trainer.progress=false",
        "trainer.device=cpu",
        "trainer.eval_batch_size=4",
        "model=resnet18_small",
        "activation=swish",
        f"out_dir={tmp_path}",
    ]
    results = _train(ov)
    assert results["status"] == "complete" and results["steps"] == 4 and results["images_per_s"] > 0
