"""WebDataset-style tar shards: writer, and a streaming reader split by rank and by loader worker.

Layout (readable by plain ``tarfile`` and by timm's ``wds/`` reader): ``<root>/<split>-000000.tar``, ...,
each holding ``<key>.jpg`` (encoded image) and ``<key>.cls`` (class index as ASCII) members next to each
other, plus ``<root>/_info.json`` with ``{"name", "classes", "splits": {split: {"name", "num_samples",
"filenames", "shard_lengths"}}}``.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from acon.data.shard_plan import WorkerPlan, epoch_order, rank_range, segments, worker_plan

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


def iter_tar_samples(
    path: str | os.PathLike, first: int = 0, count: int | None = None
) -> Iterator[tuple[str, bytes, int]]:
    """Stream (key, image bytes, class index) from one tar shard, grouping members by key.

    Only samples ``first`` to ``first + count`` are read (the others' headers only); ``count=None``: to the end.
    """
    stop = math.inf if count is None else first + count
    key, image, label, index = None, None, None, -1
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = os.path.basename(member.name).partition(".")
            if k != key:
                if key is not None and image is not None and label is not None:
                    yield key, image, label
                key, image, label, index = k, None, None, index + 1
                if index >= stop:
                    return
            if index < first:
                continue
            data = tar.extractfile(member).read()
            if ext in ("jpg", "jpeg", "png", "webp"):
                image = data
            elif ext == "cls":
                label = int(data.decode().strip())
    if key is not None and image is not None and label is not None and index >= first:
        yield key, image, label


def split_shards(
    lengths: list[int],
    rank: int,
    world_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad: bool = True,
) -> tuple[list[tuple[int, int, int]], int]:
    """((shard, first sample, count) segments read by ``rank``, samples per rank) for ``epoch``.

    With ``pad`` every rank reads ceil(total / world_size) samples (wrapping around, as
    DistributedSampler pads), so DDP ranks stay in step; without, every sample is read by exactly one
    rank. Any number of shards works: ranks share a shard when there are fewer shards than ranks.
    """
    start, count = rank_range(sum(lengths), rank, world_size, pad)
    return segments(epoch_order(len(lengths), seed, epoch, shuffle), lengths, start, count), count


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

    The split is divided by rank and then by loader worker as :mod:`acon.data.shard_plan` describes:
    with ``pad=True`` (training) a DataLoader with ``batch_size=self.batch_size`` and ``drop_last``
    yields exactly ``len(self) // batch_size`` batches on every rank, for any worker count, shard count
    and batch size; ``pad=False`` (evaluation) reads every sample once across ranks. Augmentation
    randomness is seeded per sample from (seed, epoch, rank, worker role, sample position), so an epoch
    resumed with :meth:`set_position` continues bit-exactly for a fixed worker count. The position lives
    in shared memory, so persistent loader workers see it too.
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
        batch_size: int = 1,
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
        self.batch_size = batch_size
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, batches done)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration reads."""
        return int(self._position[0])

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` from its start next (shard order and assignment are reshuffled per epoch)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Start the next iteration at ``epoch`` after the first ``batches_done`` batches of this rank."""
        self._position[0], self._position[1] = int(epoch), int(batches_done)

    def __len__(self) -> int:
        return rank_range(sum(self.lengths), self.rank, self.world_size, self.pad)[1]

    def plan(self, worker: int = 0, num_workers: int = 1) -> WorkerPlan:
        """What loader ``worker`` of ``num_workers`` reads at the current position."""
        epoch, done = (int(v) for v in self._position.tolist())
        return worker_plan(
            self.lengths,
            self.rank,
            self.world_size,
            worker,
            num_workers,
            self.batch_size,
            self.seed,
            epoch,
            self.shuffle,
            self.pad,
            done,
        )

    def _read(self, plan: WorkerPlan) -> Iterator[tuple[bytes, int]]:
        for sid, first, count in plan.segments:
            path, n = self.root / self.filenames[sid], 0
            for _, image, label in iter_tar_samples(path, first, count):
                n += 1
                yield image, label
            if n != count:
                raise OSError(
                    f"{path}: {n} samples from #{first} where {INFO_NAME} lists {self.lengths[sid]} in all"
                )

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
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        plan = self.plan(wid, nw)
        base = (((self.seed * 1_000_003 + self.epoch) * 4099 + self.rank) * 4099 + plan.role) % 2**40
        g = torch.Generator().manual_seed(base)
        it = self._read(plan)
        it = self._shuffled(it, g) if self.shuffle and self.buffer_size > 1 else it
        for n, (image, label) in enumerate(it):
            if n < plan.skip:  # delivered before the resume: read, not decoded
                continue
            if self.transform is None:
                yield self.loader(image), label
                continue
            with torch.random.fork_rng(devices=[], enabled=info is None):  # keep the main RNG untouched
                torch.default_generator.manual_seed((base * 1_000_003 + n) % 2**63)
                out = self.transform(self.loader(image))
            yield out, label
