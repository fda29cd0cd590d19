"""Transfer tasks against the recipes they cite: validation batch, per-detector lr, frozen stages,
aspect-ratio grouping, data.preprocess in detection, recipe keys a task does not use, task state."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import compose, run_cli

from acon.distributed import DistInfo
from acon.errors import ConfigError
from acon.tasks import get_task, task_of

pytestmark = pytest.mark.usefixtures("one_thread")
INFO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def det_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("det") / "shapes"
    base = ["task=detection", f"data.root={root}", "data.train_samples=8", "data.val_samples=6"]
    return lambda *extra: compose([*base, "recipe.batch_size=4", "recipe.base_batch_size=4", *extra])


@pytest.fixture(scope="module")
def seg_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg") / "shapes"
    base = ["task=segmentation", f"data.root={root}", "data.train_samples=8", "data.val_samples=4"]
    return lambda *extra: compose([*base, "data.shapes_size=32", "data.img_size=32", *extra])


# -- validation batch: whole images one per rank, not trainer.eval_batch_size (256) -----------------------
def test_segmentation_validates_whole_images_one_per_rank(seg_cfg):
    cfg = seg_cfg("trainer.eval_batch_size=256", "recipe.batch_size=4", "recipe.base_batch_size=4")
    _, val, _ = task_of(cfg).build_loaders(cfg, INFO)  # every val image is 32x32: one size
    assert val.batch_size == 1
    cfg = seg_cfg("task.eval_batch_size=3", "recipe.batch_size=4", "recipe.base_batch_size=4")
    assert task_of(cfg).build_loaders(cfg, INFO)[1].batch_size == 3  # one size: the task's own batch
    assert task_of(cfg).build_val_loader(cfg, 256, INFO, {}).batch_size == 3  # eval.py's batch_size caps


def test_detection_validation_loader_batches_one_image(det_cfg):
    cfg = det_cfg("trainer.eval_batch_size=256")
    assert task_of(cfg).build_loaders(cfg, INFO)[1].batch_size == 1
    assert task_of(cfg).build_val_loader(cfg, 256, INFO, {}).batch_size == 1


def test_uniform_batch_size_is_one_for_mixed_sizes():
    from acon.tasks.base import uniform_batch_size

    assert uniform_batch_size([(8, 8), (8, 8)], 4) == 4 and uniform_batch_size([(8, 8), (8, 6)], 4) == 1


# -- per-detector learning rate ---------------------------------------------------------------------------
@pytest.mark.parametrize("detector, lr", [("fasterrcnn", 0.02), ("retinanet", 0.01)])
def test_each_detector_gets_its_cited_lr(detector, lr):
    from acon.optim import step_lrs

    recipe = compose([f"experiment=detection/{detector}_resnet50_relu"]).recipe
    assert recipe.lr == lr and recipe.batch_size == 16 and recipe.warmup_lr == pytest.approx(lr / 1000)
    assert step_lrs(recipe, 90000, [1001, 60000]) == pytest.approx([lr, lr / 10])


# -- frozen stages ----------------------------------------------------------------------------------------
def trainable_prefixes(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A backbone.checkpoint override per model (our format, random weights)."""
    from acon import checkpoint as ckpt
    from acon.builders import build_model

    folder = tmp_path_factory.mktemp("bb")

    def make(model: str, activation: str = "relu") -> str:
        cfg = compose([f"model={model}", f"activation={activation}"])
        path = folder / f"{model}-{activation}.pt"
        state = build_model(cfg.model, cfg.activation, 10).state_dict()
        torch.save({"format": ckpt.FORMAT, "model": state}, path)
        return f"backbone.checkpoint={path}"

    return make


