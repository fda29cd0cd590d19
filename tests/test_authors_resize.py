"""data.preprocess=bgr_255 evaluates as the authors did: OpenCV INTER_LINEAR to short side 256 (no
antialiasing, long side int(256 / H * W + 0.5)), centre crop 224, BGR 0-255 (their train.py's
OpencvResize + CenterCrop + ToBGRTensor), pixel for pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import compose
from PIL import Image

from acon.data import build_val_dataset
from acon.data.fast import FastValTransform, collate_augment, read_bytes
from acon.data.gpu import DeviceAugment
from acon.data.transforms import resize_linear_opencv, val_transform


def _taps(src: int, dst: int) -> list[tuple[int, float]]:
    """OpenCV's source position per output pixel: half-pixel centres, computed in double, kept in float32."""
    out = []
    for d in range(dst):
        f = np.float32((d + 0.5) * (src / dst) - 0.5)
        i = math.floor(f)
        out.append((i, np.float32(f - np.float32(i))))
    return out


def _weights(f: np.float32) -> tuple[int, int]:
    """Interpolation weights in 1/2048 (INTER_RESIZE_COEF_SCALE), rounded half to even like cvRound."""
    return int(np.rint((np.float32(1) - f) * np.float32(2048))), int(np.rint(f * np.float32(2048)))


def opencv_linear(img: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR) for uint8 HWC images, restated
    from OpenCV's resize.cpp: fixed-point horizontal pass, then the vectorised vertical pass (values
    shifted to 16 bits, high halves of the 16x16-bit products, rounding shift by 2)."""
    h, w, _ = img.shape
    src = img.astype(np.int64)
    cols = []
    for i, f in _taps(w, out_w):
        if i < 0 or i >= w - 1:  # a tap past the edge: the edge pixel alone
            i, f = min(max(i, 0), w - 1), np.float32(0)
        a0, a1 = _weights(f)
        cols.append(src[:, i] * a0 + src[:, min(i + 1, w - 1)] * a1)
    horizontal = np.stack(cols, axis=1) >> 4
    rows = []
    for i, f in _taps(h, out_h):
        b0, b1 = _weights(f)  # rows past the edge are clamped; the weights are kept
        r0, r1 = horizontal[min(max(i, 0), h - 1)], horizontal[min(max(i + 1, 0), h - 1)]
        rows.append((((r0 * b0) >> 16) + ((r1 * b1) >> 16) + 2) >> 2)
    return np.clip(np.stack(rows), 0, 255).astype(np.uint8)


def authors_eval_transform(img: Image.Image, size: int = 256, crop: int = 224) -> torch.Tensor:
    """Their OpencvResize(256) + torchvision CenterCrop(224) + ToBGRTensor, with cv2.resize restated."""
    bgr = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])
    h, w, _ = bgr.shape
    tw, th = (int(size / h * w + 0.5), size) if h < w else (size, int(size / w * h + 0.5))
    rgb = opencv_linear(bgr, tw, th)[:, :, ::-1]
    top, left = int(round((th - crop) / 2.0)), int(round((tw - crop) / 2.0))
    out = rgb[top : top + crop, left : left + crop][:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float()


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A JPEG-decoded photo-like image: smooth regions and edges."""
    g = np.random.default_rng(seed)
    small = Image.fromarray(g.integers(0, 256, (h // 12 + 1, w // 12 + 1, 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC)


SIZES = [(640, 427), (427, 640), (500, 375), (512, 512), (333, 500), (200, 150), (1030, 683)]


@pytest.mark.parametrize("src,dst", [((427, 640), (256, 384)), ((30, 40), (256, 341)), ((9, 7), (4, 3)),
                                     ((512, 512), (256, 256)), ((5, 300), (17, 256))])  # fmt: skip
def test_resize_matches_restated_opencv(src, dst):
    img = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    got = resize_linear_opencv(torch.from_numpy(img).permute(2, 0, 1).contiguous(), *dst)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), opencv_linear(img, dst[1], dst[0]))


@pytest.mark.parametrize("w,h", SIZES)
def test_bgr_255_val_transform_is_the_authors_pixel_for_pixel(w, h):
    img = _photo(w, h, w + h)
    theirs = authors_eval_transform(img)
    assert torch.equal(val_transform(224, 256, "bgr_255")(img), theirs)
    if (w, h) == (640, 427):  # the antialiased Resize(256) used before is visibly different
        old = val_transform(224, 256, "rgb_normalized", (0, 0, 0), (1 / 255, 1 / 255, 1 / 255))(img)
        assert (old.flip(0) - theirs).abs().mean() > 1.0


def test_eval_data_config_and_fast_pipelines_use_the_authors_resize(tmp_path):
    """eval.py's path for the authors' checkpoints (data.preprocess=bgr_255) and the fast/shard val path."""
    for c, (w, h) in enumerate(SIZES[:3]):
        for split in ("train", "val"):
            (tmp_path / split / f"n{c}").mkdir(parents=True)
            _photo(w, h, c).save(tmp_path / split / f"n{c}" / "a.JPEG", quality=90)
    cfg = compose(["data=folder", f"data.root={tmp_path}", "data.num_classes=3", "data.preprocess=bgr_255"])
    val = build_val_dataset(cfg.data)  # eval.py's path
    fast = FastValTransform(224, 256, "bgr_255")
    device = DeviceAugment(224, color_jitter=False, device="cpu", preprocess="bgr_255")
    for (x, _), (path, _) in zip(val, val.samples, strict=True):
        theirs = authors_eval_transform(Image.open(path))
        assert torch.equal(x, theirs), path
        batch, _, _ = collate_augment([(fast(read_bytes(path)), 0)])
        assert torch.equal(device(batch)[0], theirs), path


def test_restatement_matches_cv2_when_installed():
    cv2 = pytest.importorskip("cv2")
    g = np.random.default_rng(0)
    for _ in range(12):
        h, w, out_h, out_w = (int(v) for v in g.integers(2, 400, 4))
        img = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(opencv_linear(img, out_w, out_h), ref), (h, w, out_h, out_w)
        got = resize_linear_opencv(torch.from_numpy(img).permute(2, 0, 1).contiguous(), out_h, out_w)
        assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)
