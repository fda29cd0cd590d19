"""The lines a person reads: banner, one line per epoch, summary; the same lines in train.log; resume."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from conftest import compose, run_cli, tiny_overrides

from acon import console

RUN = "folder-resnet18_small-relu-s0"


def test_progress_bar_only_for_a_terminal_outside_slurm(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert console.show_progress_bar(True) and not console.show_progress_bar(False)
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert not console.show_progress_bar(True)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not console.show_progress_bar(True)


def test_banner_has_a_schedule_slot_and_the_resume_point():
    facts = console.RunFacts(
        "resnet18", "acon_c [fused (C++ kernels)]", 11_700_000, 1_800_000_000, 224, 1_281_167, 50_000, 8,
        "cuda:0", "bf16", 256, 600_000, Path("runs/x"), resumed_step=1200, resumed_from=Path("runs/x/last.pt"),
    )  # fmt: skip
    lines = console.banner_lines(facts, schedule="linear to 0 over 600,000 steps")
    text = "\n".join(lines)
    for part in ("resnet18", "acon_c [fused (C++ kernels)]", "11.70 M params", "1800.0 M MACs", "1,281,167 train",
                 "50,000 val", "8 process(es) on cuda:0", "bf16", "global batch 256", "600,000 steps",
                 "schedule: linear to 0", "run dir: runs/x", "resumed from step 1200 (runs/x/last.pt)"):  # fmt: skip
        assert part in text, part
    assert not any("schedule" in line for line in console.banner_lines(facts))
    assert console.macs_text(155_089_500_000) == "155.1 G" and console.macs_text(2_733_184) == "2.7 M"


def test_slow_rates_keep_two_significant_digits():
    rates = (0.1333, 5.67, 9.99, 10.4, 558.2)
    assert [console.rate_text(r) for r in rates] == ["0.13", "5.7", "10", "10", "558"]


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("acon")]


def test_run_logs_banner_epochs_summary_and_resume_point(tiny_imagenet, tmp_path, caplog, one_thread):
    from acon.trainer import train

    base = tiny_overrides(tiny_imagenet, tmp_path) + [
        "model=resnet18_small",
        "activation=relu",
        "recipe.epochs=2",
    ]
    caplog.set_level(logging.INFO, logger="acon")
    assert train(compose(base + ["trainer.max_steps=8"])) is None  # stops mid-epoch 2 (6 steps an epoch)
    first = _messages(caplog)
    assert first[0].startswith("acon: model resnet18_small (resnet18), activation relu")
    assert any("data: 24 train / 9 val images" in m for m in first)
    assert not any("resumed" in m for m in first)
    caplog.clear()
    results = train(compose(base))
    lines = _messages(caplog)
    run_dir = tmp_path / RUN
    assert f"  resumed from step 8 ({run_dir / 'last.pt'})" in lines
    epochs = [m for m in lines if m.startswith("epoch ")]
    assert len(epochs) == 1 and re.match(
        r"epoch 2/2  step 12/12  train loss \d+\.\d{4}  val top-1 err \d+\.\d\d%  "  # 3 classes: no top-5
        r"best \d+\.\d\d% \(epoch [12]\)  lr \S+  [\d.]+ img/s  elapsed \d:\d\d:\d\d  ETA 0:00:00$",
        epochs[0],
    ), epochs[0]
    assert any(m.startswith("schedule: linear, 12 steps") for m in first)
    assert lines[-5].startswith(f"done: final top-1 error {results['top1_err']:.2f}%")
    assert lines[-4:] == [
        f"  run dir:     {run_dir}",
        f"  results:     {run_dir / 'results.json'}",
        f"  best:        {run_dir / 'best.pt'}",
        f"  TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
    ]


def test_command_prints_the_lines_and_train_log_holds_them(tiny_imagenet, tmp_path):
    """`python train.py` with the bar on but stderr not a terminal: lines on stdout, no bar redraws."""
    env = {"SLURM_JOB_ID": "7"}
    args = tiny_overrides(tiny_imagenet, tmp_path) + ["model=shufflenetv2_x0_5_small", "activation=relu"]
    args = [a for a in args if a != "trainer.progress=false"] + ["trainer.progress=true"]
    proc = run_cli([sys.executable, "train.py", *args], env=env, timeout=300)
    out = proc.stdout.strip().splitlines()
    assert (
        out[0].startswith("acon: model shufflenetv2_x0_5_small")
        and sum(ln.startswith("epoch 1/1") for ln in out) == 1
    )
    run = "folder-shufflenetv2_x0_5_small-relu-s0"
    assert out[-5].startswith("done: final top-1 error") and out[-4] == f"  run dir:     {tmp_path / run}"
    assert "\r" not in proc.stderr and "step/s" not in proc.stderr and "it/s" not in proc.stderr
    logged = [
        re.sub(r"^\[[^]]*\]\[[A-Z]+\] ", "", ln)
        for ln in (tmp_path / run / "train.log").read_text().splitlines()
    ]
    assert logged == out
