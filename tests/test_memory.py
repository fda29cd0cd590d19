"""Saved-for-backward memory: the paper form keeps ~3x the input, the fused op only the input."""

from __future__ import annotations

import torch

from acon import AconC, MetaAconC
from acon.fused import cpu
from acon.memory import saved_tensor_bytes


def test_silu_saves_exactly_its_input():
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    m = torch.nn.SiLU()
    assert saved_tensor_bytes(m, lambda: m(x)) == x.numel() * 4


def test_fused_acon_saves_only_the_input_and_reference_about_three_times(monkeypatch):
    monkeypatch.setattr(cpu, "_MODE", {"cpu": "eager"})  # the bytes saved do not depend on compilation
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    nbytes = x.numel() * 4
    ref, fused = AconC(8, impl="reference"), AconC(8, impl="fused")
    assert saved_tensor_bytes(ref, lambda: ref(x)) >= 2.5 * nbytes
    assert saved_tensor_bytes(fused, lambda: fused(x)) <= nbytes + 3 * 8 * 4
    meta = MetaAconC(8, r=2, impl="fused")
    per_sample_beta = 4 * 8 * 4
    # x itself plus the small β network's tensors (at most a few per-sample (N, C) vectors)
    assert saved_tensor_bytes(meta, lambda: meta(x)) <= nbytes + 8 * per_sample_beta
