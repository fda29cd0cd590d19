"""WebDataset-style tar shards: writer, and a streaming reader split by rank and by loader worker.

Layout (readable by plain ``tarfile`` and by timm's ``wds/`` reader): ``<root>/<split>-000000.tar``, ...,
each holding ``<key>.jpg`` (encoded image) and ``<key>.cls`` (class index as ASCII) members next to each
other, plus ``<root>/_info.json`` with ``{"name", "classes", "splits": {split: {"name", "num_samples",
"filenames", "shard_lengths"}}}``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

__all__ = [
    "ShardDataset",
    "ShardWriter",
    "bytes_tensor",
    "iter_tar_samples",
    "load_info",
    "open_bytes",
    "reencode_jpeg",
    "split_shards",
]

INFO_NAME = "_info.json"


class ShardWriter:
    """Writes (key, encoded image, class index) samples into tar shards of ``samples_per_shard`` each."""

    def __init__(self, root: str | os.PathLike, split: str, samples_per_shard: int = 2500) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.root, self.split, self.per_shard = Path(root), split, int(samples_per_shard)
        self.root.mkdir(parents=True, exist_ok=True)
        self.filenames: list[str] = []
        self.lengths: list[int] = []
        self._tar: tarfile.TarFile | None = None

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: bytes, label: int, ext: str = "jpg") -> None:
        """Append one sample; ``key`` must not contain dots (WebDataset groups members by it)."""
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} may not contain '.' or '/'")
        if self._tar is None or self.lengths[-1] >= self.per_shard:
            self._open_next()
        self._member(f"{key}.{ext}", image)
        self._member(f"{key}.cls", str(int(label)).encode())
        self.lengths[-1] += 1

    def _open_next(self) -> None:
        self.close_shard()
        name = f"{self.split}-{len(self.filenames):06d}.tar"
        self._tar = tarfile.open(self.root / name, "w", format=tarfile.USTAR_FORMAT)
        self.filenames.append(name)
        self.lengths.append(0)

    def close_shard(self) -> None:
        """Finish the open shard, if any."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self, classes: list[str] | None = None) -> dict:
        """Finish writing and merge this split into ``_info.json``; returns the split's entry."""
        self.close_shard()
        info = load_info(self.root) if (self.root / INFO_NAME).exists() else {"name": self.root.name}
        if classes is not None:
            info["classes"] = list(classes)
        entry = {
            "name": self.split,
            "num_samples": sum(self.lengths),
            "filenames": self.filenames,
            "shard_lengths": self.lengths,
        }
        info.setdefault("splits", {})[self.split] = entry
        (self.root / INFO_NAME).write_text(json.dumps(info, indent=1))
        return entry


def load_info(root: str | os.PathLike) -> dict:
    """The ``_info.json`` of a shard folder, with a clear error when it is missing or malformed."""
    path = Path(root) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard index; write shards with scripts/prepare_fast_imagenet.py")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def iter_tar_samples(path: str | os.PathLike) -> Iterator[tuple[str, bytes, int]]:
    """Stream (key, image bytes, class index) from one tar shard, grouping members by key."""
    key, image, label = None, None, None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            k, _, ext = base.partition(".")
            if k != key:
                if key is not None and image is not None and label is not None:
                    yield key, image, label
                key, image, label = k, None, None
            data = tar.extractfile(member).read()
            if ext in ("jpg", "jpeg", "png", "webp"):
                image = data
            elif ext == "cls":
                label = int(data.decode().strip())
    if key is not None and image is not None and label is not None:
        yield key, image, label


