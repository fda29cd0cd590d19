"""Shard pipelines: every rank yields exactly the trainer's batch count, for any workers, shards and batch
size; resumes mid-epoch; works with fewer shards than ranks."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose, run_cli
from torch.utils.data import DataLoader

from acon.data.shard_plan import worker_plan
from acon.data.shards import ShardDataset, ShardWriter, split_shards

IMAGENET_TRAIN = 1_281_167


def _imagenet_lengths(per_shard: int = 2500) -> list[int]:
    """The shard lengths prepare_fast_imagenet.py writes for ImageNet's training set (513 shards)."""
    full, rest = divmod(IMAGENET_TRAIN, per_shard)
    return [per_shard] * full + ([rest] if rest else [])


def _rank_batches(lengths, rank, world, workers, batch, epoch=0, done=0) -> list[list[tuple[int, int]]]:
    """The batches (lists of (shard, index)) a DataLoader collects round robin from the planned workers."""
    streams = []
    for w in range(workers):
        plan = worker_plan(lengths, rank, world, w, workers, batch, seed=3, epoch=epoch, batches_done=done)
        ids = [(s, first + i) for s, first, n in plan.segments for i in range(n)][plan.skip :]
        assert len(ids) % batch == 0, (rank, w, len(ids))  # whole batches: drop_last drops nothing
        streams.append([ids[i : i + batch] for i in range(0, len(ids), batch)])
    out, k = [], 0
    while any(streams):  # the DataLoader's order: workers in turn, exhausted ones skipped
        if streams[k % workers]:
            out.append(streams[k % workers].pop(0))
        k += 1
    return out


def test_imagenet_scale_plan_gives_every_rank_the_trainers_batch_count():
    lengths = _imagenet_lengths()
    assert len(lengths) == 513
    world, workers, global_batch = 8, 8, 1024
    batch = global_batch // world
    n_train = math.ceil(IMAGENET_TRAIN / world) * world  # what the trainer counts on (build.py)
    expected = n_train // global_batch
    assert expected == 1251
    read = [[] for _ in lengths]  # per shard: the (first, count) runs read by any worker of any rank
    for rank in range(world):
        plans = [
            worker_plan(lengths, rank, world, w, workers, batch, seed=3, epoch=5) for w in range(workers)
        ]
        assert all(p.count % batch == 0 and p.skip == 0 for p in plans)  # whole batches: drop_last drops none
        assert sum(p.count for p in plans) // batch == expected, rank
        for p in plans:
            for s, first, n in p.segments:
                read[s].append((first, n))
    for s, runs in enumerate(read):  # ranks and workers read disjoint samples
        runs.sort()
        assert all(a + n <= b for (a, n), (b, _) in zip(runs, runs[1:], strict=False)), s
        assert all(0 <= a and a + n <= lengths[s] for a, n in runs)
    assert sum(n for runs in read for _, n in runs) == expected * global_batch