def test_detection_freezes_stem_and_first_stage_of_a_pretrained_backbone(pretrained):
    from torchvision.ops.misc import FrozenBatchNorm2d

    from acon.tasks.backbone import build_backbone

    cfg = compose(["task=detection", "model=resnet18", "activation=acon_c", pretrained("resnet18", "acon_c")])
    body = build_backbone(cfg, (1, 2, 3, 4))
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert any(n.startswith("conv1") for n in frozen) and any(n.startswith("layer1.") for n in frozen)
    assert "layer1.0.acon1.p1" in frozen  # ACON-C's p1/p2/β of the frozen stage too
    assert not any(n.startswith("layer2.") for n in frozen)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer2[0].bn1, torch.nn.BatchNorm2d)
    shuffle_cfg = compose(["task=detection", "model=shufflenetv2_x0_5", pretrained("shufflenetv2_x0_5")])
    shuffle = build_backbone(shuffle_cfg, (1, 2, 3))
    frozen = {n.rsplit(".", 2)[0] for n, p in shuffle.named_parameters() if not p.requires_grad}
    assert {"first_conv", "features.0.branch_proj", "features.3.branch_main"} <= frozen
    assert not any(n.startswith("features.4.") for n, p in shuffle.named_parameters() if not p.requires_grad)


def test_freeze_at_zero_segmentation_and_scratch_backbones_train_everything(pretrained):
    from acon.tasks.backbone import build_backbone

    bb = pretrained("resnet18")
    for over in (
        ["task=detection", "backbone.freeze_at=0", bb],
        ["task=segmentation", bb],
        ["task=detection"],
    ):
        body = build_backbone(compose([*over, "model=resnet18"]), (3, 4))
        assert all(p.requires_grad for p in body.parameters()), over
    body = build_backbone(compose(["task=detection", "model=resnet18", "backbone.freeze_at=3"]), (3, 4))
    assert "layer2" not in trainable_prefixes(body) and "layer3" in trainable_prefixes(body)
    with pytest.raises(ConfigError, match="backbone.freeze_at=6"):
        build_backbone(compose(["task=detection", "model=resnet18", "backbone.freeze_at=6"]), (3, 4))


# -- aspect-ratio grouping that resumes exactly -------------------------------------------------------------
def test_grouped_sampler_batches_one_group_and_resumes_exactly():
    from acon.detection.sampler import GroupedTrainSampler, aspect_ratio_groups

    ratios = [0.5 if i % 3 == 0 else (1.0 if i % 3 == 1 else 1.8) for i in range(60)]
    groups = aspect_ratio_groups(ratios, 3)
    assert len(set(groups)) == 3
    per_rank = []
    for rank in (0, 1):
        s = GroupedTrainSampler(groups, 8, rank, 2, seed=5)
        s.set_position(2)
        keys = list(s)
        batches = [keys[k : k + 4] for k in range(0, len(keys), 4)]
        assert len(batches) == 60 // 8
        assert sum(len({groups[i] for i, _ in b}) == 1 for b in batches) >= len(batches) - 2
        s.set_position(2, 3)
        assert list(s) == keys[3 * 4 :]  # resumed mid-epoch: the very same remaining samples and seeds
        per_rank.append([i for i, _ in keys])
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0])) == 28


def test_detection_train_loader_groups_by_aspect_ratio(det_cfg):
    from acon.detection.sampler import GroupedTrainSampler

    cfg = det_cfg()
    assert isinstance(task_of(cfg).build_loaders(cfg, INFO)[0].sampler, GroupedTrainSampler)
    cfg = det_cfg("data.aspect_ratio_group_factor=-1")
    assert type(task_of(cfg).build_loaders(cfg, INFO)[0].sampler).__name__ == "ResumableTrainSampler"


# -- data.preprocess in detection ---------------------------------------------------------------------------
def test_detection_honours_bgr_255(det_cfg):
    from acon.detection.dataset import build_split

    rgb, bgr = det_cfg(), det_cfg("data.preprocess=bgr_255")
    image_rgb = build_split(rgb.data, "val", train=False)[0][0]
    image_bgr = build_split(bgr.data, "val", train=False)[0][0]
    assert torch.equal(image_bgr, image_rgb.flip(0))
    with torch.device("meta"):
        t_rgb = get_task("detection", rgb).build_model(rgb).net.transform
        t_bgr = get_task("detection", bgr).build_model(bgr).net.transform
    assert t_rgb.image_mean == pytest.approx([0.485, 0.456, 0.406])
    x = torch.rand(3, 8, 8)
    assert torch.allclose(t_bgr.normalize(x), x * 255, atol=1e-4)  # the authors' BGR 0-255 input


