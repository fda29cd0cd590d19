"""scripts/bench_row_lengths.py: one real (tiny) run of its table, and its checks of the options."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script

from acon.fused import native

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_row_lengths")


def test_tiny_table_has_a_row_per_length_and_the_silu_baseline(bench, tmp_path):
    out = tmp_path / "rows.md"
    threads = torch.get_num_threads()
    try:
        text = bench.main(
            ["--lengths", "3,49", "--channels", "8", "--values", "4000", "--repeats", "2", "--threads", "1"]
            + ["--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| ") and ln[2].isalnum()]
    by_s = {r[0].strip(): r for r in rows}
    assert list(by_s) == ["S", "3", "49", "SiLU (ATen)"]
    rows_of = {s: int(by_s[s][1].replace(",", "")) for s in ("3", "49")}
    assert rows_of == {"3": 4000 // (8 * 3) * 8, "49": 4000 // (8 * 49) * 8}  # whole samples: N·C rows
    assert by_s["3"][2].strip() == "row/row"  # shorter than a vector: never the aligned walker
    for r in rows[1:]:
        assert float(r[3]) > 0 and float(r[4]) > 0
    assert float(by_s["SiLU (ATen)"][5]) == 1.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lengths", "49,x"], "--lengths: '49,x' is not a comma-separated list of integers"),
        (["--lengths", "0"], "every row length must be at least 1"),
        (["--lengths", "49", "--channels", "8", "--values", "100"], "values >= channels·S"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_value(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_out_says_where_the_table_went(bench, tmp_path, capsys):
    out = tmp_path / "sub" / "rows.md"
    threads = torch.get_num_threads()
    try:
        bench.main(
            ["--lengths", "49", "--channels", "8", "--values", "400", "--repeats", "1", "--threads", "1"]
            + ["--out", str(out)]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"table written to {out}" and out.read_text().startswith("# bench_row_lengths")


def test_without_the_kernels_it_is_a_usage_error(bench, monkeypatch, capsys):
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--lengths", "49"])
    assert e.value.code == 2
    assert "the C++ kernels are not available here" in capsys.readouterr().err
