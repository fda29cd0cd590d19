"""CUDA paths checked on a CPU: device stand-ins (``meta``, a patched ``torch.cuda``), low ``ulimit -n``."""

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


FD_PROBE = """
import os, resource, sys
from pathlib import Path
from acon.data.pipelines import build_loader, build_train_pipeline
pipe = build_train_pipeline("gpu", Path(sys.argv[1]), img_size=16, device="cpu")
loader = build_loader(pipe, global_batch=64, num_workers=2, seed=0, pin_memory=False, prefetch_factor=2)
loader.timeout = 20  # a worker dead of EMFILE must not hang the test
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = [batch for batch in loader]  # keep every batch, as queued prefetches are kept
print("batches", len(held), "images", sum(len(b[0]) for b in held))
"""


def test_gpu_pipeline_batches_cost_a_few_file_descriptors_not_one_per_image(tmp_path):
    """Under ``ulimit -n 64``, two workers deliver 4 held batches of 64 encoded images (256 images)."""
    import subprocess
    import sys

    from tests.conftest import ROOT, write_image_folder

    root = write_image_folder(tmp_path, classes=2, per_class=(128, 1), size=(16, 16))
    proc = subprocess.run(
        [sys.executable, "-c", FD_PROBE, str(root / "train")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0 and "batches 4 images 256" in proc.stdout, proc.stderr[-2000:]


def test_encoded_batch_is_one_flat_tensor_with_views():
    from acon.data.fast import collate_augment

    parts = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in (5, 0, 9)]
    batch, targets, bad = collate_augment([((p, torch.zeros(11)), 1) for p in parts])
    enc = batch.images
    assert enc.data.shape == (14,) and enc.offsets.tolist() == [0, 5, 5, 14] and len(enc) == 3
    views = list(enc)
    assert all(torch.equal(v, p) for v, p in zip(views, parts, strict=True))
    assert all(v.untyped_storage().data_ptr() == enc.data.untyped_storage().data_ptr() for v in views)
    assert torch.equal(enc[2], parts[2]) and targets.tolist() == [1, 1, 1] and bad == 0


@pytest.mark.parametrize(("soft", "status"), [(200, "fail"), (400, "warn"), (4096, "ok")])
def test_doctor_checks_ulimit_n_against_the_loader(monkeypatch, tmp_path, soft, status):
    from acon.doctor import system
    from tests.conftest import compose

    cfg = compose(
        [
            "data=imagenet",
            "data.pipeline=gpu",
            "data.num_workers=8",
            "recipe.batch_size=256",
            f"out_dir={tmp_path}",
        ]
    )
    monkeypatch.setattr(system.resource, "getrlimit", lambda what: (soft, 1 << 20))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (check,) = system.check_open_files(cfg)
    assert check.status == status and check.name == "open files", check.line()
    assert f"ulimit -n is {soft}" in check.detail and "8 workers x prefetch 4" in check.detail
    if status == "fail":
        assert "Too many open files" in check.detail and "ulimit -n 4096" in check.detail


def _encoded(mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> torch.Tensor:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).convert(mode).save(out, format=fmt)
    return torch.frombuffer(bytearray(out.getvalue()), dtype=torch.uint8)


class _SyncRecorder:
    """A stand-in for the current CUDA stream: its synchronize() is logged in ``events``."""

    def __init__(self, events: list) -> None:
        self.events = events

    def synchronize(self) -> None:
        self.events.append("sync")


def test_one_cmyk_or_png_file_leaves_the_rest_in_one_nvjpeg_batch(monkeypatch):
    """nvJPEG (a stand-in that, like it, rejects a list holding a CMYK JPEG or a PNG) gets one call, after
    the current stream's queued work (nvJPEG writes without waiting for it: pytorch/vision#9606)."""
    import torchvision.io

    from acon.data import decode_check, gpu

    real, calls, events = torchvision.io.decode_jpeg, [], []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _SyncRecorder(events))

    def fake_nvjpeg(data, mode, device):
        events.append("decode")
        calls.append(len(data) if isinstance(data, list) else 1)
        items = data if isinstance(data, list) else [data]
        if not all(gpu.nvjpeg_decodable(d) for d in items):
            raise RuntimeError("nvjpeg: NVJPEG_STATUS_JPEG_NOT_SUPPORTED")
        out = [real(d, mode=mode) for d in items]
        return out if isinstance(data, list) else out[0]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_nvjpeg)
    monkeypatch.setattr(
        decode_check, "_upload", lambda img, device: img
    )  # no device here: CPU tensors stand in
    data = [
        _encoded(seed=0),
        _encoded("CMYK"),
        _encoded(seed=1),
        _encoded(fmt="PNG"),
        _encoded("L"),
        _encoded(),
    ]
    out = gpu.decode_batch(data, torch.device("cuda"))
    assert calls == [4]  # the four JPEGs nvJPEG takes, in one batch; CMYK and PNG on the CPU
    assert events == ["sync", "decode"]
    want = gpu.decode_batch(data, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))


