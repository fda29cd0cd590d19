"""The GPU pipeline's first-batch check of device JPEG decoding against the CPU, exercised on a CPU by
injecting a broken device decoder: one warning, CPU decoding from then on, a record for results.json."""

from __future__ import annotations

import warnings

import pytest
import torch

from acon import fallbacks
from acon.data.decode_check import CheckedDecoder
from acon.data.gpu import decode_batch
from acon.data.pipelines import DeviceLoader, build_loader, build_train_pipeline
from tests.conftest import write_image_folder


@pytest.fixture
def batches(tmp_path):
    root = write_image_folder(tmp_path, classes=2, per_class=(4, 1), size=(48, 40))
    pipe = build_train_pipeline("gpu", root / "train", img_size=24, device="cpu")
    return pipe, build_loader(pipe, global_batch=4, num_workers=0, seed=0)


def shifted(data, device):
    """A device decoder that decodes, but wrongly (as a broken nvJPEG build would)."""
    return [(img.int() + 60).clamp(0, 255).to(torch.uint8) for img in decode_batch(data, device)]


def failing(data, device):
    raise RuntimeError("nvjpeg: NVJPEG_STATUS_EXECUTION_FAILED")


@pytest.mark.parametrize("broken", [shifted, failing])
def test_broken_device_decode_falls_back_to_cpu(batches, broken):
    fallbacks.clear()
    pipe, loader = batches
    want = [b[0].clone() for b in DeviceLoader(loader, pipe.device_transform, "cpu")]
    calls = []

    def device_decode(data, device):
        calls.append(len(data))
        return broken(data, device)

    pipe.device_transform._decode = CheckedDecoder(torch.device("cpu"), device_decode, check=True)
    with pytest.warns(UserWarning, match="nvJPEG decode on cpu failed its self-check") as caught:
        got = [b[0].clone() for b in DeviceLoader(loader, pipe.device_transform, "cpu")]
    assert len([w for w in caught if "self-check" in str(w.message)]) == 1
    assert calls == [4]  # the device decoder is not used after the failed first batch
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    reason = fallbacks.recorded()["data.pipeline=gpu nvJPEG decode on cpu"]
    assert ("levels on average" in reason) if broken is shifted else ("NVJPEG_STATUS" in reason)
    fallbacks.clear()


def test_matching_device_decode_is_kept(batches):
    fallbacks.clear()
    pipe, loader = batches
    calls = []

    def device_decode(data, device):
        calls.append(len(data))
        return decode_batch(data, device)

    pipe.device_transform._decode = CheckedDecoder(torch.device("cpu"), device_decode, check=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(DeviceLoader(loader, pipe.device_transform, "cpu"))
    assert not [w for w in caught if "self-check" in str(w.message)]
    assert calls == [4, 4] and fallbacks.recorded() == {}
