"""CUDA paths checked on a CPU: device stand-ins (``meta``, a patched ``torch.cuda``); the input pipeline's are in
``tests/test_gpu_data_paths.py``."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from acon import checkpoint as ckpt


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_resume_restores_rng_from_a_device_map_location(tmp_path):
    """A checkpoint loaded onto a device (``meta`` stands in for ``cuda:N``) restores its RNG states."""
    model = nn.Linear(3, 2)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"model": model.state_dict(), "rng": [ckpt.capture_rng()], "progress": {"step": 7}}
    expected = _draws()
    ckpt.atomic_save(state, tmp_path / "last.pt")
    random.seed(9), np.random.seed(9), torch.manual_seed(9)

    loaded = ckpt.load_checkpoint(tmp_path / "last.pt", map_location="meta")
    assert loaded["model"]["weight"].device.type == "meta"  # the weights went where they were asked
    assert loaded["rng"][0]["torch"].device.type == "cpu"
    assert loaded["progress"] == {"step": 7}
    ckpt.restore_rng(loaded["rng"][0])
    assert _draws() == expected


class _CudaRng:
    """A stand-in for torch.cuda's RNG calls on a job that sees ``visible`` GPUs and uses ``current``."""

    def __init__(self, monkeypatch, visible: int, current: int) -> None:
        self.set: list[tuple[int, int]] = []  # (device, state's first byte)
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.state(self.index(device)))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.state(i) for i in range(visible)])
        monkeypatch.setattr(
            torch.cuda, "set_rng_state", lambda t, device="cuda": self.set.append((self.current, int(t[0])))
        )

        def set_all(states):
            if len(states) > visible:
                raise IndexError("list index out of range")  # torch's default_generators[i]
            self.set.extend((i, int(t[0])) for i, t in enumerate(states))

        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)

    def index(self, device) -> int:
        """The GPU a torch.cuda RNG call means: ``"cuda"`` is the current one."""
        index = torch.device(device).index
        return self.current if index is None else index

    @staticmethod
    def state(device: int) -> torch.Tensor:
        return torch.full((16,), 10 + device, dtype=torch.uint8)


def test_cuda_rng_state_is_this_ranks_gpu_and_restores_in_another_gpu_layout(monkeypatch):
    """Saved under torchrun (8 GPUs visible, rank 3 on cuda:3), resumed under SLURM with one GPU per task
    (cuda:0): the rank's own GPU state goes to the GPU it now uses. Before, all 8 states were saved and
    restored by index: an IndexError on every rank."""
    rng = _CudaRng(monkeypatch, visible=8, current=3)
    state = ckpt.capture_rng(torch.device("cuda", 3))
    assert "cuda" not in state and int(state["cuda_device"][0]) == 13
    assert "cuda_device" not in ckpt.capture_rng(torch.device("cpu"))  # a CPU run reads no GPU
    rng2 = _CudaRng(monkeypatch, visible=1, current=0)
    ckpt.restore_rng(state)
    assert rng2.set == [(0, 13)] and rng.set == []
    old = {**state, "cuda": [_CudaRng.state(i) for i in range(8)]}
    del old["cuda_device"]
    ckpt.restore_rng(old)  # an older checkpoint from another layout: its GPU states are left alone
    assert rng2.set == [(0, 13)]


def test_restore_rng_refuses_states_without_values_with_a_clear_error():
    state = ckpt.capture_rng()
    state["torch"] = state["torch"].to("meta")
    with pytest.raises(ckpt.CheckpointError, match="meta device"):
        ckpt.restore_rng(state)


class _RecordingCudaDevice:
    """Stands in for ``torch.cuda.device``: records the device it is entered with."""

    entered: list = []
    current: torch.device | None = None

    def __init__(self, device) -> None:
        self.device = torch.device(device)

    def __enter__(self):
        type(self).entered.append(self.device)
        type(self).current = self.device

    def __exit__(self, *exc) -> None:
        type(self).current = None


def test_triton_launch_guard_is_the_tensors_cuda_device(monkeypatch):
    tk = pytest.importorskip("acon.fused.triton_kernels")
    _RecordingCudaDevice.entered = []
    monkeypatch.setattr(torch.cuda, "device", _RecordingCudaDevice)
    with tk.launch_device(torch.device("cuda", 1)):
        assert _RecordingCudaDevice.current == torch.device("cuda", 1)
    with tk.launch_device(torch.device("cpu")):
        pass
    assert _RecordingCudaDevice.entered == [torch.device("cuda", 1)]