def test_checked_decoder_keeps_checking_sampled_batches():
    """A device decoder that goes wrong after the first batches is caught by a later sampled check."""
    import warnings

    from acon import fallbacks
    from acon.data.decode_check import CheckedDecoder
    from acon.data.gpu import decode_batch

    fallbacks.clear()
    calls = []

    def drifting(data, device):  # right for three batches, then off by 60 levels
        calls.append(len(data))
        imgs = decode_batch(data, device)
        return imgs if len(calls) <= 3 else [(i.int() + 60).clamp(0, 255).to(torch.uint8) for i in imgs]

    decoder = CheckedDecoder(torch.device("cpu"), drifting, check=True, every=2)
    batch = [_encoded(seed=s) for s in range(3)]
    want = decode_batch(batch, torch.device("cpu"))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        outs = [decoder(batch) for _ in range(7)]
    reason = fallbacks.recorded()["data.pipeline=gpu nvJPEG decode on cpu"]
    assert reason.startswith("batch 4: image 1 differs")  # batch 4 is the 2nd sampled check: image 1
    assert len(calls) == 5 and decoder.on_cpu  # batches 0-4 on the device, CPU from batch 5 on
    for out in outs[:3] + outs[4:]:
        assert all(torch.equal(a, b) for a, b in zip(out, want, strict=True))
    fallbacks.clear()


@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_pipeline_batches_follow_trainer_channels_last(tmp_path, channels_last):
    from types import SimpleNamespace

    from acon.tasks.classification import ClassificationTask
    from tests.conftest import compose, tiny_overrides, write_image_folder

    root = write_image_folder(tmp_path / "data", classes=3, per_class=(4, 2))
    ov = tiny_overrides(root, tmp_path / "runs") + [
        "data.pipeline=gpu",
        f"trainer.channels_last={channels_last}",
    ]
    info = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    train, val, _ = ClassificationTask().build_loaders(compose(ov), info)
    assert train.transform.channels_last is channels_last and val.transform.channels_last is channels_last
    images, _, _ = next(iter(train))
    assert images.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


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
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
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


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_device_augment_follows_channels_last(channels_last):
    from acon.data.fast import collate_augment
    from acon.data.gpu import DeviceAugment, EncodedTrainTransform

    batch, _, _ = collate_augment([(EncodedTrainTransform()(_encoded(seed=s)), 0) for s in range(3)])
    out = DeviceAugment(16, device="cuda", channels_last=channels_last)(batch)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_cuda and out.is_contiguous(memory_format=fmt)


@pytest.mark.gpu
@cuda
def test_nvjpeg_batch_with_cmyk_and_png_matches_cpu():
    from acon.data.gpu import decode_batch

    data = [_encoded(seed=0), _encoded("CMYK"), _encoded(fmt="PNG"), _encoded("L"), _encoded(seed=2)]
    gpu = decode_batch(data, torch.device("cuda"))
    cpu = decode_batch(data, torch.device("cpu"))
    for a, b in zip(gpu, cpu, strict=True):
        assert a.is_cuda and a.shape == b.shape and (a.cpu().float() - b.float()).abs().mean() < 3


class _Stream:
    """A stand-in for a CUDA stream: records what waits on it."""

    def wait_stream(self, other) -> None:
        pass


class _DeviceBatch:
    """A stand-in for a CUDA tensor of a batch: ``.to`` keeps it, ``record_stream`` is counted."""

    recorded = 0

    def to(self, *args, **kwargs) -> _DeviceBatch:
        return self

    def record_stream(self, stream) -> None:
        _DeviceBatch.recorded += 1


def test_device_loader_on_cuda_passes_a_batch_whose_images_were_all_skipped(monkeypatch):
    """data.bad_image_policy=skip: a batch whose every image failed to decode is (None, None, skipped); on
    CUDA the loader used to call record_stream on None and end the run with an AttributeError."""
    import contextlib

    from acon.data.gpu import DeviceLoader

    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    good = (_DeviceBatch(), _DeviceBatch(), 0)
    batches = list(DeviceLoader([good, (None, None, 4), good], None, "cuda"))
    assert [b[2] for b in batches] == [0, 4, 0] and batches[1][:2] == (None, None)
    assert _DeviceBatch.recorded == 4  # images and targets of the two readable batches


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