@pytest.mark.parametrize("world,workers,batch", [(8, 8, 128), (3, 5, 77), (2, 3, 80)])
def test_plan_resumes_mid_epoch_with_the_same_batches(world, workers, batch):
    lengths = _imagenet_lengths()[:40] if world == 8 else [200] * 7 + [38]
    for rank in (0, world - 1):
        full = _rank_batches(lengths, rank, world, workers, batch, epoch=2)
        n = len(full)
        for done in sorted({1, workers - 1, workers, workers + 1, n // 2, n - 1, n}):
            assert _rank_batches(lengths, rank, world, workers, batch, epoch=2, done=done) == full[done:]


def test_fewer_shards_than_ranks_20_shards_32_ranks():
    lengths = [2500] * 20  # 50k validation images
    read = []
    for rank in range(32):
        segs, count = split_shards(lengths, rank, 32, shuffle=False, pad=False)
        assert count in (1562, 1563) and sum(n for _, _, n in segs) == count
        read += [(s, first + i) for s, first, n in segs for i in range(n)]
    assert sorted(read) == [(s, i) for s in range(20) for i in range(2500)]  # every image exactly once
    for rank in range(32):  # training: equal counts on every rank
        assert split_shards(lengths, rank, 32, seed=1, epoch=4)[1] == math.ceil(50_000 / 32)


def _byte_shards(root: Path, n: int, per_shard: int) -> None:
    """``n`` tiny samples (their key as the image bytes) in shards of ``per_shard``: no decoding needed."""
    writer = ShardWriter(root, "train", per_shard)
    for i in range(n):
        writer.write(f"k{i:05d}", f"s{i}".encode(), i % 3)
    writer.close(["a", "b", "c"])


def draw(data):
    """A transform drawing from torch's RNG, to check per-sample seeding across workers and resumes."""
    return bytes(data), float(torch.rand(1))


def _collate(samples):
    return [s[0] for s in samples]


def _epoch(ds, batch, workers, persistent=False):
    loader = DataLoader(
        ds, batch_size=batch, drop_last=True, num_workers=workers, collate_fn=_collate,
        persistent_workers=persistent,
    )  # fmt: skip
    return loader


@pytest.mark.parametrize("workers,batch", [(0, 7), (3, 5), (8, 4)])
def test_loader_yields_exactly_len_over_batch(tmp_path, workers, batch):
    _byte_shards(tmp_path, 78, 23)  # 3 x 23 + 9, quotas that no batch size here divides
    for rank in range(2):
        ds = ShardDataset(tmp_path, transform=draw, loader=bytes, rank=rank, world_size=2, batch_size=batch)
        got = list(_epoch(ds, batch, workers))
        assert len(got) == len(ds) // batch == 39 // batch
        keys = [k for b in got for k, _ in b]
        assert len(set(keys)) == len(keys)


def test_persistent_workers_follow_epoch_and_resume_position(tmp_path):
    _byte_shards(tmp_path, 49, 11)
    ds = ShardDataset(tmp_path, transform=draw, loader=bytes, buffer_size=4, seed=2, batch_size=3)
    fresh = ShardDataset(tmp_path, transform=draw, loader=bytes, buffer_size=4, seed=2, batch_size=3)
    loader = _epoch(ds, 3, 3, persistent=True)
    first = list(loader)
    assert len(first) == 49 // 3
    fresh.set_epoch(1)
    epoch1 = list(_epoch(fresh, 3, 3))
    ds.set_epoch(1)
    assert list(loader) == epoch1 != first  # the persistent workers read epoch 1, not epoch 0 again
    for done in (1, 5, 15, 16):
        ds.set_position(1, done)
        assert list(loader) == epoch1[done:], done


def _prepare_shards(src: Path, dst: Path, per_shard: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from prepare_fast_imagenet import prepare

    for split in ("train", "val"):
        prepare(src / split, dst, split, samples_per_shard=per_shard, shuffle=split == "train")
    return dst


def _overrides(data: list[str], out: Path, workers: int, batch: int) -> list[str]:
    return [
        *data, "data.pipeline=shards", f"data.num_workers={workers}", "model=shufflenetv2_x0_5_small",
        "activation=relu", f"recipe.batch_size={batch}", f"recipe.base_batch_size={batch}", "recipe.epochs=2",
        "recipe.iterations=null", "recipe.warmup_steps=0", "trainer.device=cpu", "trainer.progress=false",
        "trainer.threads=1", "trainer.eval_batch_size=100", f"out_dir={out}", "run_name=r",
    ]  # fmt: skip


def _shard_run(
    data: list[str], out: Path, workers: int, batch: int, launcher: list[str], timeout: int
) -> dict:
    """``train.py`` for 2 epochs with data.pipeline=shards (an epoch that never closes times out)."""
    run_cli([*launcher, "train.py", *_overrides(data, out, workers, batch)], timeout=timeout)
    return json.loads((out / "r" / "results.json").read_text())


def _alarm(signum, frame):
    raise TimeoutError("the shard epochs did not close")


def test_tiny_shards_train_two_epochs_with_three_workers(tiny_imagenet, tmp_path):
    """24 images in shards of 5, batch 4, 3 workers (quotas of 10, 9 and 5 images, none a multiple of 4):
    every epoch closes after 24 // 4 = 6 batches."""
    from acon.trainer import train

    root = _prepare_shards(tiny_imagenet, tmp_path / "shards", per_shard=5)
    data = ["data=folder", f"data.root={root}", "data.num_classes=3", "data.img_size=16"]
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(300)  # the trainer would otherwise loop over epochs that never close
    try:
        results = train(compose(_overrides([*data, "data.val_transform.resize=16"], tmp_path, 3, 4)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert results["status"] == "complete" and results["epochs"] == 2 and results["steps"] == 12


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    from acon.data.digits import prepare_digits

    tmp = tmp_path_factory.mktemp("digit_shards")
    return _prepare_shards(prepare_digits(tmp / "digits"), tmp / "shards", per_shard=200)


DIGITS = lambda root: ["data=digits", f"data.root={root}"]  # noqa: E731


@pytest.mark.slow
@pytest.mark.parametrize("workers,batch", [(1, 80), (2, 96), (3, 80), (8, 56)])
def test_digits_in_shards_train_two_epochs(digit_shards, tmp_path, workers, batch):
    results = _shard_run(DIGITS(digit_shards), tmp_path, workers, batch, [sys.executable], timeout=900)
    assert results["status"] == "complete" and results["epochs"] == 2
    assert results["steps"] == 2 * (1438 // batch)  # 1,438 training digits


@pytest.mark.slow
def test_two_gloo_ranks_with_shards_stay_in_step(digit_shards, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    results = _shard_run(DIGITS(digit_shards), tmp_path, 3, 96, launcher, timeout=900)
    assert results["status"] == "complete" and results["world_size"] == 2
    assert results["steps"] == 2 * (math.ceil(1438 / 2) * 2 // 96)


def test_validation_shards_hold_the_original_files_and_reference_pixels(tiny_imagenet, tmp_path):
    """prepare_fast_imagenet.py stores validation images losslessly by default (training ones re-encoded)."""
    from acon.data.folder import ImageFolderDataset
    from acon.data.pipelines import DeviceLoader, build_loader, build_val_pipeline
    from acon.data.shards import iter_tar_samples, load_info
    from acon.data.transforms import val_transform

    root = _prepare_shards(tiny_imagenet, tmp_path, per_shard=4)
    splits = load_info(root)["splits"]
    for split, lossless in (("val", True), ("train", False)):
        files = sorted(p.read_bytes() for p in (tiny_imagenet / split).rglob("*.JPEG"))
        stored = sorted(d for f in splits[split]["filenames"] for _, d, _ in iter_tar_samples(root / f))
        assert (stored == files) is lossless, split
    ref = ImageFolderDataset(tiny_imagenet / "val", val_transform(32, 36))
    pipe = build_val_pipeline("shards", root, 32, 36)
    got = torch.cat(
        [x for x, _, _ in DeviceLoader(build_loader(pipe, 4, 0, train=False), pipe.device_transform, "cpu")]
    )
    assert torch.allclose(got, torch.stack([x for x, _ in ref]), atol=1e-5)  # folder order, unshuffled


@pytest.mark.slow
def test_shard_run_resumed_mid_epoch_matches_uninterrupted(tiny_imagenet, tmp_path):
    """Stopped after 3 of 6 batches of epoch 1 with 2 loader workers, then rerun: bit-identical weights."""
    from acon.checkpoint import load_checkpoint
    from acon.trainer import train

    root = _prepare_shards(tiny_imagenet, tmp_path / "shards", per_shard=5)
    data = ["data=folder", f"data.root={root}", "data.num_classes=3", "data.img_size=16"]
    base = [*data, "data.val_transform.resize=16", "deterministic=true"]
    train(compose(_overrides(base, tmp_path / "a", 2, 4)))
    stopped = train(compose([*_overrides(base, tmp_path / "b", 2, 4), "trainer.max_steps=9"]))
    assert stopped is None
    mid = load_checkpoint(tmp_path / "b" / "r" / "last.pt")["progress"]
    assert (mid["epoch"], mid["batch_in_epoch"]) == (1, 3)
    train(compose(_overrides(base, tmp_path / "b", 2, 4)))
    a, b = (load_checkpoint(tmp_path / d / "r" / "last.pt") for d in ("a", "b"))
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
