"""Fast, GPU and shard input paths: same augmentation distribution and validation pixels as the reference."""

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from acon.data.fast import (
    EncodedBatch,
    FastTrainTransform,
    FastValTransform,
    collate_augment,
    jpeg_header,
    read_bytes,
    rrc_params,
)
from acon.data.folder import ImageFolderDataset
from acon.data.gpu import (
    DeviceAugment,
    DeviceLoader,
    EncodedTrainTransform,
    color_jitter_batch,
    decode_batch,
)
from acon.data.pipelines import PIPELINES, build_loader, build_train_pipeline, build_val_pipeline
from acon.data.shards import ShardDataset, ShardWriter, iter_tar_samples, load_info, split_shards
from acon.data.transforms import train_transform, val_transform

SIZE = 48


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random image with edges (JPEG-friendly, not flat)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    for i in range(12):
        d = root / f"c{i % 3}"
        d.mkdir(exist_ok=True)
        w, h = (200, 150) if i % 4 else (150, 200)
        _photo(w, h, i).save(d / f"{i:03d}.JPEG", quality=90)
    return root


def _jpeg(w: int = 200, h: int = 150, seed: int = 0, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    _photo(w, h, seed).convert(mode).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(
        np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()
    )


def _scale_logratio(boxes: list, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(boxes, dtype=np.float64)
    return arr[:, 2] * arr[:, 3] / (w * h), np.log(arr[:, 3] / arr[:, 2])


N = 400
KS_CRIT = 1.95 * math.sqrt(2 / N)  # alpha = 0.001 for two samples of N


def _reference_boxes(w: int, h: int, scale=(0.08, 1.0)) -> list:
    img = Image.new("RGB", (w, h))
    out = []
    for i in range(N):
        torch.manual_seed(10_000 + i)  # independent of the seeds the paths use
        out.append(T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]))
    return out


def _path_boxes(transform, data_fn) -> list:
    boxes = []
    for i in range(N):
        torch.manual_seed(i)
        boxes.append(transform(data_fn())[1][:4].tolist())
    return boxes


@pytest.mark.parametrize("w,h", [(200, 150), (150, 200), (1000, 60)])
def test_rrc_params_reproduce_torchvision_draws(w, h):
    img = Image.new("RGB", (w, h))
    for seed in range(50):
        torch.manual_seed(seed)
        ref = T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert rrc_params(h, w) == ref


@pytest.mark.parametrize(
    "path",
    # auto decodes through both PIL (DCT-scaled) and torchvision.io; the forced decoders on demand
    [
        "fast_auto",
        pytest.param("fast_pil", marks=pytest.mark.slow),
        pytest.param("fast_tvio", marks=pytest.mark.slow),
        "gpu",
    ],
)
def test_crop_scale_and_aspect_distributions_match_reference(path):
    data = read_bytes_from(_jpeg(200, 150))
    tf = {
        "fast_auto": FastTrainTransform(SIZE),
        "fast_pil": FastTrainTransform(SIZE, decoder="pil"),
        "fast_tvio": FastTrainTransform(SIZE, decoder="tvio"),
        "gpu": EncodedTrainTransform(),
    }[path]
    ref_s, ref_r = _scale_logratio(_reference_boxes(200, 150), 200, 150)
    s, r = _scale_logratio(_path_boxes(tf, lambda: data), 200, 150)
    assert _ks(s, ref_s) < KS_CRIT and _ks(r, ref_r) < KS_CRIT
    # the test has power: a crop range of (0.3, 1) is detected
    bad_s, _ = _scale_logratio(_reference_boxes(200, 150, scale=(0.3, 1.0)), 200, 150)
    assert _ks(bad_s, ref_s) > KS_CRIT


