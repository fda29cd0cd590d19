"""scripts/bench_meta_parts.py: one real (tiny) run of its table, and its summary's arithmetic."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script

from acon.fused import native

pytestmark = pytest.mark.skipif(not native.available(), reason="C++ kernels could not be built here")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_meta_parts")


def test_unknown_shape_filter_names_the_shapes(bench, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--shapes", "no such shape"])
    assert e.value.code == 2
    assert "resnet50 s4 [32,512,7,7]" in capsys.readouterr().err


def test_one_shape_table(bench, monkeypatch, tmp_path):
    monkeypatch.setitem(bench.ACTIVATION_SHAPES, "tiny [4,24,7,7]", (4, 24, 7, 7))
    threads = torch.get_num_threads()
    out = tmp_path / "parts.md"
    try:
        text = bench.main(["--shapes", "tiny", "--repeats", "2", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    rows = [ln.split("|")[1:-1] for ln in text.splitlines() if ln.startswith("| tiny")]
    ms = {r[1].strip(): float(r[2]) for r in rows if r[2].strip()}
    assert list(ms)[:3] == ["SiLU", "ACON-C", "Meta-ACON"] and ms["SiLU"] > 0
    meta = [name for name in ms if name.startswith("Meta:")]
    assert len(meta) == 4 and all(ms[name] > 0 for name in meta)
    assert "Meta-ACON kernels alone" in rows[-1][1]


def test_summary_sums_the_meta_kernels_against_the_silu_module(bench):
    rows = {"SiLU": 2.0, "ACON-C": 1.9, "Meta-ACON": 2.6, "SiLU: forward kernel": 0.8}
    rows |= {"Meta: a": 0.5, "Meta: b": 0.75, "Meta: c": 1.0, "Meta: d": 0.25}
    text = bench.summary(rows)
    assert text.startswith("Meta-ACON kernels alone 2.500 ms = 1.25× the SiLU module")
    assert "ACON-C 0.95×, Meta-ACON 1.30×" in text
