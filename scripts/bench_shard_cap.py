"""What prepare_fast_imagenet.py's short-side cap costs in pixels and gains in speed, per cap.

For each way of storing an image (``original`` bytes, or re-encoded at quality 90 with the short side
capped at 256, 320, 384, ...) on the photographic JPEGs of ``scripts/bench_data.py``, prints:

- bytes per image;
- validation pixels: mean absolute difference (0-255) of Resize(256) + CenterCrop(224) from the reference
  (the original file);
- training pixels: the same for RandomResizedCrop(224) at identical relative boxes (seeded draws), and
  the share of those crops that have fewer than 224 source pixels across (upsampled) after the cap;
- speed: images/s of the shard workers' training transform (decode + crop + resize) on one core::

    python scripts/bench_shard_cap.py --num-images 256 --caps 256 320 384
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from acon.data.fast import FastTrainTransform, rrc_params  # noqa: E402
from acon.data.shards import bytes_tensor, open_bytes, reencode_jpeg  # noqa: E402
from scripts.bench_data import make_jpeg_folder  # noqa: E402


def val_pixels(img: Image.Image) -> np.ndarray:
    """Resize(256) + CenterCrop(224) as uint8, the reference validation transform before tensors."""
    return np.asarray(TF.center_crop(TF.resize(img.convert("RGB"), 256), 224), dtype=np.float32)


def train_diff(orig: Image.Image, stored: Image.Image, draws: int, seed: int) -> tuple[float, float]:
    """(mean abs difference, share upsampled) of RandomResizedCrop(224) at the same relative boxes."""
    orig, stored = orig.convert("RGB"), stored.convert("RGB")
    sx, sy = stored.width / orig.width, stored.height / orig.height
    diffs, upsampled = [], 0
    for i in range(draws):
        torch.manual_seed(seed * 1000 + i)
        top, left, h, w = rrc_params(orig.height, orig.width)
        ref = orig.resize((224, 224), Image.BILINEAR, box=(left, top, left + w, top + h))
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        got = stored.resize((224, 224), Image.BILINEAR, box=box)
        upsampled += min(h * sy, w * sx) < 224
        diffs.append(np.abs(np.asarray(ref, np.float32) - np.asarray(got, np.float32)).mean())
    return float(np.mean(diffs)), upsampled / draws


def speed(blobs: list[bytes], rounds: int = 3) -> float:
    """Images/s of the shard training transform on one core (best of ``rounds`` passes)."""
    tf, best = FastTrainTransform(224), 0.0
    data = [bytes_tensor(b) for b in blobs]
    for r in range(rounds):
        torch.manual_seed(r)
        t = time.perf_counter()
        for d in data:
            tf(d)
        best = max(best, len(data) / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: prints a markdown table, one row per storage choice."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/acon_bench_jpegs", type=Path)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--caps", type=int, nargs="+", default=[256, 320, 384])
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--draws", type=int, default=8, help="training crops per image")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    folder = make_jpeg_folder(a.root / f"train{a.num_images}", a.num_images)
    files = sorted(folder.rglob("*.JPEG"))[: a.num_images]
    originals = [f.read_bytes() for f in files]
    print(
        f"# {datetime.date.today()}, {platform.machine()} x {os.cpu_count()} CPUs, {len(files)} JPEGs "
        f"(500x375 / 375x500), torch {torch.__version__}, one thread"
    )
    print("| stored as | KB per image | val: mean abs diff /255 | train crops: mean abs diff /255 "
          "| train crops upsampled | train transform images/s (1 core) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for cap in [0, *a.caps]:
        stored = originals if cap == 0 else [reencode_jpeg(open_bytes(b), cap, a.quality) for b in originals]
        val = tr = up = 0.0
        for i, (o, s) in enumerate(zip(originals, stored, strict=True)):
            oi, si = open_bytes(o), open_bytes(s)
            val += np.abs(val_pixels(oi) - val_pixels(si)).mean()
            d, u = train_diff(oi, si, a.draws, i)
            tr, up = tr + d, up + u
        n = len(stored)
        name = "original bytes" if cap == 0 else f"re-encoded, short side {cap}, q{a.quality}"
        print(
            f"| {name} | {sum(map(len, stored)) / n / 1024:.0f} | {val / n:.2f} | {tr / n:.2f} | "
            f"{100 * up / n:.0f} % | {speed(stored):.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
