"""scripts/gpu_check.sh's shape: the budget of a lent GPU, no step able to stop the others, the key checks first."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()
ORDER = [
    "resume",
    "triton",
    "pipeline",
    "deterministic",
    "doctor",
    "activation",
    "train_step",
    "compiled",
    "smoke",
]


def _branch(mode: str) -> str:
    cpu, gpu = SCRIPT.split("if [[ $mode == cpu ]]; then", 1)[1].split("\nelse\n", 1)
    return cpu if mode == "cpu" else gpu.split("\nfi\n", 1)[0]


def _limits(mode: str) -> tuple[int, list[int]]:
    block = SCRIPT.split(f"mode={mode} ", 1)[1].split("\n", 4)
    text = "\n".join(block)
    budget = int(re.search(r"budget=(\d+)", text).group(1))
    limits = [int(v) for v in re.search(r"limits=\(([\d ]+)\)", text).group(1).split()]
    return budget, limits


def test_script_parses_and_never_stops_at_the_first_failure():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    assert "set -uo pipefail" in SCRIPT and not re.search(r"^\s*set -[a-z]*e", SCRIPT, re.M)
    assert 'timeout -k 5 "$t"' in SCRIPT and "PIPESTATUS[0]" in SCRIPT  # a step's own status, not tee's


def test_steps_fit_eight_minutes_on_a_gpu_and_three_on_a_cpu():
    budget, limits = _limits("gpu")
    assert len(limits) == len(ORDER) and sum(limits) <= budget <= 8 * 60 - 10  # the header counts too
    cpu_budget, cpu_limits = _limits("cpu")
    assert len(cpu_limits) == len(ORDER) and sum(cpu_limits) <= cpu_budget <= 3 * 60 - 10
    # a step never runs past the deadline, with the kill grace counted
    assert "left=$((deadline - SECONDS - 5))" in SCRIPT and "deadline=$((start + budget))" in SCRIPT


def test_the_key_checks_come_first_in_both_modes():
    for mode in ("cpu", "gpu"):
        names = re.findall(r"(?:run_step|skip_step) (\w+) ", _branch(mode))
        assert names == ORDER, (mode, names)
    assert re.findall(r"skip_step (\w+) ", _branch("cpu")) == ["compiled"]  # Inductor: minutes on a CPU
    gpu = _branch("gpu")
    assert "ulimit -n 1024" in gpu and "-m gpu" in gpu and "--open-files 1024" in gpu
    assert "TRITON_INTERPRET=1 ACON_FUSED_CPU_BACKEND=triton" in _branch("cpu")


def test_each_step_writes_its_file_when_it_ends():
    assert 'tee -a "$file"' in SCRIPT and '| tee -a "$summary"' in SCRIPT
    assert 'file="${out}_${n}_${name}.md"' in SCRIPT


def test_benchmark_variants_are_bench_train_steps():
    """The train_step and compiled steps' --variants are bench_train_step's names, with ReLU (the ratios'
    base), compile-only ones only under --compile, and not the CPU-only multi-pass pair (one CUDA op twice)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train_step

    for var in ("eager_variants", "compiled_variants"):
        names = re.search(rf'^{var}="([^"]+)"', SCRIPT, re.M).group(1).split(",")
        assert "ReLU" in names and set(names) <= set(bench_train_step.VARIANTS), (var, names)
        assert not any("multi-pass" in n for n in names), names
        assert var == "compiled_variants" or not set(names) & set(bench_train_step.COMPILE_ONLY)
    assert '--compile --models shufflenetv2_x1_0 \\\n    --variants "${compiled_variants}"' in SCRIPT


def test_every_gpu_marked_test_file_runs_in_the_gpu_branch():
    """Each test file with ``-m gpu`` tests is named in a ``pytest -m gpu`` line of the GPU branch, so a lent
    GPU runs every CUDA test (``gpu`` marks without a file here would run on no machine)."""
    decorated = re.compile(r"^@pytest\.mark\.gpu$", re.M)
    marked = sorted(p.name for p in (ROOT / "tests").glob("test_*.py") if decorated.search(p.read_text()))
    named = set(re.findall(r"tests/(test_\w+\.py)", _branch("gpu")))
    assert marked and not set(marked) - named, sorted(set(marked) - named)
