"""The CPU batch stage (colour jitter + normalisation of uint8 crops) against straightforward references."""

import pytest
import torch
from torchvision.transforms.v2 import functional as F2

from acon.data.cpu_stage import WorkPlanes, jitter_normalize_cpu
from acon.data.fast import IMAGENET_MEAN, IMAGENET_STD, AugBatch, jitter_params
from acon.data.gpu import DeviceAugment, color_jitter_batch

MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
GREY = (0.299, 0.587, 0.114)  # PIL's weights, as ColorJitter on PIL images (torchvision's tensor ops: 0.2989)


def _batch(n: int, h: int = 17, w: int = 23, strength: float = 0.8, seed: int = 0) -> AugBatch:
    """Random uint8 crops with saturated pixels (so that clamps matter) and sampled jitter parameters."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)
    images[:, :, 0, :3] = 255
    images[:, :, 1, :3] = 0
    torch.manual_seed(seed)
    params = torch.tensor([(0, 0, h, w, 0.0, *jitter_params(strength)) for _ in range(n)])
    return AugBatch(images, params)


def _reference(batch: AugBatch, jitter: bool = True, bgr: bool = False) -> torch.Tensor:
    """Per image, per op, in float64: PIL's blends (clamped to 0..255 after each op), then normalise."""
    out = []
    for img, p in zip(batch.images, batch.params.tolist(), strict=True):
        x = img.double()
        for k in [int(o) for o in p[8:11]] if jitter else []:
            f = p[5 + k]
            grey = sum(w * x[c] for c, w in enumerate(GREY))
            target = (torch.zeros_like(grey), grey.mean().expand_as(grey), grey)[k]
            x = (f * x + (1 - f) * target).clamp(0, 255)
        out.append(x.flip(0) if bgr else (x / 255 - MEAN) / STD)
    return torch.stack(out).float()


def _torchvision(batch: AugBatch) -> torch.Tensor:
    """torchvision.transforms.v2.functional's adjust_* and normalize, per image with the same factors."""
    ops = (F2.adjust_brightness, F2.adjust_contrast, F2.adjust_saturation)
    out = []
    for img, p in zip(batch.images, batch.params.tolist(), strict=True):
        x = img.float() / 255
        for k in (int(o) for o in p[8:11]):
            x = ops[k](x, p[5 + k])
        out.append(F2.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)))
    return torch.stack(out)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_cpu_stage_matches_per_image_reference(n, strength):
    batch = _batch(n, strength=strength, seed=n)
    out = DeviceAugment(img_size=17, device="cpu")(batch)
    assert out.shape == (n, 3, 17, 23) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, _reference(batch), atol=1e-4, rtol=0)
    # torchvision's grey weights differ from PIL's in the 4th decimal: < 0.1 of an 8-bit level
    torch.testing.assert_close(out, _torchvision(batch), atol=2e-3, rtol=0)


def test_cpu_stage_matches_the_batched_device_formula():
    """The CPU stage and the batched blends the CUDA path runs compute the same thing."""
    batch = _batch(7, seed=3)
    out = DeviceAugment(img_size=17, device="cpu")(batch)
    x = color_jitter_batch(batch.images.float(), batch.params[:, 5:8], batch.params[:, 8:11], bound=255.0)
    mean, std = MEAN.float() * 255, STD.float() * 255
    torch.testing.assert_close(out, (x - mean) / std, atol=1e-4, rtol=0)


def test_cpu_stage_clamps_only_where_needed_and_at_every_op():
    """Factors at the range ends, exactly 1 and 0, in every order: still the per-op clamped result."""
    images = _batch(1, seed=5).images.expand(12, -1, -1, -1).contiguous()
    factors = [(1.8, 1.9, 0.0), (0.0, 1.9, 1.8), (1.0, 1.0, 1.0), (0.2, 1.7, 1.9)]
    orders = [(0, 1, 2), (2, 1, 0), (1, 2, 0)]
    params = [(0, 0, 17, 23, 0.0, *f, *o) for f in factors for o in orders]
    batch = AugBatch(images, torch.tensor(params))
    out = DeviceAugment(img_size=17, device="cpu")(batch)
    torch.testing.assert_close(out, _reference(batch), atol=1e-4, rtol=0)


@pytest.mark.parametrize("jitter", [True, False])
def test_cpu_stage_bgr_255_and_no_jitter(jitter):
    batch = _batch(5, seed=7)
    out = DeviceAugment(img_size=17, device="cpu", preprocess="bgr_255", color_jitter=jitter)(batch)
    torch.testing.assert_close(out, _reference(batch, jitter, bgr=True), atol=2e-4, rtol=0)
    plain = DeviceAugment(img_size=17, device="cpu", color_jitter=jitter)(batch)
    torch.testing.assert_close(plain, _reference(batch, jitter), atol=1e-4, rtol=0)


def test_cpu_stage_bf16_channels_last_output():
    batch = _batch(3, seed=9)
    stage = DeviceAugment(img_size=17, device="cpu", out_dtype=torch.bfloat16, channels_last=True)
    out = stage(batch)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.float(), _reference(batch), atol=2e-2, rtol=1e-2)


def test_jitter_normalize_cpu_without_work_planes_and_float_input():
    batch = _batch(2, seed=11)
    p = batch.params[1].tolist()
    mean = tuple(255 * m for m in IMAGENET_MEAN)
    scale = tuple(1 / (255 * s) for s in IMAGENET_STD)
    out = torch.empty(3, 17, 23)
    jitter_normalize_cpu(batch.images[1].float(), out, (p[5:8], p[8:11]), mean, scale)
    torch.testing.assert_close(out, _reference(batch)[1], atol=1e-4, rtol=0)
    planes = WorkPlanes(17, 23)
    again = jitter_normalize_cpu(
        batch.images[1], torch.empty(3, 17, 23), (p[5:8], p[8:11]), mean, scale, planes=planes
    )
    assert torch.equal(again, out)


def test_cpu_output_buffers_are_reused_only_when_unreferenced():
    stage = DeviceAugment(img_size=17, device="cpu")
    batch, other = _batch(4, seed=13), _batch(4, seed=14)
    expected = _reference(batch)
    first = stage(batch)
    ptr = first.data_ptr()
    del first
    assert stage(batch).data_ptr() == ptr  # dropped: its buffer is reused, no new pages to fault in
    held = {
        "tensor": stage(batch),
        "view": stage(batch)[1:],
        "detached": stage(batch).detach(),
        "array": stage(batch).numpy(),
        "storage": stage(batch).untyped_storage(),
    }
    for _ in range(4):  # reusing any held buffer would overwrite it with another batch
        stage(other)
    assert len(stage._pool) <= 3
    storage = held.pop("storage")
    held["storage"] = torch.empty(0).set_(storage, 0, expected.shape, expected.stride())
    for name, x in held.items():
        want = expected[1:] if name == "view" else expected
        torch.testing.assert_close(torch.as_tensor(x), want, atol=1e-4, rtol=0, msg=name)
