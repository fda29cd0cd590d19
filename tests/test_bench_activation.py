"""scripts/bench_activation.py: shape selection and one real (tiny) run of its table."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_activation")


def test_unknown_shape_filter_names_the_shapes(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--shapes", "no such shape"])
    assert e.value.code == 2
    assert "resnet50 s4 [32,512,7,7]" in capsys.readouterr().err


@pytest.mark.parametrize("stat", ["median", "min"])
def test_one_shape_table(bench, monkeypatch, tmp_path, stat):
    monkeypatch.setitem(bench.SHAPES, "tiny [2,4,5,5]", (2, 4, 5, 5))
    threads = torch.get_num_threads()
    out = tmp_path / "act.md"
    args = ["--shapes", "tiny", "--repeats", "2", "--warmup", "0", "--threads", "1", "--stat", stat]
    try:
        text = bench.main([*args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    assert "1 CPU threads" in text.splitlines()[0] and f"{stat} of 2 interleaved rounds" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| tiny")]
    names = [r.split("|")[2].strip() for r in rows]
    assert names[:2] == ["SiLU", "ReLU"] and any(n.startswith("AconC fused") for n in names)
    silu = rows[0].split("|")
    assert float(silu[4]) == 1.0  # SiLU is its own baseline
    acon = next(r for r in rows if "AconC fused" in r).split("|")
    assert float(acon[5]) == pytest.approx(1.0)  # the fused op saves only x


def test_no_timed_ratio_follows_a_reference_row(bench):
    """A row timed right after a reference row (which churns memory) runs on colder caches: within a round,
    and from one round to the next, SiLU and every fused row follow a light row."""
    order = bench.timing_order(bench.candidates(8, "cpu"))
    cyclic = list(zip([order[-1], *order[:-1]], order, strict=True))
    for before, name in cyclic:
        if name == "SiLU" or "fused" in name:
            assert "reference" not in before, (before, name, order)
