"""scripts/bench_compile_memory.py: a compiled ACON-C or Meta-ACON network keeps what a compiled ReLU network
keeps with the formula traced in forward (fused-kernel backward or autograd's), and more through the opaque
op (Inductor's partitioner, no code generation)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_script


@pytest.mark.slow
def test_traced_formula_saves_what_relu_saves(tmp_path):
    bench = load_script("bench_compile_memory")
    threads = torch.get_num_threads()
    out = tmp_path / "mem.md"
    try:
        text = bench.main(["--model", "shufflenetv2_x0_5", "--batch", "4", "--img", "32", "--threads", "1",
                           "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    ratio = {
        r.split("|")[2].strip(): float(r.split("|")[6]) for r in text.splitlines() if r.startswith("| shuff")
    }
    assert ratio["ReLU"] == 1.0
    assert ratio["ACON-C traced formula"] <= 1.05
    assert ratio["ACON-C formula, autograd backward"] <= 1.05
    # Meta-ACON no longer keeps the BN output (the (N, C) β-network tensors remain, large at this size)
    assert ratio["Meta-ACON traced formula"] < ratio["Meta-ACON opaque op"] - 0.3
    assert ratio["ACON-C opaque op"] > ratio["ACON-C traced formula"] + 0.1
