"""Pack an ImageNet-layout folder (root/<class>/<image>) into WebDataset-style tar shards.

Two ways to store each image (``--store``):

- ``original`` (lossless; the default for validation splits): the file's own bytes, unchanged, so every
  pipeline sees exactly the reference pixels.
- ``reencode`` (the default for training): RGB JPEG at ``--quality`` with the short side capped at
  ``--max-short-side`` (256 by default; 0 keeps the size). Smaller and faster to decode, but not the
  reference pixels: RandomResizedCrop boxes below about 0.77 of the area of a square image (0.58 of a
  4:3 one) now hold fewer than 224 source pixels across and are upsampled, where the original would
  have been downsampled; and the re-encoding changes the pixels too. ``benchmarks/data_cpu.md`` lists
  what each cap costs in pixels and gains in speed.

Images are shuffled once with a fixed seed (not with ``--no-shuffle``) and packed into shards that
``acon.data.shards.ShardDataset`` and timm's ``wds/`` reader both read::

    python scripts/prepare_fast_imagenet.py --src /data/imagenet/train --dst /data/imagenet-fast --split train
    python scripts/prepare_fast_imagenet.py --src /data/imagenet/val --dst /data/imagenet-fast --split val \
        --no-shuffle

Then train with ``data.pipeline=shards data.root=/data/imagenet-fast``. Any number of shards works with
any number of ranks (ranks share shards when there are fewer).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from acon.data.folder import find_classes, open_image, scan_samples  # noqa: E402
from acon.data.shards import ShardWriter, reencode_jpeg  # noqa: E402
from acon.data.subsets import select_classes  # noqa: E402

STORES = ("auto", "original", "reencode")
_PNG_MAGIC = b"\x89PNG"


def store_mode(store: str, split: str) -> str:
    """``original`` or ``reencode``; ``auto`` keeps the original bytes for validation splits."""
    if store not in STORES:
        raise ValueError(f"--store {store!r} is not one of {STORES}")
    if store == "auto":
        return "original" if split.startswith("val") else "reencode"
    return store


def _encode(job: tuple[str, int, int, int, bool]) -> tuple[bytes | None, int, str]:
    path, label, max_short_side, quality, original = job
    try:
        if original:
            data = Path(path).read_bytes()
            open_image(path).load()  # refuse undecodable files here, not in a training run
            return data, label, path
        return reencode_jpeg(open_image(path), max_short_side, quality), label, path
    except Exception as e:  # noqa: BLE001 - reported with the path, the run continues
        return None, label, f"{path}: {type(e).__name__}: {e}"


def prepare(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    split: str = "train",
    max_short_side: int = 256,
    quality: int = 90,
    samples_per_shard: int = 2500,
    shuffle: bool = True,
    seed: int = 0,
    workers: int = 1,
    limit: int = 0,
    store: str = "auto",
    class_subset: str | None = None,
) -> dict:
    """Shard one split (``store``: see the module docstring); returns its ``_info.json`` entry (with
    ``failed``, the files left out, and ``store``)."""
    original = store_mode(store, split) == "original"
    src = Path(src)
    classes = find_classes(src)
    if class_subset:  # only these classes, labelled 0..K-1 in sorted order (as data.class_subset reads them)
        classes = select_classes(classes, class_subset, src)
    samples, _ = scan_samples(src, classes)
    if shuffle:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
        samples = [samples[i] for i in order]
    if limit:
        samples = samples[:limit]
    writer = ShardWriter(dst, split, samples_per_shard)
    jobs = [(p, t, max_short_side, quality, original) for p, t in samples]
    failed, t0 = [], time.time()
    with Pool(workers) if workers > 1 else _Inline() as pool:
        for i, (data, label, path) in enumerate(pool.imap(_encode, jobs, chunksize=16)):
            if data is None:
                failed.append(path)
                print(f"skipped {path}", file=sys.stderr)
                continue
            writer.write(f"{split}_{i:08d}", data, label, "png" if data.startswith(_PNG_MAGIC) else "jpg")
            if (i + 1) % 10000 == 0:
                print(f"{i + 1}/{len(jobs)} images, {(i + 1) / (time.time() - t0):.0f}/s", flush=True)
    entry = writer.close(classes)
    entry["failed"], entry["store"] = (
        failed,
        "original" if original else f"reencode:{max_short_side}:{quality}",
    )
    return entry


class _Inline:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap(self, fn, jobs, chunksize: int = 1):
        return map(fn, jobs)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="class folder of one split, e.g. /data/imagenet/train")
    ap.add_argument("--dst", required=True, help="output shard folder (shared by all splits)")
    ap.add_argument("--split", default="train")
    ap.add_argument(
        "--store",
        default="auto",
        choices=STORES,
        help="original: the files' own bytes (lossless); reencode: capped JPEG; auto (default): original "
        "for val* splits, reencode otherwise",
    )
    ap.add_argument("--max-short-side", type=int, default=256, help="with reencode; 0 keeps the size")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--samples-per-shard", type=int, default=2500)
    ap.add_argument("--no-shuffle", action="store_true", help="keep folder order (use for val)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=0, help="only the first N samples (for trials)")
    ap.add_argument(
        "--class-subset",
        default=None,
        help="only these classes: imagenet100 (the CMC list) or a file of WordNet ids (data.class_subset)",
    )
    a = ap.parse_args(argv)
    entry = prepare(
        a.src,
        a.dst,
        a.split,
        a.max_short_side,
        a.quality,
        a.samples_per_shard,
        not a.no_shuffle,
        a.seed,
        a.workers,
        a.limit,
        a.store,
        a.class_subset,
    )
    print(
        f"{a.split}: {entry['num_samples']} samples in {len(entry['filenames'])} shards under {a.dst}"
        f" ({entry['store']}; {len(entry['failed'])} failed)"
    )


if __name__ == "__main__":
    main()