def read_bytes_from(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _reference_and_path(tf, data: bytes, seed: int, jitter: float):
    torch.manual_seed(seed)
    ref = train_transform(SIZE, color_jitter=jitter)(Image.open(io.BytesIO(data)))
    torch.manual_seed(seed)
    sample = tf(read_bytes_from(data))
    batch, _, _ = collate_augment([(sample, 0)])
    out = DeviceAugment(SIZE, color_jitter=bool(jitter), device="cpu")(batch)[0]
    return ref, out


@pytest.mark.parametrize(
    "tf",
    [
        FastTrainTransform(SIZE, color_jitter=0.4),
        FastTrainTransform(SIZE, decoder="pil"),
        EncodedTrainTransform(),
    ],
)
@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_same_seed_gives_reference_image(tf, jitter):
    """Same seed -> same crop, flip and jitter as the reference: pixels agree up to resampling detail."""
    tf.color_jitter = jitter
    data = _jpeg(200, 150, seed=3)
    for seed in range(6):
        ref, out = _reference_and_path(tf, data, seed, jitter)
        assert out.shape == ref.shape == (3, SIZE, SIZE)
        diff = (out - ref).abs() * 0.226 * 255  # in 8-bit levels
        assert diff.mean() < 3.0, (seed, diff.mean())
        # a wrong flip or crop would be far off
        assert (out.flip(-1) - ref).abs().mean() * 0.226 * 255 > diff.mean()


@pytest.mark.parametrize("preprocess", ["rgb_normalized", "bgr_255"])
def test_val_preprocessing_identical_to_reference(folder, preprocess):
    ref_ds = ImageFolderDataset(folder, val_transform(SIZE, 56, preprocess))
    fast_ds = ImageFolderDataset(folder, FastValTransform(SIZE, 56, preprocess), loader=read_bytes)
    dev = DeviceAugment(SIZE, color_jitter=False, device="cpu", preprocess=preprocess)
    for i in range(len(ref_ds)):
        batch, _, _ = collate_augment([fast_ds[i]])
        atol = 1e-5 if preprocess == "rgb_normalized" else 1e-3  # bgr_255 spans 0..255
        assert torch.allclose(dev(batch)[0], ref_ds[i][0], atol=atol)


def test_color_jitter_batch_matches_torchvision_per_sample():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    factors = torch.rand(6, 3) + 0.6
    order = torch.stack([torch.randperm(3) for _ in range(6)]).float()
    out = color_jitter_batch(x, factors, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(6):
        y = x[i]
        for k in order[i].long().tolist():
            y = ops[k](y, float(factors[i, k]))
        # grey weights follow PIL (0.299) where torchvision's tensor ops use 0.2989: < 0.1 of a level
        assert torch.allclose(out[i], y, atol=4e-4)


def test_gpu_path_augmentation_runs_on_cpu_tensors():
    data = [read_bytes_from(_jpeg(200, 150, s)) for s in range(3)]
    tf = EncodedTrainTransform()
    torch.manual_seed(0)
    samples = [(tf(d), 0) for d in data]
    batch, targets, bad = collate_augment(samples)
    assert isinstance(batch.images, EncodedBatch) and bad == 0 and targets.tolist() == [0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(batch.images, data, strict=True))  # views of one tensor
    out = DeviceAugment(SIZE, device="cpu", out_dtype=torch.bfloat16, channels_last=True)(batch)
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(out.float()).all()
    assert out.float().std() > 0.1  # not a constant image


def test_decode_batch_handles_grayscale_cmyk_and_png():
    png = io.BytesIO()
    _photo(40, 30, 1).save(png, format="PNG")
    data = [_jpeg(40, 30, 0, "L"), _jpeg(40, 30, 0, "CMYK"), png.getvalue()]
    for img in decode_batch([read_bytes_from(d) for d in data], torch.device("cpu")):
        assert img.shape == (3, 30, 40) and img.dtype == torch.uint8


def test_corrupt_jpeg_is_an_oserror_in_workers_and_grey_on_the_device():
    bad = read_bytes_from(_jpeg()[:400] + bytes(50))  # valid header, broken scan data
    with pytest.raises(OSError):  # ImageFolderDataset turns OSError into BadImageError naming the file
        FastTrainTransform(SIZE, decoder="tvio")(bad)
    with pytest.warns(UserWarning, match="image 0 of the batch cannot be decoded"):
        out = decode_batch([bad, read_bytes_from(_jpeg())], torch.device("cpu"))
    assert out[0].shape[0] == 3 and out[1].shape == (3, 150, 200)


def test_fast_transform_handles_odd_modes():
    for mode in ("L", "CMYK"):
        torch.manual_seed(0)
        x, params = FastTrainTransform(SIZE)(read_bytes_from(_jpeg(200, 150, 0, mode)))
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.uint8 and params.shape == (11,)


def test_jpeg_header_matches_pil_or_defers_to_it():
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: sizes stay the stored ones, as PIL and torchvision.io report them
    cases = {}
    for name, mode, kw in [
        ("baseline", "RGB", {}),
        ("progressive", "RGB", {"progressive": True}),
        ("grey", "L", {}),
        ("cmyk", "CMYK", {}),
        ("exif", "RGB", {"exif": exif.tobytes()}),
    ]:
        out = io.BytesIO()
        _photo(70, 45, 1).convert(mode).save(out, format="JPEG", quality=80, **kw)
        cases[name] = out.getvalue()
    for name, data in cases.items():
        img = Image.open(io.BytesIO(data))
        assert jpeg_header(read_bytes_from(data)) == (*img.size, img.mode), name
    png = io.BytesIO()
    _photo(20, 10, 0).save(png, format="PNG")
    for data in (png.getvalue(), cases["baseline"][:20], b"\xff\xd8" + bytes(30), b"abc"):
        assert jpeg_header(read_bytes_from(data)) is None


def test_fast_transform_gives_contiguous_planes_with_every_decoder():
    raw = _jpeg(200, 150, seed=4)
    for seed in range(4):
        outs = {}
        for decoder in ("tvio", "auto", "pil"):
            torch.manual_seed(seed)
            outs[decoder] = FastTrainTransform(SIZE, decoder=decoder)(read_bytes_from(raw))
        torch.manual_seed(seed)
        outs["pil_image"] = FastTrainTransform(SIZE)(Image.open(io.BytesIO(raw)))
        x0, p0 = outs["tvio"]
        for name, (x, params) in outs.items():
            assert x.shape == (3, SIZE, SIZE) and x.is_contiguous() and torch.equal(params, p0), name
            assert (x.float() - x0.float()).abs().mean() < 3, name  # only resampling detail differs


def test_collate_drops_bad_samples():
    good = (FastTrainTransform(SIZE)(read_bytes_from(_jpeg())), 2)
    batch, targets, bad = collate_augment([None, good, None])
    assert bad == 2 and batch.images.shape == (1, 3, SIZE, SIZE) and targets.tolist() == [2]


def _write_shards(folder: Path, dst: Path, per_shard: int = 3) -> list:
    ds = ImageFolderDataset(folder, loader=lambda p: Path(p).read_bytes())
    writer = ShardWriter(dst, "train", per_shard)
    for i, (data, label) in enumerate(ds):
        writer.write(f"s{i:04d}", data, label)
    writer.close(ds.classes)
    return [(data, label) for data, label in ds]


def test_shards_round_trip(folder, tmp_path):
    originals = _write_shards(folder, tmp_path)
    info = load_info(tmp_path)
    split = info["splits"]["train"]
    assert (
        split["num_samples"] == 12
        and split["shard_lengths"] == [3, 3, 3, 3]
        and info["classes"] == ["c0", "c1", "c2"]
    )
    with tarfile.open(tmp_path / split["filenames"][0]) as tar:  # plain tar, webdataset member names
        assert tar.getnames()[:2] == ["s0000.jpg", "s0000.cls"]
    read = [(img, lab) for f in split["filenames"] for _, img, lab in iter_tar_samples(tmp_path / f)]
    assert read == originals
    ds = ShardDataset(tmp_path, shuffle=False, loader=bytes)
    assert [(bytes(d), lab) for d, lab in ds] == originals


def test_shards_split_by_rank_and_worker(folder, tmp_path):
    originals = _write_shards(folder, tmp_path, per_shard=2)  # 6 shards
    keys = {d for d, _ in originals}
    seen = []
    for rank in range(2):
        ds = ShardDataset(tmp_path, rank=rank, world_size=2, loader=bytes, buffer_size=4, seed=1)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        got = [d for d, _ in loader]
        assert len(got) == len(ds) == 6
        seen += got
    assert set(seen) == keys  # every sample once: 12 samples over 2 ranks
    # fewer shards than ranks: the ranks share them (this used to be refused)
    assert [split_shards([5, 5], r, 3, shuffle=False, pad=False)[0] for r in range(3)] == [
        [(0, 0, 3)],
        [(0, 3, 2), (1, 0, 1)],
        [(1, 1, 4)],
    ]


def test_shards_with_timm_reader(folder, tmp_path):
    pytest.importorskip("webdataset")
    from timm.data.readers.reader_wds import ReaderWds

    _write_shards(folder, tmp_path)
    reader = ReaderWds(str(tmp_path), name="", split="train", is_training=False)
    assert sum(1 for _ in reader) == 12


def test_prepare_script_caps_short_side(folder, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from prepare_fast_imagenet import prepare

    entry = prepare(folder, tmp_path, "train", max_short_side=64, samples_per_shard=5)
    assert entry["num_samples"] == 12 and entry["shard_lengths"] == [5, 5, 2] and not entry["failed"]
    sizes = [
        Image.open(io.BytesIO(img)).size
        for f in entry["filenames"]
        for _, img, _ in iter_tar_samples(tmp_path / f)
    ]
    assert all(min(s) == 64 for s in sizes) and {max(s) for s in sizes} == {85}
    assert (
        json.loads((tmp_path / "_info.json").read_text())["splits"]["train"]["filenames"]
        == entry["filenames"]
    )


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_yields_normalised_batches(name, folder, tmp_path):
    root = folder
    if name.startswith("shards"):
        _write_shards(folder, tmp_path)
        root = tmp_path
    pipe = build_train_pipeline(name, root, img_size=SIZE, device="cpu")
    loader = build_loader(pipe, global_batch=4, num_workers=0)
    images, targets, bad = next(iter(DeviceLoader(loader, pipe.device_transform, "cpu")))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32 and bad == 0
    assert targets.shape == (4,) and -3 < images.mean() < 3
    val = build_val_pipeline(
        name, root if not name.startswith("shards") else tmp_path, SIZE, 56, split="train"
    )
    vimages, _, _ = next(
        iter(DeviceLoader(build_loader(val, 4, 0, train=False), val.device_transform, "cpu"))
    )
    assert vimages.shape == (4, 3, SIZE, SIZE)


def test_unknown_pipeline_is_named(folder):
    with pytest.raises(ValueError, match="data.pipeline='dali'"):
        build_train_pipeline("dali", folder)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_decode_and_augment_match_cpu():
    data = [read_bytes_from(_jpeg(200, 150, s)) for s in range(4)]
    torch.manual_seed(0)
    batch, _, _ = collate_augment([(EncodedTrainTransform()(d), 0) for d in data])
    cpu = DeviceAugment(SIZE, device="cpu")(batch)
    loader = DeviceLoader([(batch, torch.zeros(4, dtype=torch.long), 0)] * 3, DeviceAugment(SIZE), "cuda")
    outs = [images for images, _, _ in loader]
    assert len(outs) == 3 and outs[0].is_cuda
    for gpu in outs:  # nvJPEG and libjpeg-turbo differ in IDCT/upsampling detail only
        assert (gpu.float().cpu() - cpu).abs().mean() * 0.226 * 255 < 2.0
