"""The cluster scripts at a small size: bench_startup.py, smoke_train.py and gpu_check.sh (its CPU part)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_cli

sys.path.insert(0, str(ROOT / "scripts"))
import bench_startup  # noqa: E402
import smoke_train  # noqa: E402


def test_bench_startup_small_tree(tmp_path, capsys):
    """The three launches in-process on a 0.2 % tree: counts, index source, and the summary line."""
    root = bench_startup.build_tree(tmp_path / "tree", 0.002)
    assert bench_startup.tree_shape_from(root) == [2, 2562, 100]
    assert len(list((root / "train" / "n00000001").iterdir())) == 1281
    capsys.readouterr()
    best = {}
    for mode in bench_startup.MODES:
        bench_startup.child(mode, root, launched=0.0, workers=0)
        best[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert best[mode]["val"] == 100
    bench_startup.report(best, root)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("startup: cold ") and last.endswith(" s") and "torchvision ImageFolder" in last


@pytest.mark.slow
def test_bench_startup_cli(tmp_path):
    proc = run_cli(
        [
            sys.executable,
            "scripts/bench_startup.py",
            "--scale",
            "0.002",
            "--root",
            str(tmp_path / "t"),
            "--remove",
        ],
        timeout=900,
    )
    assert proc.stdout.strip().splitlines()[-2].startswith("startup: cold ")
    assert not (tmp_path / "t").exists()


def test_bench_startup_rejects_bad_scale():
    proc = run_cli([sys.executable, "scripts/bench_startup.py", "--scale", "2"], check=False)
    assert proc.returncode != 0 and "error: --scale=2.0 must be in (0, 1]" in proc.stderr


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_smoke_dry_run_lists_every_combination(capsys):
    assert smoke_train.main(["--dry-run"]) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert len(cmds) == 12 and all("trainer=gpu" in c and "recipe.iterations=200" in c for c in cmds)
    assert "activation=relu" in cmds[0] and "data.pipeline=reference" in cmds[0]


def test_smoke_takes_every_activation_config(capsys):
    """Any config of configs/activation/ (GELU, FReLU...), ReLU first as the baseline; a typo is refused."""
    assert smoke_train.main(["--dry-run", "--pipelines", "gpu", "--activations", "gelu", "frelu"]) == 0
    cmds = capsys.readouterr().out.strip().splitlines()
    assert [c.split("activation=")[1].split()[0] for c in cmds] == ["relu", "gelu", "frelu"]
    with pytest.raises(SystemExit):
        smoke_train.main(["--dry-run", "--activations", "geluu"])
    assert "invalid choice: 'geluu'" in capsys.readouterr().err


@pytest.mark.slow  # long; run with -m slow
def test_smoke_run_on_cpu_two_steps(tmp_path, capsys):
    """One real 2-step run through train.py (the gpu pipeline, on the CPU), as gpu_check.sh runs them."""
    args = ["--device", "cpu", "--steps", "2", "--batch", "4", "--img", "32", "--workers", "0"]
    rc = smoke_train.main([*args, "--activations", "relu", "--pipelines", "gpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    (row,) = [ln for ln in out.splitlines() if ln.startswith("| gpu | relu |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and cells[3] == "1.00x" and cells[5] == "none"
    assert json.loads((tmp_path / "runs" / "gpu-relu" / "results.json").read_text())["fallbacks"] == {}


@pytest.mark.slow
def test_gpu_check_cpu_mode():
    proc = run_cli(["bash", "scripts/gpu_check.sh", "--cpu"], timeout=1800)
    assert "doctor: ready" in proc.stdout and "| gpu | relu |" in proc.stdout
