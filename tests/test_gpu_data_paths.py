"""The GPU input pipeline's CUDA paths checked on a CPU (stand-in streams and nvJPEG, a low ``ulimit -n``), and
on a GPU (``-m gpu``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
