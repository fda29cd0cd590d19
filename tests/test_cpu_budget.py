"""CPU threads and loader workers (``auto``): never more than the cores a process may use (affinity,
cgroup quota, processes on the node), and the banner says what was chosen and why."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, compose, load_script, run_cli, tiny_overrides

from acon import cpu_budget
from acon.cpu_budget import Cores, processes_on_node, resolve

AUTO = ["trainer.threads=auto", "data.num_workers=auto"]


def _cgroup_v2(tmp_path, quotas: dict[str, str], own: str):
    root, proc = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    for path, value in quotas.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(value + "\n")
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_v2_quota_is_the_tightest_from_the_own_cgroup_up(tmp_path):
    root, proc = _cgroup_v2(
        tmp_path,
        {"": "max 100000", "kubepods": "300000 100000", "kubepods/pod1": "150000 100000"},
        "/kubepods/pod1",
    )
    assert cpu_budget.cgroup_quota(root, proc) == 1.5
    proc.write_text("0::/\n")
    assert cpu_budget.cgroup_quota(root, proc) is None  # the root says max: no quota


def test_cgroup_v1_quota(tmp_path):
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("250000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert cpu_budget.cgroup_quota(tmp_path / "cgroup", proc) == 2.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_budget.cgroup_quota(tmp_path / "cgroup", proc) is None


def test_usable_cores_are_the_affinity_cut_to_the_quota_rounded_down(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, proc = _cgroup_v2(tmp_path, {"": "150000 100000"}, "/")
    assert cpu_budget.usable_cores(root, proc) == Cores(1, affinity, 1.5)
    root, proc = _cgroup_v2(tmp_path / "none", {"": "max 100000"}, "/")
    assert cpu_budget.usable_cores(root, proc) == Cores(affinity, affinity, None)


@pytest.mark.parametrize("on_gpu", [False, True], ids=["cpu", "gpu"])
def test_auto_never_exceeds_the_usable_cores(on_gpu, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for usable in range(1, 65):
        for procs in range(1, usable + 1):
            for workers in ("auto", 0, 1):
                plan = resolve("auto", workers, on_gpu, Cores(usable, usable, None), procs)
                if workers == 1 and usable // procs < 2:
                    continue  # one explicit worker alone fills a one-core share
                assert plan.threads >= 1 and plan.workers >= 0
                assert procs * (plan.threads + plan.workers) <= usable, (usable, procs, workers, plan)
                assert "oversubscribed" not in plan.line()
    crowded = resolve("auto", "auto", on_gpu, Cores(2, 2, None), processes=4)  # more ranks than cores
    assert (crowded.threads, crowded.workers) == (1, 0) and "4 > 2, oversubscribed" in crowded.line()


def test_two_cores_give_one_thread_and_one_worker_on_the_cpu(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    plan = resolve("auto", "auto", False, Cores(2, 2, None), 1)
    assert (plan.threads, plan.workers) == (1, 1)
    assert resolve(3, 1, False, Cores(2, 2, None), 1).line().count("oversubscribed") == 1  # explicit: kept


def test_omp_num_threads_caps_auto(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    plan = resolve("auto", "auto", False, Cores(16, 16, None), 1)
    assert plan.threads == 2 and "capped by OMP_NUM_THREADS=2" in plan.line()


def test_processes_on_the_node():
    n = os.cpu_count()
    assert processes_on_node({}) == 1
    assert processes_on_node({"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    slurm = {"SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert processes_on_node(slurm, affinity=n) == 4  # tasks not bound to CPUs share the node
    if n > 1:
        assert processes_on_node(slurm, affinity=1) == 1  # a bound task's affinity is its share


def test_banner_names_the_choice_under_a_cgroup_quota(
    tiny_imagenet, tmp_path, monkeypatch, caplog, one_thread
):
    from acon.trainer import train

    root, proc = _cgroup_v2(tmp_path, {"": "max 100000", "job": "100000 100000"}, "/job")
    monkeypatch.setattr(cpu_budget, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpu_budget, "PROC_SELF_CGROUP", proc)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    caplog.set_level(logging.INFO, logger="acon")
    cfg = compose(
        tiny_overrides(tiny_imagenet, tmp_path, steps=2) + ["model=resnet18_small", "activation=relu"] + AUTO
    )
    train(cfg)
    banner = [r.getMessage() for r in caplog.records if r.getMessage().startswith("  cpu: ")]
    affinity = len(os.sched_getaffinity(0))
    assert banner and banner[0].startswith(
        f"  cpu: 1 thread [auto] + 0 loader workers [auto] per process, 1 process on 1 usable core "
        f"(affinity {affinity}, cgroup CPU quota 1)"
    ), banner
    assert torch.get_num_threads() == 1 and (cfg.trainer.threads, cfg.data.num_workers) == (1, 0)


def test_train_py_under_a_restricted_affinity(tiny_imagenet, tmp_path):
    """The real command on one CPU: one thread, no worker, passive OpenMP waiting, all in the banner."""
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    args = tiny_overrides(tiny_imagenet, tmp_path, steps=2) + [
        "model=resnet18_small",
        "activation=relu",
        *AUTO,
    ]
    proc = subprocess.run(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        env={**env, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next((ln for ln in proc.stdout.splitlines() if "  cpu: " in ln), "")
    assert re.search(
        r"cpu: 1 thread \[auto\] \+ 0 loader workers \[auto\] per process, 1 process on 1 usable core "
        r"\(affinity 1, (no cgroup CPU quota|cgroup CPU quota [\d.]+)\); OMP_WAIT_POLICY=PASSIVE$",
        line,
    ), proc.stdout
    saved = yaml.safe_load(next(tmp_path.glob("*/config.yaml")).read_text())
    assert (saved["trainer"]["threads"], saved["data"]["num_workers"]) == (1, 0)


def test_a_wrong_value_is_one_line():
    proc = run_cli([sys.executable, "train.py", "trainer.threads=two"], check=False)
    assert proc.returncode == 2
    assert "error: trainer.threads='two' is not allowed: must be an integer > 0 or auto" in proc.stderr


def test_doctor_warns_on_a_busy_machine():
    from acon.doctor.system import check_cpu_load, check_devices

    two = Cores(2, 2, None)
    busy = check_cpu_load((3.2, 2.9, 1.0), two)
    assert busy.status == "warn" and busy.line().startswith(
        "warn CPU load: load average 3.2 (1 min), 2.9 (5 min)"
    )
    assert "2 usable cores" in busy.detail and "the machine is busy" in busy.detail
    assert check_cpu_load((0.4, 0.3, 0.2), two).status == "ok"
    assert any(c.name == "CPU load" for c in check_devices())  # part of python -m acon.doctor


def test_bench_cpu_load_ends_its_busy_processes():
    bench = load_script("bench_cpu_load")
    bench.start_load(2)
    procs = list(bench._busy)
    assert len(procs) == 2 and all(p.poll() is None for p in procs)
    bench.end_load()
    assert not bench._busy and all(p.poll() is not None for p in procs)
