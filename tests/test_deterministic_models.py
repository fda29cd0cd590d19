"""Every model family trains under ``torch.use_deterministic_algorithms(True)`` with no op that torch lists
as nondeterministic (and raising) on CUDA: checked on a CPU by recording every op of a forward + backward."""

from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from models.registry import create_model, get_entry, list_models

# torch.use_deterministic_algorithms' list of ops that raise on CUDA, as the Python functions a model calls
# and as the ATen ops (forward and backward) they become
CUDA_RAISING_FUNCTIONS = {
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool2d", "adaptive_max_pool2d_with_indices",
    "avg_pool3d", "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool1d", "max_unpool2d",
    "max_unpool3d", "ctc_loss", "histc", "bincount", "median", "kthvalue", "grid_sample", "put_",
}  # fmt: skip
CUDA_RAISING_ATEN = {
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "avg_pool3d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d", "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward",
    "_upsample_bicubic2d_aa_backward", "reflection_pad1d_backward", "reflection_pad2d_backward",
    "reflection_pad3d_backward", "nll_loss2d_forward", "_ctc_loss_backward", "put_", "histc", "bincount",
    "median", "kthvalue", "grid_sampler_2d_backward", "grid_sampler_3d_backward", "_embedding_bag_backward",
}  # fmt: skip


class FunctionNames(TorchFunctionMode):
    """The names of the torch functions called."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class AtenNames(TorchDispatchMode):
    """The names of the ATen ops run (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def _one_per_family() -> list[str]:
    seen: dict[str, str] = {}
    for name in list_models():
        seen.setdefault(get_entry(name).family, name)
    return sorted(seen.values())


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_each_run_sets_the_deterministic_mode_its_config_asks_for():
    """The jobs of a Hydra sweep (basic launcher) run one after another in one process: a
    ``deterministic=false`` job after a ``deterministic=true`` one must not inherit torch's deterministic mode."""
    from conftest import compose

    from acon.run_state import configure_determinism

    before, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        for flag in (True, False, True, False):
            configure_determinism(compose([f"deterministic={str(flag).lower()}"]))
            assert torch.are_deterministic_algorithms_enabled() is flag
    finally:
        torch.use_deterministic_algorithms(before)
        torch.set_num_threads(threads)  # configure_determinism also sets the run's CPU threads


def test_every_family_is_checked():
    assert {get_entry(n).family for n in _one_per_family()} >= {
        "shufflenetv2", "resnet", "tfnet", "mobilenetv1", "mobilenetv2"
    }  # fmt: skip


def _check_backward(name: str, activation: str, global_pool: str = "avg") -> None:
    torch.manual_seed(0)
    model = create_model(name, activation=activation, num_classes=5, global_pool=global_pool).train()
    x = torch.randn(2, 3, 64, 64)  # the last map is 2x2: the head really pools
    functions, aten = FunctionNames(), AtenNames()
    with functions, aten:
        loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3]))
        loss.backward()
    assert not functions.names & CUDA_RAISING_FUNCTIONS, (name, functions.names & CUDA_RAISING_FUNCTIONS)
    assert not aten.names & CUDA_RAISING_ATEN, (name, aten.names & CUDA_RAISING_ATEN)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("activation", ["relu", "meta_acon"])
@pytest.mark.parametrize("name", _one_per_family())
def test_backward_uses_no_op_without_a_deterministic_cuda_backward(name, activation, deterministic):
    _check_backward(name, activation)


@pytest.mark.parametrize("global_pool", ["max", "avgmax"])
def test_other_global_pools_are_deterministic_too(global_pool, deterministic):
    _check_backward("mobilenetv1_x0_25", "relu", global_pool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", _one_per_family())
def test_cuda_backward_under_deterministic_mode(name, deterministic):
    model = (
        create_model(name, activation="meta_acon", num_classes=5).cuda().to(memory_format=torch.channels_last)
    )
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), torch.arange(4, device="cuda") % 5)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), torch.arange(4, device="cuda") % 5)
    loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))


def test_deterministic_runs_fix_the_cublas_workspace(monkeypatch):
    """cuBLAS raises in deterministic mode unless CUBLAS_WORKSPACE_CONFIG is set before it starts: the
    trainer's determinism setup sets it (a value already in the environment wins)."""
    from omegaconf import OmegaConf

    from acon.run_state import configure_determinism

    cfg = OmegaConf.create(
        {"deterministic": True, "trainer": {"threads": 1, "device": "cpu"}, "data": {"num_workers": 0}}
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    configure_determinism(cfg)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_determinism(cfg)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
