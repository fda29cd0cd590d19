"""data.class_subset: the shipped ImageNet-100 list (CMC's) and subset files on folder, fast and shard data,
with clear errors for malformed or missing classes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from acon.data.build import build_datasets, check_shard_subset
from acon.data.subsets import SUBSETS, data_label, read_subset
from acon.errors import ConfigError

sys.path.insert(0, str(ROOT / "scripts"))


def test_imagenet100_is_cmcs_list_shipped_in_the_package():
    wnids = read_subset("imagenet100")
    assert len(wnids) == len(set(wnids)) == 100 and wnids == sorted(wnids)
    text = SUBSETS["imagenet100"].read_text()
    listed = [x for x in text.splitlines() if x and not x.startswith("#")]
    assert listed[:2] == ["n02869837", "n01749939"] and listed[-1] == "n02090622"  # CMC's file order
    assert "Contrastive" in text and SUBSETS["imagenet100"].parent == ROOT / "acon" / "data"
    cfg = compose(["data=imagenet100"]).data
    assert (cfg.name, cfg.num_classes, cfg.class_subset) == ("imagenet100", 100, "imagenet100")


@pytest.fixture
def two_of_three(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("# two of the tiny set's classes\nn00000002\nn00000000  # a comment\n\n")
    return path


def _data(root, out, *extra):
    return compose([*tiny_overrides(root, out), *extra]).data


def test_folder_data_reads_only_the_subset(tiny_imagenet, tmp_path, two_of_three):
    data = _data(tiny_imagenet, tmp_path, f"data.class_subset={two_of_three}", "data.num_classes=2")
    train, val = build_datasets(data)
    assert train.classes == val.classes == ["n00000000", "n00000002"]
    assert len(train) == 16 and len(val) == 6 and set(train.targets) == {0, 1}
    assert {p.split("/")[-2] for p, _ in train.samples} == {"n00000000", "n00000002"}
    assert data_label(data) == "folder[two]" and data_label(_data(tiny_imagenet, tmp_path)) == "folder"


def test_fast_pipeline_reads_only_the_subset(tiny_imagenet, tmp_path, two_of_three):
    from acon.tasks.classification import ClassificationTask

    extra = [f"data.class_subset={two_of_three}", "data.num_classes=2", "data.pipeline=fast"]
    cfg = compose([*tiny_overrides(tiny_imagenet, tmp_path), *extra])
    info = type("Info", (), {"rank": 0, "world_size": 1, "device": torch.device("cpu")})()
    train, val, n_train = ClassificationTask(cfg).build_loaders(cfg, info)
    assert n_train == 16 and {int(t) for _, targets, _ in val for t in targets} == {0, 1}


@pytest.mark.parametrize(
    "text, match",
    [
        ("n00000000\nn0000001\n", r"two.txt:2: 'n0000001' is not a WordNet id"),
        ("n00000000\nn00000001\nn00000000\n", r"two.txt:3: n00000000 repeats line 1"),
        ("n00000000\nn00000007\n", r"1 of its 2 classes are not in .*train: \['n00000007'\]"),
        ("# nothing\n", "lists no class"),
    ],
)
def test_bad_subset_files_name_the_file_and_line(tiny_imagenet, tmp_path, text, match):
    path = tmp_path / "two.txt"
    path.write_text(text)
    data = _data(tiny_imagenet, tmp_path, f"data.class_subset={path}", "data.num_classes=2")
    with pytest.raises(ConfigError, match=match) as e:
        build_datasets(data)
    assert "data.class_subset=" in str(e.value)


def test_unknown_subset_and_wrong_class_count_name_the_key(tiny_imagenet, tmp_path, two_of_three):
    with pytest.raises(ConfigError, match=r"data.class_subset='imagenet99' is neither a shipped list"):
        build_datasets(_data(tiny_imagenet, tmp_path, "data.class_subset=imagenet99"))
    with pytest.raises(ConfigError, match=r"has 2 classes but data.num_classes=3"):
        build_datasets(_data(tiny_imagenet, tmp_path, f"data.class_subset={two_of_three}"))


def test_shards_are_written_per_subset_and_checked(tiny_imagenet, tmp_path, two_of_three):
    from prepare_fast_imagenet import prepare

    prepare(tiny_imagenet / "train", tmp_path / "full", "train", samples_per_shard=8)
    entry = prepare(
        tiny_imagenet / "train",
        tmp_path / "sub",
        "train",
        samples_per_shard=8,
        class_subset=str(two_of_three),
    )
    assert entry["num_samples"] == 16
    assert json.loads((tmp_path / "sub" / "_info.json").read_text())["classes"] == ["n00000000", "n00000002"]
    check_shard_subset(tmp_path / "sub", str(two_of_three))
    with pytest.raises(ConfigError, match="hold 3 classes, not only the subset's 2; write subset shards"):
        check_shard_subset(tmp_path / "full", str(two_of_three))
