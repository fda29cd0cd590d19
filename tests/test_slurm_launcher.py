"""SLURM sweeps: the submitit launcher config, and preemption → checkpoint → requeue → resume of the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS, ROOT, run_cli, tiny_overrides

from acon.checkpoint import load_checkpoint
from acon.preempt import REQUEUE_EXIT_CODE


def compose_with_hydra(overrides: list[str]):
    """Compose train.yaml including the ``hydra`` node (launcher, sweep dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_composes_with_requeue_and_the_trainer_signal():
    from omegaconf import OmegaConf

    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "experiment=resnet50_meta_acon", "hydra.launcher.partition=gpu", "seed=2"]
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["max_num_timeout"] > 0
    assert launcher["nodes"] >= 1 and launcher["gpus_per_node"] == launcher["tasks_per_node"] == 8
    assert launcher["timeout_min"] > 0 and launcher["partition"] == "gpu"
    # SLURM must send a signal the trainer turns into a checkpoint (SIGUSR1/SIGTERM, not submitit's USR2).
    assert launcher["additional_parameters"]["signal"] == f"USR1@{launcher['signal_delay_s']}"
    assert launcher["additional_parameters"]["requeue"] is True
    # Stable, attempt-independent run dir inside the sweep dir: a requeued job finds its own last.pt.
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=True)
    assert sweep == {"dir": "runs/sweep", "subdir": "imagenet-resnet50-meta_acon-s2"}


def test_slurm_launcher_params_make_a_valid_sbatch_script():
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    la = OmegaConf.to_container(compose_with_hydra(["hydra/launcher=slurm"]).hydra.launcher, resolve=True)
    script = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder="/tmp/submitit",
        job_name="acon",
        nodes=la["nodes"],
        ntasks_per_node=la["tasks_per_node"],
        gpus_per_node=la["gpus_per_node"],
        time=la["timeout_min"],
        signal_delay_s=la["signal_delay_s"],
        additional_parameters=la["additional_parameters"],
        setup=la["setup"],
    )
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --requeue" in script
    assert "export MASTER_ADDR=" in script and "--signal=USR2" not in script


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before it could be preempted:\n{err[-3000:]}"
            )
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run to start training")
        time.sleep(0.02)


def _preempt_and_resume(tiny_imagenet, tmp_path, sig: signal.Signals, multirun: bool):
    out = tmp_path / "runs"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "SLURM_JOB_ID": "4242",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
    }
    args = [sys.executable, "train.py", *(["-m"] if multirun else [])]
    args += tiny_overrides(tiny_imagenet, out) + ["experiment=proxy_digits", "recipe.epochs=8"]
    args += [
        "data.img_size=16",
        "data.val_transform.resize=16",
        "sweep_name=proxy",
        "trainer.ckpt_every_steps=1000",
    ]
    run_dir = (out / "proxy" if multirun else out) / "folder-shufflenetv2_x0_5_small-acon_c-s0"
    metrics = run_dir / "metrics.jsonl"

    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert f"received {sig.name}" in err
    # rank 0 read the job's state (a running job, not a cancel) and asked SLURM to requeue the job
    assert calls.read_text().splitlines() == ["show job -o 4242", "requeue 4242"]
    assert not (run_dir / "results.json").exists()
    state = load_checkpoint(run_dir / "last.pt")
    stopped_at = state["progress"]["step"]
    total = 8 * 6  # 8 epochs x (24 images / batch 4)
    assert 0 < stopped_at < total
    first_epoch = metrics.read_text().splitlines()[0]

    run_cli(args, env={"SLURM_JOB_ID": "4242", "PATH": env["PATH"]})  # the requeued job: same command
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["steps"] == total and res["epochs"] == 8
    lines = metrics.read_text().splitlines()
    assert lines[0] == first_epoch and [json.loads(x)["epoch"] for x in lines] == list(range(1, 9))
    runs = [p.parent for p in out.rglob("results.json")]
    assert runs == [run_dir]  # resumed in place, no new timestamped dir


@pytest.mark.slow  # long; run with -m slow
def test_preemption_checkpoints_requeues_and_rerun_resumes(tiny_imagenet, tmp_path):
    _preempt_and_resume(tiny_imagenet, tmp_path, signal.SIGUSR1, multirun=False)


@pytest.mark.slow
def test_sigterm_in_a_sweep_resumes_the_same_sweep_run(tiny_imagenet, tmp_path):
    _preempt_and_resume(tiny_imagenet, tmp_path, signal.SIGTERM, multirun=True)
