"""Only a file that cannot be read or decoded is a bad image; the skip budget; skipped files listed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from conftest import compose, tiny_overrides
from test_fault_data import RUN, add_broken, messy_imagenet  # noqa: F401, F811  (the messy folder fixture)

from acon.data.bad_images import BadImageError, BadImages, SkipLog
from acon.data.pipelines import build_train_pipeline, build_val_pipeline

PIPELINES = ["reference", "fast"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_transform_error_is_not_a_bad_image_under_skip(tiny_imagenet, pipeline):
    """A transform that cannot work (here a negative size) fails as itself, never as a skipped image."""
    pipe = build_train_pipeline(pipeline, tiny_imagenet / "train", img_size=-1, bad_image_policy="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "skipping bad image" warning would fail here
        with pytest.raises((ValueError, RuntimeError)) as info:
            pipe.dataset[0]
    assert not isinstance(info.value, BadImageError), info.value


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_undecodable_files_are_bad_images_in_every_pipeline(tmp_path, pipeline):
    cls = tmp_path / "a"
    cls.mkdir()
    bad = add_broken(cls)
    for make in (build_train_pipeline, build_val_pipeline):
        strict = make(pipeline, tmp_path, img_size=16)
        for i, (path, _) in enumerate(strict.dataset.samples):
            with pytest.raises(BadImageError, match=str(path)):
                strict.dataset[i]
        lenient = make(pipeline, tmp_path, img_size=16, bad_image_policy="skip")
        with pytest.warns(UserWarning, match="skipping bad image"):
            batch = [lenient.dataset[i] for i in range(len(bad))]
        images, targets, n_bad = lenient.collate_fn(batch)  # all bad: a batch the trainer skips
        assert images is None and targets is None and n_bad == 3
        assert sorted(Path(f).name for f in n_bad.files) == sorted(bad)


def test_skip_log_budget_and_listing():
    store = {}
    log = SkipLog(store, {"train": 5000, "val": 10}, None)  # defaults: 5 and 1
    log.add("train", BadImages(["a", "b"]))
    log.add("train", BadImages(["a", "b", "c", "d", "e"]))  # the same files again the next epoch: distinct
    log.add("val", BadImages(["v"]))
    assert store == {"train": ["a", "b", "c", "d", "e"], "val": ["v"]}
    with pytest.raises(
        BadImageError, match=r"6 bad images in the train split, more than the default .*: 5\); first: a, b"
    ):
        log.add("train", BadImages(["f"]))
    with pytest.raises(
        BadImageError, match=r"2 bad images in the val split, more than data.max_bad_images=1"
    ):
        SkipLog({"val": ["v"]}, {"val": 10}, 1).add("val", ["w"])


@pytest.mark.parametrize("pipeline", ["reference", pytest.param("fast", marks=pytest.mark.slow)])
def test_skip_budget_stops_the_run_or_lists_the_files(messy_imagenet, tmp_path, pipeline):  # noqa: F811
    """3 broken training files: past the default budget (1) the run stops naming them; with
    data.max_bad_images=3 it completes and results.json lists them."""
    from acon.trainer import train

    base = tiny_overrides(messy_imagenet, tmp_path) + [
        "model=resnet18_small",
        "activation=relu",
        "data.bad_image_policy=skip",
        f"data.pipeline={pipeline}",
    ]
    with pytest.warns(UserWarning, match="skipping bad image"):
        with pytest.raises(
            BadImageError, match=r"bad images in the train split, more than the default .*n00000001/"
        ):
            train(compose(base + ["run_name=over"]))
    with pytest.warns(UserWarning, match="skipping bad image"):
        results = train(compose(base + ["data.max_bad_images=3"]))
    saved = json.loads((tmp_path / RUN / "results.json").read_text())
    names = sorted(p.rsplit("/", 1)[1] for p in saved["bad_image_files"]["train"])
    assert names == ["empty.JPEG", "garbage.JPEG", "truncated.JPEG"] and results["bad_images_skipped"] == 4
    assert [p.rsplit("/", 1)[1] for p in saved["bad_image_files"]["val"]] == ["empty.JPEG"]


@pytest.mark.slow
def test_ddp_ranks_share_one_skip_budget_and_list(messy_imagenet, tmp_path):  # noqa: F811
    """2 gloo ranks read disjoint halves of each epoch: the budget counts the bad files of every rank,
    results.json lists and counts them all, and past the budget every rank stops with the error."""
    import sys

    from conftest import run_cli

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    base = [*torchrun, "train.py", *tiny_overrides(messy_imagenet, tmp_path), "model=shufflenetv2_x0_5_small"]
    base += ["activation=relu", "trainer.threads=1", "data.bad_image_policy=skip", "recipe.batch_size=8"]
    run_cli([*base, "data.max_bad_images=3", "run_name=within"])
    saved = json.loads((tmp_path / "within" / "results.json").read_text())
    names = sorted(p.rsplit("/", 1)[1] for p in saved["bad_image_files"]["train"])
    assert names == ["empty.JPEG", "garbage.JPEG", "truncated.JPEG"] and saved["bad_images_skipped"] == 4
    over = run_cli([*base, "data.max_bad_images=2", "run_name=over"], check=False, timeout=300)
    assert over.returncode != 0
    assert "3 bad images in the train split, more than data.max_bad_images=2" in over.stdout + over.stderr
