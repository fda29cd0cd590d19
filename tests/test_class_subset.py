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


@pytest.fixture(scope="module")
def folder_data(tiny_imagenet, tmp_path_factory):
    """The data group of the tiny folder, composed once for the module."""
    return compose(tiny_overrides(tiny_imagenet, tmp_path_factory.mktemp("out"))).data


def _data(base, **keys):
    data = base.copy()
    for k, v in keys.items():
        data[k] = v
    return data


def test_folder_data_reads_only_the_subset(folder_data, two_of_three):
    data = _data(folder_data, class_subset=str(two_of_three), num_classes=2)
    train, val = build_datasets(data)
    assert train.classes == val.classes == ["n00000000", "n00000002"]
    assert len(train) == 16 and len(val) == 6 and set(train.targets) == {0, 1}
    assert {p.split("/")[-2] for p, _ in train.samples} == {"n00000000", "n00000002"}
    assert data_label(data) == "folder[two]" and data_label(folder_data) == "folder"


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
def test_bad_subset_files_name_the_file_and_line(folder_data, tmp_path, text, match):
    path = tmp_path / "two.txt"
    path.write_text(text)
    data = _data(folder_data, class_subset=str(path), num_classes=2)
    with pytest.raises(ConfigError, match=match) as e:
        build_datasets(data)
    assert "data.class_subset=" in str(e.value)


def test_unknown_subset_and_wrong_class_count_name_the_key(folder_data, two_of_three):
    with pytest.raises(ConfigError, match=r"data.class_subset='imagenet99' is neither a shipped list"):
        build_datasets(_data(folder_data, class_subset="imagenet99"))
    with pytest.raises(ConfigError, match=r"has 2 classes but data.num_classes=3"):
        build_datasets(_data(folder_data, class_subset=str(two_of_three)))


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


@pytest.mark.slow
def test_doctor_checks_the_subsets_folders(tiny_imagenet, tmp_path, two_of_three, capsys):
    from acon import doctor

    args = ["data=folder", f"data.root={tiny_imagenet}", f"out_dir={tmp_path / 'runs'}"]
    doctor.main([*args, f"data.class_subset={two_of_three}", "data.num_classes=2", "--no-ddp"])
    out = capsys.readouterr().out
    assert "ok   data classes: 2 class folders in train and val" in out
    assert "ok   data train: 16 files in 2 classes" in out
    two_of_three.write_text("n00000000\nn00000009\n")
    assert doctor.main([*args, f"data.class_subset={two_of_three}", "data.num_classes=2", "--no-ddp"]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("fail data classes")]
    assert len(fails) == 1 and "data.class_subset=" in fails[0] and "['n00000009']" in fails[0]