def split_shards(
    lengths: list[int], rank: int, world_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> tuple[list[int], int]:
    """(shard indices for ``rank``, samples per rank), like DistributedSampler(drop_last=False).

    Shards are permuted with (seed, epoch), dealt round-robin to ranks, and every rank reads exactly
    ceil(total / world_size) samples (cycling over its own shards to pad), so DDP ranks stay in step.
    """
    n = len(lengths)
    if n < world_size:
        raise ValueError(f"{n} shards cannot be split over {world_size} ranks; write more, smaller shards")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
    return order[rank::world_size], math.ceil(sum(lengths) / world_size)


def reencode_jpeg(img: Image.Image, max_short_side: int = 256, quality: int = 90) -> bytes:
    """RGB JPEG bytes of ``img`` with its short side capped at ``max_short_side`` (0: keep the size)."""
    w, h = img.size
    short = min(w, h)
    if max_short_side and short > max_short_side:
        size = (max(1, round(w * max_short_side / short)), max(1, round(h * max_short_side / short)))
        img.draft("RGB", size)  # DCT-scaled decode when the target is at least 2x smaller
        img = img.convert("RGB").resize(size, Image.BICUBIC, reducing_gap=3.0)
    img = img if img.mode == "RGB" else img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def open_bytes(data: bytes) -> Image.Image:
    """A lazily opened PIL image over encoded bytes (the loader for PIL-based transforms)."""
    return Image.open(io.BytesIO(data))


def bytes_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes as a uint8 tensor (the loader for torchvision.io and GPU decoding)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ShardDataset(IterableDataset):
    """Streams (transform(loader(bytes)), label) from a shard folder with a shuffle buffer.

    The split is divided by rank (:func:`split_shards`), then by loader worker. ``pad=False`` (for
    evaluation) reads each of the rank's shards once instead of padding ranks to equal length.
    Augmentation randomness is seeded per sample from (seed, epoch, rank, worker, sample position), so a
    run is reproducible for a fixed worker count. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        transform: Callable | None = None,
        loader: Callable[[bytes], object] = open_bytes,
        shuffle: bool = True,
        buffer_size: int = 2000,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        pad: bool = True,
    ) -> None:
        self.root, self.pad = Path(root), pad
        info = load_info(self.root)
        if split not in info.get("splits", {}):
            raise KeyError(
                f"{self.root / INFO_NAME}: no split {split!r} (has {sorted(info.get('splits', {}))})"
            )
        entry = info["splits"][split]
        self.classes = info.get("classes", [])
        self.filenames, self.lengths = list(entry["filenames"]), list(entry["shard_lengths"])
        self.transform, self.loader, self.shuffle = transform, loader, shuffle
        self.buffer_size, self.rank, self.world_size, self.seed = buffer_size, rank, world_size, seed
        self.epoch = 0
        self.shard_ids, self.per_rank = split_shards(self.lengths, rank, world_size, seed, 0, shuffle)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shard order and assignment for ``epoch`` (same on every rank)."""
        self.epoch = epoch
        self.shard_ids, self.per_rank = split_shards(
            self.lengths, self.rank, self.world_size, self.seed, epoch, self.shuffle
        )

    def __len__(self) -> int:
        return self.per_rank if self.pad else sum(self.lengths[i] for i in self.shard_ids)

    def _worker_plan(self) -> tuple[list[int], int, int, int]:
        """(shards this worker reads, keep every n-th sample, offset, samples to yield; -1: one pass)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rank_total = sum(self.lengths[i] for i in self.shard_ids)
        if len(self.shard_ids) >= nw:
            plan = (self.shard_ids[wid::nw], 1, 0)
            own = [sum(self.lengths[i] for i in self.shard_ids[w::nw]) for w in range(nw)]
        else:  # fewer shards than workers: every worker reads them all and keeps every nw-th sample
            plan = (self.shard_ids, nw, wid)
            own = [rank_total // nw + (1 if w < rank_total % nw else 0) for w in range(nw)]
        if not self.pad:
            return (*plan, -1)
        deficit = self.per_rank - rank_total  # padding (or trimming) spread over the workers
        extra = deficit // nw + (1 if wid < deficit % nw else 0)
        return (*plan, max(0, own[wid] + extra))

    def _one_pass(self, shards: list[int], stride: int, offset: int) -> Iterator[tuple[bytes, int]]:
        i = 0
        for sid in shards:
            for _, image, label in iter_tar_samples(self.root / self.filenames[sid]):
                if i % stride == offset:
                    yield image, label
                i += 1

    def _stream(self, shards: list[int], stride: int, offset: int, g: torch.Generator) -> Iterator:
        """Shuffled passes over this worker's samples; repeated (padding) only when ``pad``."""
        if not any(self.lengths[sid] for sid in shards):
            return
        while True:
            it = self._one_pass(shards, stride, offset)
            yield from self._shuffled(it, g) if self.shuffle and self.buffer_size > 1 else it
            if not self.pad:
                return

    def _shuffled(self, it: Iterable, g: torch.Generator) -> Iterator:
        buf: list = []
        for sample in it:
            if len(buf) < self.buffer_size:
                buf.append(sample)
                continue
            j = int(torch.randint(len(buf), (1,), generator=g))
            buf[j], sample = sample, buf[j]
            yield sample
        for j in torch.randperm(len(buf), generator=g).tolist():
            yield buf[j]

    def __iter__(self) -> Iterator:
        shards, stride, offset, quota = self._worker_plan()
        info = get_worker_info()
        wid = info.id if info is not None else 0
        base = (((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank) * 4099 + wid) % 2**40
        g = torch.Generator().manual_seed(base)
        it = self._stream(shards, stride, offset, g)
        counter = range(quota) if quota >= 0 else itertools.count()
        for n, (image, label) in zip(counter, it, strict=False):
            if self.transform is None:
                yield self.loader(image), label
                continue
            with torch.random.fork_rng(devices=[], enabled=info is None):  # keep the main RNG untouched
                torch.default_generator.manual_seed((base * 1_000_003 + n) % 2**63)
                out = self.transform(self.loader(image))
            yield out, label