# -- recipe keys a task does not use -------------------------------------------------------------------------
def test_detection_refuses_classification_recipe_keys():
    task = get_task("detection")
    cfg = compose(["task=detection", "recipe.mixup=0.8", "recipe.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"task=detection does not use recipe.label_smoothing=0.1, "):
        task.check_config(cfg)
    task.check_config(compose(["task=detection", "recipe.ema_decay=0.999", "recipe.clip_grad=5"]))


def test_segmentation_keeps_label_smoothing_and_refuses_mixup(seg_cfg):
    task = get_task("segmentation")
    task.check_config(seg_cfg("recipe.label_smoothing=0.1"))
    with pytest.raises(ConfigError, match=r"does not use recipe.cutmix=1.0"):
        task.check_config(seg_cfg("recipe.cutmix=1.0"))


@pytest.mark.parametrize("task_name", ["segmentation", "detection"])
def test_dense_tasks_refuse_a_budget_recipes_resolution_schedule(task_name, seg_cfg):
    """Progressive resizing is read by the classification pipelines only: a dense task names the key."""
    cfg = (
        seg_cfg("recipe=budget_16")
        if task_name == "segmentation"
        else compose(["task=detection", "recipe=budget_16"])
    )
    with pytest.raises(
        ConfigError,
        match=rf"task={task_name} does not use (recipe\.label_smoothing=0\.1, )?recipe\.resolution=",
    ):
        get_task(task_name).check_config(cfg)


def test_unused_recipe_key_is_one_error_line_exit_2(tmp_path):
    proc = run_cli(
        [sys.executable, "train.py", "task=detection", "recipe.mixup=0.8", f"out_dir={tmp_path}"],
        check=False,
        timeout=180,
    )
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "recipe.mixup=0.8" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("*.pt"))


# -- task state and the shared helpers -------------------------------------------------------------------------
def test_segmentation_task_state_comes_from_its_config(seg_cfg):
    cfg = seg_cfg("task.aux_loss=true", "task.aux_weight=0.25", "recipe.label_smoothing=0.1")
    from torch.nn import functional as F

    from acon.engine import StepContext

    model = get_task("segmentation", cfg).build_model(cfg).eval()
    task = task_of(cfg)  # a fresh task: no setup call, no other method called first
    ctx = StepContext(model, None, None, None, None, torch.device("cpu"), "fp32", False)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    with torch.no_grad():
        out = model(x)
        want = F.cross_entropy(out["out"], y, label_smoothing=0.1)
        want = want + 0.25 * F.cross_entropy(out["aux"], y, label_smoothing=0.1)
        assert torch.allclose(task.loss(ctx, x, y), want)
    with pytest.raises(RuntimeError, match="without a config"):
        _ = get_task("segmentation").settings


def test_default_out_indices_from_feature_strides():
    from acon.tasks.backbone import default_out_indices

    cases = {
        ("resnet18", 4): (1, 2, 3, 4),
        ("resnet18", 3): (2, 3, 4),
        ("resnet18", 2): (3, 4),
        ("shufflenetv2_x0_5", 4): (1, 2, 3),
        ("shufflenetv2_x0_5", 2): (2, 3),
        ("shufflenetv2_x0_5_small", 2): (2, 3),
    }
    for (model, count), want in cases.items():
        assert default_out_indices(compose([f"model={model}"]), count) == want, model


def test_tasks_provide_mixup_criterion_and_flops_input(seg_cfg, det_cfg):
    cls = compose(["recipe.mixup=0.2"])
    task = task_of(cls)
    assert task.build_mixup(cls) is not None and task.flops_input(cls) == int(cls.data.img_size)
    for cfg in (seg_cfg(), det_cfg()):
        t = task_of(cfg)
        assert t.build_mixup(cfg) is None and t.build_criterion(cfg, None) is None
        assert t.flops_input(cfg) == int(cfg.data.img_size)


def test_classification_task_does_not_import_the_trainer():
    code = "import sys; import acon.tasks.classification; assert 'acon.trainer' not in sys.modules"
    run_cli([sys.executable, "-c", code])
    import acon.trainer

    assert not hasattr(acon.trainer, "build_datasets") and not hasattr(acon.trainer, "forward_loss")
