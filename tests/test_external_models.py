"""model=timm / model=torchvision: another library's classifier, converted, through train, resume and eval."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import compose, run_cli, tiny_overrides

from acon import MetaAconC
from acon.checkpoint import load_checkpoint

RUN = "folder-{model}-{act}-s0"


def _train(overrides):
    from acon.trainer import train

    return train(compose(overrides))


@pytest.mark.slow  # about 2 min on 2 shared cores
def test_converted_timm_model_resumes_bit_exactly_and_evaluates(tiny_imagenet, tmp_path):
    base = tiny_overrides(tiny_imagenet, tmp_path) + [
        "deterministic=true",
        "model=timm",
        "model.timm_name=test_efficientnet",
        "activation=acon_c",
        "trainer.ckpt_every_steps=2",
    ]
    run = RUN.format(model="timm_test_efficientnet", act="acon_c")
    _train(base + ["out_dir=" + str(tmp_path / "a")])
    assert _train(base + ["out_dir=" + str(tmp_path / "b"), "trainer.max_steps=3"]) is None
    _train(base + ["out_dir=" + str(tmp_path / "b")])
    a, b = (load_checkpoint(tmp_path / d / run / "last.pt") for d in ("a", "b"))
    assert a["progress"]["step"] == b["progress"]["step"] == 6
    assert any(k.endswith(".p1") for k in a["model"])  # ACON-C parameters are in the state dict
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    out = tmp_path / "e.json"
    run_cli([sys.executable, "eval.py", f"checkpoint={tmp_path / 'b' / run / 'best.pt'}", f"out={out}"])
    got = json.loads(out.read_text())
    logged = b["progress"]["history"][-1]
    assert got["count"] == 9 and got["top1_err"] == pytest.approx(logged["val_top1_err"])


def test_resume_into_another_timm_model_is_refused(tiny_imagenet, tmp_path):
    from acon.checkpoint import CheckpointError

    base = tiny_overrides(tiny_imagenet, tmp_path, steps=1) + ["model=timm", "run_name=fixed"]
    _train(base + ["model.timm_name=test_efficientnet", "activation=meta_acon"])
    with pytest.raises(CheckpointError, match="does not fit this model"):
        _train(base + ["model.timm_name=test_resnet", "activation=meta_acon"])


def test_torchvision_config_builds_with_kwargs_and_bad_names_are_named():
    from acon.builders import build_model
    from acon.validate import ConfigError, check_train_config

    cfg = compose(
        [
            "model=torchvision",
            "model.tv_name=mobilenet_v2",
            "+model.kwargs.width_mult=0.5",
            "activation=meta_acon",
        ]
    )
    cfg.model.targets = ["relu6"]
    net = build_model(cfg.model, cfg.activation, 10)
    assert sum(isinstance(m, MetaAconC) for m in net.modules()) == 35
    assert net.get_submodule("features.0.0").out_channels == 16  # width 0.5
    bad = compose(["model=timm", "model.timm_name=no_such_net"])
    with pytest.raises(ConfigError, match="model.timm_name='no_such_net'"):
        check_train_config(bad, 1)


@pytest.mark.slow
def test_digits_default_trains_a_converted_efficientnet(tmp_path):
    results = _train(
        ["model=timm", "model.timm_name=efficientnet_b0", "activation=acon_c", f"out_dir={tmp_path}"]
        + ["recipe.epochs=1", "trainer.progress=false", "data.img_size=32", "data.val_transform.resize=32"]
    )
    assert results["top1_err"] < 90.0
