"""A batch whose every image is bad, under data.bad_image_policy=skip: skipped and counted against the shared
budget on every rank in step (one image per rank, as Cityscapes on 8 GPUs and VOC validation run)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import compose, run_cli

from acon.data.samplers import ResumableTrainSampler
from acon.data.seg_shapes import prepare_seg_shapes
from acon.data.segmentation import voc_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def truncate(path) -> None:
    """Keep the JPEG header (the pair check reads it) and cut the data: decoding fails."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 9 // 10])


def shapes_with_bad_train_image(root, global_batch: int, rank: int, world: int) -> str:
    """The embedded set with the first training image of ``rank`` (seed 0, epoch 0) truncated."""
    root = prepare_seg_shapes(root, train=8, val=2, size=32)
    pairs = voc_pairs(root, "train")
    first = next(iter(ResumableTrainSampler(len(pairs), global_batch, rank, world, seed=0)))[0]
    truncate(pairs[first][0])
    return pairs[first][0]


def overrides(root, out, batch: int) -> list[str]:
    return [
        "task=segmentation",
        f"data.root={root}",
        "data.train_samples=8",
        "data.val_samples=2",
        "data.shapes_size=32",
        "data.img_size=32",
        "data.bad_image_policy=skip",
        "data.max_bad_images=1",
        "data.num_workers=0",  # the skip warnings are raised in this process, where pytest sees them
        f"recipe.batch_size={batch}",
        f"recipe.base_batch_size={batch}",
        "recipe.epochs=1",
        "recipe.warmup_steps=0",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"out_dir={out}",
        "run_name=r",
    ]


def test_batch_of_one_bad_image_is_skipped_and_counted(tmp_path):
    from acon.trainer import train

    root = tmp_path / "shapes"
    bad = shapes_with_bad_train_image(root, 1, 0, 1)
    val_bad = voc_pairs(root, "val")[1][0]
    truncate(val_bad)  # validation runs one whole image a batch: this batch is all bad too
    with pytest.warns(UserWarning, match="skipping bad sample"):
        results = train(compose([*overrides(root, tmp_path, 1), "data.max_bad_images=1"]))
    assert results["steps"] == 8 and results["nonfinite_steps_skipped"] == 0
    assert results["bad_image_files"] == {"train": [bad], "val": [val_bad]}
    assert results["bad_images_skipped"] == 2


def test_bad_images_past_the_budget_still_stop(tmp_path):
    from acon.data.bad_images import BadImageError
    from acon.trainer import train

    root = tmp_path / "shapes"
    shapes_with_bad_train_image(root, 1, 0, 1)
    truncate(voc_pairs(root, "val")[0][0])
    with pytest.warns(UserWarning), pytest.raises(BadImageError, match="more than data.max_bad_images=0"):
        train(compose([*overrides(root, tmp_path, 1), "data.max_bad_images=0"]))


@pytest.mark.slow  # two processes; run with -m slow
def test_two_gloo_ranks_one_with_an_all_bad_batch(tmp_path):
    """Rank 1's first batch (its only image) is bad: both ranks skip that step together, count it once,
    and finish; no rank waits in a collective (a short dist timeout would turn a hang into a failure)."""
    root = tmp_path / "shapes"
    bad = shapes_with_bad_train_image(root, 2, 1, 2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = run_cli(
        [
            *torchrun,
            "train.py",
            *overrides(root, tmp_path, 2),
            "trainer.dist_timeout_s=60",
            "trainer.data_timeout_s=30",  # below dist_timeout_s, as DDP requires
            "trainer.threads=1",
        ],
        check=False,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 4
    assert results["bad_images_skipped"] == 1 and results["bad_image_files"]["train"] == [bad]