def test_triton_kernels_launch_inside_the_device_guard(monkeypatch):
    """forward and backward launch their kernels while the guard for x's device is entered."""
    import contextlib

    tk = pytest.importorskip("acon.fused.triton_kernels")
    active, launches = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        yield
        active.pop()

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((list(active), args[0].device))

    monkeypatch.setattr(tk, "launch_device", guard)
    monkeypatch.setattr(tk, "_acon_c_fwd_kernel", Kernel())
    monkeypatch.setattr(tk, "_acon_c_bwd_kernel", Kernel())
    x, p = torch.randn(2, 3, 4, 5), torch.ones(1, 3, 1, 1)
    tk.forward(x, p, p, p)
    tk.backward(torch.ones_like(x), x, p, p, p)
    assert launches == [([x.device], x.device), ([x.device], x.device)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_bn_keeps_meta_acon_batch_of_one(device):
    """SyncBN conversion (CUDA's classes built, run on CPU tensors here) keeps BatchNorm2dB1's fallback."""
    import copy

    from acon import MetaAconC
    from acon.activations import BatchNorm2dB1
    from acon.syncbn import convert_sync_batchnorm

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), MetaAconC(8, r=2)).train()
    synced = convert_sync_batchnorm(copy.deepcopy(ref), torch.device(device))
    b1 = [m for m in synced.modules() if "B1" in type(m).__name__]
    assert len(b1) == 2 and not any(type(m) is BatchNorm2dB1 for m in synced.modules())
    assert all(isinstance(m, nn.SyncBatchNorm) == (device == "cuda") for m in b1)
    assert synced.state_dict().keys() == ref.state_dict().keys()
    before = {k: v.clone() for k, v in synced.state_dict().items() if "2.bn" in k}
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(synced(x), ref(x))  # batch of one: running stats in the β-net
    assert all(torch.equal(synced.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(synced(x), ref(x))  # a real batch: batch statistics, as before


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("activation", ["relu", "meta_acon"])
def test_sync_bn_keeps_the_activation_of_timm_batchnorm_act(device, activation):
    """timm's BatchNormAct2d (a BatchNorm subclass holding its activation) stays BatchNorm, then activation:
    before, it became a plain SyncBatchNorm without the activation (ReLU: a linear network between the
    convolutions; ACON: a refused state dict)."""
    import copy

    import timm

    from acon import convert_activations
    from acon.syncbn import convert_sync_batchnorm

    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv3_small_100", num_classes=10).eval()
    if activation != "relu":
        ref = convert_activations(ref, activation, example_input=torch.randn(2, 3, 32, 32)).eval()
    synced = convert_sync_batchnorm(copy.deepcopy(ref), torch.device(device)).eval()
    assert synced.state_dict().keys() == ref.state_dict().keys()
    assert not any(type(m).__name__ in ("BatchNormAct2d", "BatchNorm2dB1") for m in synced.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(synced(x), ref(x))


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [(1, 3, "cuda:0"), (1, 0, "cuda:0"), (8, 3, "cuda:3"), (4, 0, "cuda:0"), (2, 3, "error")],
)
def test_device_follows_the_visible_gpus(monkeypatch, visible, local_rank, expected):
    """SLURM binding one GPU per task shows each rank a single cuda:0, whatever its LOCAL_RANK."""
    from acon import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(visible))))
    if expected == "error":
        with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
            distributed.resolve_device("auto", local_rank)
    else:
        assert distributed.resolve_device("auto", local_rank) == torch.device(expected)


GPU_TESTS = """
import pytest
from acon import fallbacks

@pytest.mark.gpu
def test_nothing_fell_back():
    pass

@pytest.mark.gpu
def test_kernels_fell_back():
    fallbacks.record("acon_c triton cuda float32 contiguous", "y differs from the reference form")

def test_not_a_gpu_test():
    fallbacks.record("data.pipeline=gpu nvJPEG decode on cuda:0", "image 0 differs")
"""


def test_gpu_tests_fail_on_a_recorded_fallback(tmp_path):
    """The suite's hook (tests/conftest.py) fails a ``gpu`` test after which a fallback is recorded."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_call  # noqa: F401\n")
    (tmp_path / "test_gpu_like.py").write_text(GPU_TESTS)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly"]
    cmd += ["-W", "ignore::UserWarning", "--rootdir", str(tmp_path), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 1 and "1 failed, 2 passed" in out, out[-3000:]
    assert "FAILED test_gpu_like.py::test_kernels_fell_back" in out and "FallbackRecorded" in out, out
    assert "1 fast path(s) fell back in this process: acon_c triton cuda float32 contiguous" in out, out


# ---------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cuda_resume_restores_rng(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3), torch.cuda.manual_seed_all(4)
    ckpt.atomic_save({"model": nn.Linear(3, 2).state_dict(), "rng": [ckpt.capture_rng()]}, tmp_path / "a.pt")
    expected = (*_draws(), float(torch.rand(1, device="cuda")))
    loaded = ckpt.load_checkpoint(tmp_path / "a.pt", map_location=torch.device("cuda", 0))
    assert loaded["model"]["weight"].is_cuda and not loaded["rng"][0]["torch"].is_cuda
    ckpt.restore_rng(loaded["rng"][0])
    assert (*_draws(), float(torch.rand(1, device="cuda"))) == expected


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_kernels_run_on_a_non_current_gpu():
    import acon.fused

    torch.cuda.set_device(0)
    x = torch.randn(2, 8, 5, 5, device="cuda:1", requires_grad=True)
    p1, p2, beta = (torch.randn(1, 8, 1, 1, device="cuda:1", requires_grad=True) for _ in range(3))
    y = acon.fused.acon_c(x, p1, p2, beta)
    y.sum().backward()
    ref = acon.fused.acon_c(x.detach().cpu(), p1.detach().cpu(), p2.detach().cpu(), beta.detach().cpu())
    torch.testing.assert_close(y.detach().cpu(), ref, rtol=1e-4, atol=1e-5)


def test_the_per_step_gloo_group_beside_nccl_has_the_run_timeout(monkeypatch):
    """Under NCCL the per-step host flags go through a gloo group of their own; it takes
    trainer.dist_timeout_s (before: gloo's 30-minute default, so a hung rank held the others 30 min)."""
    import datetime

    import torch.distributed as dist

    from acon.engine import HostFlags

    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or "gloo-group")
    assert HostFlags(120.0).group == "gloo-group"
    assert made == [{"backend": "gloo", "timeout": datetime.timedelta(seconds=120)}]
