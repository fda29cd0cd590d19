"""Training input-pipeline throughput, every available path side by side in one run.

Generates (once) a folder of real photographic JPEGs at ImageNet-like size (500x375 and 375x500,
quality 90, cut from scikit-learn's bundled sample photos), then times passes over it per path and
worker count, end to end: decoded, augmented, normalised float batches. Paths are interleaved over
``--rounds`` and the median is reported, so a load change on a shared machine hits every path alike.

Reported per path: images/s, and images per CPU-second of all processes (main + workers, the per-core
figure), once with everything counted and once without the batch stage (colour jitter +
normalisation), which the fast paths run on the GPU when there is one and in the main process here.
With ``--model`` each batch also trains that network one step (bf16 autocast on CUDA)::

    python scripts/bench_data.py --workers 1 2 --num-images 1024
    python scripts/bench_data.py --workers 8 16 --num-images 8192 --batch-size 256 --paths gpu fast \
        --model shufflenetv2_x0_5
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import resource
import statistics
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from acon.data.fast import FastTrainTransform, jpeg_header, read_bytes  # noqa: E402
from acon.data.folder import ImageFolderDataset  # noqa: E402
from acon.data.pipelines import PIPELINES, DeviceLoader, build_loader, build_train_pipeline  # noqa: E402

PATHS = ("reference", "fast", "fast_pil", "fast_worker_jitter", "shards", "gpu", "shards_gpu")
KEYS = ("ips", "per_cpu", "per_cpu_loader")


def _make_one(job: tuple[Path, int, int]) -> None:
    from sklearn.datasets import load_sample_image

    root, i, num_classes = job
    rng = np.random.default_rng(i)
    photo = load_sample_image(("china.jpg", "flower.jpg")[i % 2])
    out_w, out_h = (375, 500) if rng.random() < 0.25 else (500, 375)
    ch = int(min(photo.shape[0], photo.shape[1] * out_h / out_w) * rng.uniform(0.55, 1.0))
    cw = int(ch * out_w / out_h)
    y, x = rng.integers(0, photo.shape[0] - ch + 1), rng.integers(0, photo.shape[1] - cw + 1)
    img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((out_w, out_h), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    d = root / f"class{i % num_classes:03d}"
    d.mkdir(parents=True, exist_ok=True)
    img.save(d / f"img{i:06d}.JPEG", quality=90)


def make_jpeg_folder(root: Path, num_images: int, num_classes: int = 8) -> Path:
    """root/<class>/<n>.JPEG: photographic 500x375 / 375x500 JPEGs at quality 90 (made once)."""
    if not (root / ".complete").exists():
        with Pool(os.cpu_count()) as pool:
            pool.map(_make_one, [(root, i, num_classes) for i in range(num_images)], chunksize=32)
        (root / ".complete").write_text(str(num_images))
    return root


def make_shards(folder: Path, dst: Path) -> Path:
    """The folder rewritten by scripts/prepare_fast_imagenet.py (short side <= 256), made once."""
    from prepare_fast_imagenet import prepare

    if not (dst / "_info.json").exists():
        prepare(folder, dst, "train", samples_per_shard=128, workers=os.cpu_count() or 1)
    return dst


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class _Timed:
    """Wraps the batch stage to count its CPU seconds in the main process."""

    def __init__(self, fn) -> None:
        self.fn, self.cpu = fn, 0.0

    def __call__(self, batch):
        t = time.process_time()
        out = self.fn(batch)
        self.cpu += time.process_time() - t
        return out


def make_train_step(name: str, device: str):
    """One SGD step of model ``name`` per batch (channels-last, bf16 autocast on CUDA)."""
    from models.registry import create_model

    model = create_model(name).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(model(images), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(name: str, src: dict, workers: int, batch: int, device: str, step=None) -> dict:
    """One pass of path ``name`` with ``workers`` loader processes; returns the measured rates."""
    root = src["shards"] if name.startswith("shards") else src["folder"]
    pipe = build_train_pipeline(name if name in PIPELINES else "fast", root, device=device)
    if name == "fast_pil":  # PIL only: DCT-scaled decoding when the crop shrinks >= 2, else full decode
        pipe.dataset = ImageFolderDataset(root, FastTrainTransform(decoder="pil"))
    if name == "fast_worker_jitter":  # PIL colour jitter in the worker; the batch stage only normalises
        pipe.dataset = ImageFolderDataset(root, FastTrainTransform(jitter_in_worker=True), loader=read_bytes)
        pipe.device_transform.color_jitter = False
    stage = _Timed(pipe.device_transform) if pipe.device_transform is not None else None
    loader = build_loader(pipe, batch, num_workers=workers, pin_memory=device == "cuda", prefetch_factor=4)
    cpu0 = _cpu_seconds()
    n, n_first, t_first = 0, 0, None
    for images, targets, _ in DeviceLoader(loader, stage, device):
        if step is not None:
            step(images, targets)
        n += images.shape[0]
        if t_first is None:
            t_first, n_first = time.perf_counter(), n
    if device == "cuda":
        torch.cuda.synchronize()
    steady = time.perf_counter() - t_first
    del loader  # join the workers so that their CPU time is counted
    cpu = _cpu_seconds() - cpu0
    stage_cpu = stage.cpu if stage is not None and device == "cpu" else 0.0
    return dict(ips=(n - n_first) / steady, per_cpu=n / cpu, per_cpu_loader=n / (cpu - stage_cpu))


def components(folder: Path, count: int = 200) -> None:
    """Per-image CPU milliseconds of each candidate step, in this process (best of 3 passes)."""
    import PIL
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import functional as TF

    from acon.data.gpu import DeviceAugment
    from acon.data.transforms import train_transform

    files = sorted(str(p) for p in folder.rglob("*.JPEG"))[:count]
    data = [read_bytes(f) for f in files]
    decoded = [Image.open(f).convert("RGB") for f in files]
    crops = [im.resize((224, 224)) for im in decoded]
    tensors = [decode_image(d, mode=ImageReadMode.RGB) for d in data]
    box = (50, 30, 350, 330)

    def packed_resize(x: torch.Tensor) -> torch.Tensor:  # as FastTrainTransform: (H, W, 3) uint8
        crop = x[None, :, 30:330, 50:350].contiguous(memory_format=torch.channels_last)
        return F.interpolate(crop, size=(224, 224), mode="bilinear", antialias=True)[0].permute(1, 2, 0)

    def jitter(im):
        return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(im, 1.2), 0.8), 1.3)

    def batch_stage(jit: bool):
        stage = DeviceAugment(device="cpu", color_jitter=jit)
        items = [(FastTrainTransform()(d), 0) for d in data[:64]]
        from acon.data.fast import collate_augment

        b = collate_augment(items)[0]
        return lambda _: stage(b), [None]

    cases = {
        "reference transform (PIL decode, RRC, jitter, ToTensor, Normalize)": (
            train_transform(),
            files,
            True,
        ),
        "PIL: decode full image": (lambda f: Image.open(f).convert("RGB"), files, False),
        "torchvision.io: decode full image": (lambda d: decode_image(d, mode=ImageReadMode.RGB), data, False),
        "PIL: crop + resize to 224 (box=)": (
            lambda im: im.resize((224, 224), Image.BILINEAR, box=box),
            decoded,
            False,
        ),
        "tensor: crop + resize uint8 to 224 (strided crop view)": (
            lambda x: F.interpolate(
                x[None, :, 30:330, 50:350], size=(224, 224), mode="bilinear", antialias=True
            ),
            tensors,
            False,
        ),
        "tensor: crop + resize uint8 to 224 (packed crop, planar result: the fast path)": (
            lambda x: torch.from_numpy(np.array(packed_resize(x).numpy().transpose(2, 0, 1), order="C")),
            tensors,
            False,
        ),
        "header: PIL.Image.open": (lambda d: Image.open(io.BytesIO(d.numpy().tobytes())).size, data, False),
        "header: acon.data.fast.jpeg_header": (jpeg_header, data, False),
        "PIL: ColorJitter on a 224 crop": (jitter, crops, False),
        "PIL: ToTensor + Normalize of a 224 crop": (
            lambda im: TF.normalize(TF.to_tensor(im), [0.5] * 3, [0.2] * 3),
            crops,
            False,
        ),
        "fast transform, decoder=pil": (FastTrainTransform(decoder="pil"), files, True),
        "fast transform, decoder=auto": (FastTrainTransform(), data, False),
    }
    print(f"# per-image CPU ms, Pillow {PIL.__version__}, {len(files)} images (best of 3 passes)")
    print("| step | ms per image |\n|---|---|")
    for name, (fn, items, is_path) in cases.items():
        loader = Image.open if is_path else None  # lazy open (header parse) counted with the step
        best = math.inf
        for _ in range(3):
            t = time.process_time()
            for it in items:
                fn(loader(it) if loader else it)
            best = min(best, (time.process_time() - t) / len(items))
        print(f"| {name} | {best * 1e3:.3f} |", flush=True)
    for jit, held in ((True, False), (False, False), (True, True)):
        fn, _ = batch_stage(jit)
        kept, best = [], math.inf
        for _ in range(5):  # best of 5 batches; the first ones allocate the reused buffers
            t = time.process_time()
            out = fn(None)
            best = min(best, time.process_time() - t)
            kept += [out] if held else []  # held: no output buffer can be reused
        ms = best / 64 * 1e3
        del kept, out
        label = "batch stage on CPU: jitter + normalise" if jit else "batch stage on CPU: normalise"
        label += ", every output kept (fresh buffers)" if held else ""
        print(f"| {label} | {ms:.3f} |")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints a markdown table with ratios to the reference path."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/acon_bench_jpegs", type=Path)
    ap.add_argument("--num-images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--model", default=None, help="also train this model one step per batch")
    ap.add_argument("--components", action="store_true", help="time each candidate step per image instead")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # the batch stage runs in the main process: count one core for it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = make_jpeg_folder(a.root / f"train{a.num_images}", a.num_images)
    if a.components:
        return components(folder)
    paths = [p for p in a.paths if device == "cuda" or p not in ("gpu", "shards_gpu")]
    need_shards = any(p.startswith("shards") for p in paths)
    src = dict(
        folder=folder, shards=make_shards(folder, a.root / f"shards{a.num_images}") if need_shards else None
    )
    step = make_train_step(a.model, device) if a.model else None
    print(
        f"# {datetime.date.today()}, {platform.machine()} x {os.cpu_count()} CPUs, {a.num_images} JPEGs, "
        f"batch {a.batch_size}, device {device}, model {a.model}, torch {torch.__version__}, "
        f"median of {a.rounds} rounds"
    )
    print(
        "| path | workers | images/s | x ref | images per CPU-s, all | x ref "
        "| images per CPU-s, batch stage on device | x ref |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in a.workers:
        runs = {p: [] for p in paths}
        for _ in range(a.rounds):
            for p in paths:
                runs[p].append(bench(p, src, w, a.batch_size, device, step))
        med = {p: {k: statistics.median(r[k] for r in rs) for k in KEYS} for p, rs in runs.items()}
        ref = med.get("reference")
        for p in paths:
            r = med[p]
            cols = [f"{r[k]:.0f} | {r[k] / ref[k]:.2f}" if ref else f"{r[k]:.0f} | -" for k in KEYS]
            print(f"| {p} | {w} | " + " | ".join(cols) + " |", flush=True)


if __name__ == "__main__":
    main()
