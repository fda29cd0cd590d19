"""The default model follows the data: the stride-1 stem only for small inputs; conversions name their runs."""

from __future__ import annotations

import pytest
from conftest import compose
from omegaconf import OmegaConf

from acon.builders import build_model

CASES = [
    ([], "shufflenetv2_x0_5_small", True),
    (["data=imagenet"], "shufflenetv2_x0_5", False),
    (["data=folder", "data.root=/data/x", "data.num_classes=3"], "shufflenetv2_x0_5", False),
    (
        ["data=folder", "data.root=/data/x", "data.num_classes=3", "data.img_size=32"],
        "shufflenetv2_x0_5_small",
        True,
    ),
    (["data=synthetic"], "shufflenetv2_x0_5", False),
    (["task=segmentation"], "shufflenetv2_x0_5_small", True),
    (["task=segmentation", "data=voc"], "shufflenetv2_x0_5", False),
    (["data=imagenet", "model=shufflenetv2_x0_5_small"], "shufflenetv2_x0_5_small", True),  # asked for
]


@pytest.mark.parametrize("overrides, name, small", CASES, ids=[" ".join(o) or "default" for o, _, _ in CASES])
def test_default_model_follows_the_image_size(overrides, name, small):
    cfg = compose(overrides)
    assert cfg.model.name == name and cfg.model.small_input is small
    assert cfg.run_name.split("-")[1] == name


def test_imagenet_default_builds_the_papers_stem():
    """data=imagenet without model=: the paper's stride-2 stem and max-pool (about 42 M MACs at 224 px)."""
    cfg = compose(["data=imagenet"])
    model = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
    assert model.first_conv[0].stride == (2, 2) and not isinstance(
        model.maxpool, __import__("torch").nn.Identity
    )
    assert OmegaConf.to_container(cfg.model, resolve=True) == OmegaConf.to_container(
        compose(["data=imagenet", "model=shufflenetv2_x0_5"]).model, resolve=True
    )


def test_conversions_get_their_own_run_names():
    base = ["model=torchvision", "model.tv_name=mobilenet_v3_small"]
    names = {
        compose([*base, *extra]).run_name
        for extra in ([], ["model.targets=[relu,hardswish]"], ["model.init=match"], ["model.targets=[relu6]"])
    }
    assert names == {
        "digits-tv_mobilenet_v3_small-acon_c-s0",
        "digits-tv_mobilenet_v3_small+relu-hardswish-acon_c-s0",
        "digits-tv_mobilenet_v3_small+match-acon_c-s0",
        "digits-tv_mobilenet_v3_small+relu6-acon_c-s0",
    }
    assert compose([*base, "model.targets=[silu,relu]"]).run_name == "digits-tv_mobilenet_v3_small-acon_c-s0"
    timm = compose(["model=timm", "model.timm_name=resnet18", "model.init=match"])
    assert timm.run_name == "digits-timm_resnet18+match-acon_c-s0"
