"""scripts/bench_eager_overhead.py: a real (short) run of its table, its result check, and its option checks."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script

from acon import AconC
from acon.fused import native

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_eager_overhead")


def run(bench, argv):
    threads = torch.get_num_threads()
    try:
        return bench.main(argv + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def table_rows(text: str) -> list[list[str]]:
    return [
        [c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines() if ln.startswith("| resnet50")
    ]


def test_short_run_times_modules_and_kernels_and_says_what_lies_outside(bench, tmp_path):
    out = tmp_path / "overhead.md"
    text = run(
        bench, ["--shapes", "resnet50 s4", "--repeats", "2", "--warmup", "0", "--no-cpp", "--out", str(out)]
    )
    assert out.read_text() == text
    rows = table_rows(text)
    names = [r[1] for r in rows]
    assert names[:5] == [
        "SiLU module",
        "ACON-C module",
        "ACON-C module, p1/p2/β frozen",
        "SiLU kernels alone",
        "ACON-C kernels alone",
    ]
    assert names[5].startswith("outside the kernels: SiLU ") and "ACON-C " in names[5]
    assert "C++ autograd" not in text  # --no-cpp: no extension built, no row
    assert float(rows[0][3]) == 1.0 and all(float(r[2]) > 0 for r in rows[:5])


def test_result_check_refuses_modules_that_differ(bench):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    a, b = AconC(4, impl="fused"), AconC(4, impl="fused")  # different random p1, p2
    bench.check_same(a, a, x, torch.ones_like(x))
    with pytest.raises(RuntimeError, match="does not reproduce"):
        bench.check_same(a, b, x, torch.ones_like(x))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "9x9"], "--shapes 9x9 matches none of"),
        (["--repeats", "0"], "need repeats >= 1"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_value(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--no-cpp"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cpp_autograd_op_builds_and_reproduces_the_module(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("ACON_KERNEL_CACHE", str(tmp_path / "cache"))  # a fresh build of the extension
    text = run(bench, ["--shapes", "resnet50 s4", "--repeats", "1", "--warmup", "0"])
    rows = {r[1]: r for r in table_rows(text)}
    assert (
        float(rows["ACON-C, C++ autograd op"][2]) > 0
    )  # built, checked bit for bit against the module, timed
    assert any("through the C++ autograd op" in name for name in rows)
