"""Transfer backbones (acon/tasks/backbone.py) and the task registry: dilation, checkpoints, frozen BN/ACON."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import compose
from torch import nn

from acon import checkpoint as ckpt
from acon.errors import ConfigError
from acon.tasks import get_task, task_names, task_of
from acon.tasks.backbone import build_backbone, freeze_activations, freeze_batchnorm


def test_registry_names_the_tasks_and_defaults_to_classification():
    from acon.tasks.base import Task

    assert task_names() == ["classification", "segmentation", "detection"]
    task = get_task("classification")
    assert isinstance(task, Task) and task.primary_metric == "top1_err" and not task.higher_is_better
    assert task_of({"model": {}}).name == "classification"  # configs written before the task group
    assert task_of(compose([])).name == "classification"
    with pytest.raises(ValueError, match="task.name='pose' is not one of: classification, segmentation"):
        get_task("pose")


@pytest.mark.parametrize(
    ("output_stride", "last"),
    [pytest.param(None, 2, marks=pytest.mark.slow), pytest.param(16, 4, marks=pytest.mark.slow), (8, 8)],
)
def test_resnet_output_stride_by_dilation(output_stride, last):
    cfg = compose(["model=resnet18", "activation=relu"])
    body = build_backbone(cfg, (1, 2, 3, 4), output_stride)
    feats = body(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, *([last] * 2 if output_stride == 8 else [4, last])][:4]
    assert body.feature_info.reduction()[-1] == (output_stride or 32)
    dilations = {m.dilation for m in body.layer4.modules() if isinstance(m, nn.Conv2d)}
    assert (max(dilations)[0] > 1) == (output_stride is not None)


def test_shufflenet_native_strides_only():
    cfg = compose(["model=shufflenetv2_x0_5", "activation=acon_c"])
    assert build_backbone(cfg, (2, 3)).feature_info.reduction() == [16, 32]
    with pytest.raises(ConfigError, match="task.output_stride=8: shufflenetv2_x0_5 runs at its native"):
        build_backbone(cfg, (2, 3), 8)


def _save_classifier(cfg, path, seed=3) -> dict:
    torch.manual_seed(seed)
    model = get_task("classification").build_model(cfg)
    ckpt.atomic_save({"format": ckpt.FORMAT, "model": model.state_dict()}, path)
    return model.state_dict()


def test_checkpoint_from_our_run_lists_missing_and_unexpected_keys(tmp_path, caplog):
    cfg = compose(["model=shufflenetv2_x0_5", "activation=meta_acon", "data.num_classes=5"])
    weights = _save_classifier(cfg, tmp_path / "best.pt")
    cfg.backbone.checkpoint = str(tmp_path / "best.pt")
    with caplog.at_level(logging.INFO, logger="acon"):
        body = build_backbone(cfg, (2, 3))
    for k, v in body.state_dict().items():
        torch.testing.assert_close(v, weights[k], msg=k)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("acon: backbone.checkpoint missing keys (0): -") for line in lines), lines
    unexpected = next(line for line in lines if "unexpected keys" in line)
    assert "classifier.0.weight" in unexpected and "conv_last.0.weight" in unexpected  # head, pruned stage


def test_authors_converted_file_and_a_wrong_architecture(tmp_path):
    cfg = compose(["model=shufflenetv2_x0_5", "activation=acon_c"])
    weights = _save_classifier(cfg, tmp_path / "ours.pt")
    converted = {
        "model": "shufflenetv2_x0_5",
        "activation": "acon_c",
        "model_kwargs": {},
        "state_dict": weights,
    }
    torch.save(converted, tmp_path / "converted.pt")
    cfg.backbone.checkpoint = str(tmp_path / "converted.pt")
    body = build_backbone(cfg, (3,))
    torch.testing.assert_close(
        body.state_dict()["features.0.branch_main.0.weight"], weights["features.0.branch_main.0.weight"]
    )
    other = compose(
        ["model=shufflenetv2_x1_0", "activation=acon_c", f"backbone.checkpoint={tmp_path / 'ours.pt'}"]
    )
    with pytest.raises(
        ckpt.CheckpointError, match=r"ours.pt'.*shapes differ: features.0.branch_main.0.bias: .24,. vs .58,."
    ):
        build_backbone(other, (3,))


def test_freeze_bn_covers_meta_acon_beta_network_and_freezes_statistics():
    from torchvision.ops.misc import FrozenBatchNorm2d

    cfg = compose(["model=shufflenetv2_x0_5", "activation=meta_acon", "backbone.freeze_bn=true"])
    body = build_backbone(cfg, (3, 4))
    assert not [n for n, m in body.named_modules() if isinstance(m, nn.BatchNorm2d)]
    from acon.activations import MetaAconC

    metas = [m for m in body.modules() if isinstance(m, MetaAconC)]
    assert metas and all(
        isinstance(m.bn1, FrozenBatchNorm2d) and isinstance(m.bn2, FrozenBatchNorm2d) for m in metas
    )
    x = torch.randn(2, 3, 64, 64)
    train_out = body.train()(x)[-1]
    torch.testing.assert_close(train_out, body.eval()(x)[-1])  # statistics do not depend on the batch


@pytest.mark.slow
def test_freeze_bn_counts_every_meta_acon_bn():
    from acon.activations import MetaAconC

    cfg = compose(["model=resnet18", "activation=meta_acon"])
    body = build_backbone(cfg, (4,))
    meta = sum(isinstance(m, MetaAconC) for m in body.modules())
    plain = sum(type(m) is nn.BatchNorm2d for m in body.modules())
    assert meta > 0 and freeze_batchnorm(body) == plain + 2 * meta


def test_freeze_acon_leaves_the_rest_trainable():
    from acon.optim import build_optimizer

    cfg = compose(["model=resnet18", "activation=acon_c", "backbone.freeze_acon=true"])
    body = build_backbone(cfg, (4,))
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen and all(n.rsplit(".", 1)[-1] in ("p1", "p2", "beta") for n in frozen)
    assert all(p.requires_grad for n, p in body.named_parameters() if n not in frozen)
    opt = build_optimizer(body, cfg.recipe)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(body.parameters())) - len(frozen)
    assert freeze_activations(body) == 0  # already frozen


@pytest.mark.slow
def test_timm_features_only_with_converted_activations_and_torchvision_refused():
    from acon.activations import AconC

    cfg = compose(["model=timm", "model.timm_name=resnet10t", "activation=acon_c", "model.example_size=32"])
    body = build_backbone(cfg, (2, 3), output_stride=16)
    feats = body(torch.randn(1, 3, 64, 64))
    assert body.feature_info.reduction() == [8, 16] and [f.shape[-1] for f in feats] == [8, 4]
    assert any(isinstance(m, AconC) for m in body.modules())
    tv = compose(["model=torchvision", "model.tv_name=resnet18", "activation=relu"])
    with pytest.raises(ConfigError, match="model=torchvision .resnet18. has no features_only"):
        build_backbone(tv, (4,))
