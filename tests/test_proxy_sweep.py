"""scripts/proxy_sweep.sh writes into its run folder; only --update-docs touches the shipped docs/proxy/."""

from __future__ import annotations

import subprocess

import pytest
from conftest import ROOT, run_cli


def _tracked_changes() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def _written_paths(stdout: str) -> list[str]:
    """Every --out folder of the commands the script prints."""
    words = [line.split() for line in stdout.splitlines() if line.startswith("+ ")]
    return [w[w.index("--out") + 1] for w in words if "--out" in w]


def test_default_writes_only_into_the_run_folder(tmp_path):
    proc = run_cli(["bash", "scripts/proxy_sweep.sh", "--out", str(tmp_path), "--dry-run"])
    outs = _written_paths(proc.stdout)
    assert outs and all(o == f"{tmp_path}/proxy_digits" for o in outs), proc.stdout
    assert "docs/proxy" not in proc.stdout
    assert f"out_dir={tmp_path}" in proc.stdout and not any(tmp_path.iterdir())


def test_update_docs_is_explicit(tmp_path):
    proc = run_cli(["bash", "scripts/proxy_sweep.sh", "--out", str(tmp_path), "--update-docs", "--dry-run"])
    assert "docs/proxy" in _written_paths(proc.stdout), proc.stdout
    bad = run_cli(["bash", "scripts/proxy_sweep.sh", "--updatedocs"], check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown option --updatedocs")


def test_activations_option_chooses_the_grid_and_names_a_mistyped_config(tmp_path):
    proc = run_cli(
        [
            "bash",
            "scripts/proxy_sweep.sh",
            "--out",
            str(tmp_path),
            "--activations",
            "relu,gelu,frelu",
            "--dry-run",
        ]
    )
    assert "activation=relu,gelu,frelu seed=0,1" in proc.stdout
    assert "plot_beta" not in proc.stdout and "beta figures skipped" in proc.stdout
    full = run_cli(["bash", "scripts/proxy_sweep.sh", "--activations=relu,acon_c,meta_acon", "--dry-run"])
    assert "activation=relu,acon_c,meta_acon " in full.stdout and "plot_beta.py" in full.stdout
    bad = run_cli(["bash", "scripts/proxy_sweep.sh", "--activations", "relu,gleu", "--dry-run"], check=False)
    assert bad.returncode == 2 and "no activation config gleu" in bad.stderr and " gelu " in bad.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_shrunk_sweep_leaves_tracked_files_alone(tmp_path):
    """The real script, 2 runs of 3 iterations: table and figures appear in the sweep folder, docs/ unchanged."""
    before = _tracked_changes()
    proc = run_cli(
        [
            "bash",
            "scripts/proxy_sweep.sh",
            "--out",
            str(tmp_path),
            "recipe.iterations=3",
            "recipe.warmup_steps=1",
        ],
        env={"PROXY_ACTIVATIONS": "acon_c,meta_acon", "PROXY_SEEDS": "0"},
        timeout=900,
    )
    sweep = tmp_path / "proxy_digits"
    for name in ("table.md", "table.csv", "beta_layers.png", "beta_last_site.png"):
        assert (sweep / name).is_file(), (name, proc.stdout, proc.stderr)
    assert list(sweep.glob("curves_*.png")), proc.stdout
    assert _tracked_changes() == before
