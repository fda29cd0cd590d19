"""Typed schemas of every config group, registered with Hydra so a wrong type fails at composition.

Each group's yaml files start from its schema (``defaults: [base_<group>, _self_]``); the dataclasses below
are the only place a key is declared. A field's ``allowed`` rule (a range or a set of choices) is checked
by :func:`acon.validate.check_schema` before any data is read or any model is built.

To add a key: add a field to the group's dataclass here (with ``allowed=`` if it has a range or choices: the
rules and ``key`` are in :mod:`acon.config_rules`), then set it in the yaml files that need another value than
the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

import acon.resolvers  # noqa: F401  (the configs' ${acon.*} resolvers)
from acon.config_rules import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    AutoOr,
    OneOf,
    Range,
    key,
)


@dataclass
class ModelSchema:
    """``model``: a registered architecture and its constructor options."""

    name: str = key()
    arch: str = key(allowed=OneOf(source="acon.builders:model_archs"))
    small_input: bool = key(False)
    kwargs: dict[str, Any] = key({})


@dataclass
class ExternalModelSchema(ModelSchema):
    """``model=timm`` / ``model=torchvision``: a classifier of that library with its activations converted."""

    timm_name: str | None = key(None)
    tv_name: str | None = key(None)
    example_size: int = key(224, POSITIVE_INT)
    targets: list[str] | None = key(None)
    init: str = key("default", OneOf(("default", "match")))


@dataclass
class ActivationSchema:
    """``activation``: a name and the partial ``layer`` the models instantiate."""

    name: str = key()
    layer: dict[str, Any] = key()


@dataclass
class DataSchema:
    """``data``: what every kind of data shares."""

    name: str = key()
    kind: str = key(allowed=OneOf(source="acon.data.build:DATA_KINDS"))
    num_classes: int = key(allowed=POSITIVE_INT)
    img_size: int = key(allowed=POSITIVE_INT)
    preprocess: str = key("rgb_normalized", OneOf(("rgb_normalized", "bgr_255")))
    pipeline: str = key("reference", OneOf(source="acon.data.pipelines:PIPELINES"))
    bad_image_policy: str = key("raise", OneOf(("raise", "skip")))
    max_bad_images: int | None = key(None, NON_NEGATIVE_INT)  # null: 0.1 % of the split, at least 1
    index_cache: bool = key(True)  # keep each split's file list (acon/data/index.py)
    index_cache_dir: str | None = key(None)
    num_workers: Any = key("auto", AutoOr(NON_NEGATIVE_INT))  # auto: acon/cpu_budget.py
    pin_memory: bool = key(True)
    persistent_workers: bool = key(False)
    prefetch_factor: int = key(2, POSITIVE_INT)


@dataclass
class FolderDataSchema(DataSchema):
    """``data`` read from image folders (ImageNet layout, the digits PNGs)."""

    root: str | None = key(None)
    train_split: str = key("train")
    val_split: str = key("val")
    train_transform: dict[str, Any] = key()
    val_transform: dict[str, Any] = key()
    class_subset: str | None = key(None)  # imagenet100 (acon/data/imagenet100.txt) or a file of wnids


@dataclass
class SyntheticDataSchema(DataSchema):
    """``data=synthetic``: random tensors."""

    train_samples: int = key(allowed=POSITIVE_INT)
    val_samples: int = key(allowed=POSITIVE_INT)


@dataclass
class SegmentationDataSchema(DataSchema):
    """``data`` for ``task=segmentation``: a VOC or Cityscapes layout, or the embedded shapes set."""

    kind: str = key(allowed=OneOf(source="acon.tasks.segmentation:SEG_DATA_KINDS"))
    root: str | None = key(None)  # seg_shapes: null writes it under ~/.cache/acon-suite (or $ACON_CACHE)
    train_split: str = key("train")
    val_split: str = key("val")
    scale_range: list[float] = key([0.5, 2.0])  # random rescale before the img_size crop
    hflip: bool = key(True)
    val_max_size: int | None = key(None, POSITIVE_INT)  # null: validate on whole images at their size
    train_mask_dir: str = key("SegmentationClass")  # VOC layout: masks of train_split (train_aug: ...Aug)
    val_mask_dir: str = key("SegmentationClass")  # VOC layout: masks of val_split
    mean: list[float] = key([0.485, 0.456, 0.406])
    std: list[float] = key([0.229, 0.224, 0.225])
    train_samples: int = key(192, POSITIVE_INT)  # seg_shapes only: images written per split, and their size
    val_samples: int = key(48, POSITIVE_INT)
    shapes_size: int = key(48, POSITIVE_INT)


@dataclass
class DetectionDataSchema(DataSchema):
    """``data`` for ``task=detection``: a COCO-format folder or the embedded shapes set."""

    kind: str = key(allowed=OneOf(source="acon.tasks.detection:DET_DATA_KINDS"))
    root: str | None = key(None)  # det_shapes: null writes it under ~/.cache/acon-suite (or $ACON_CACHE)
    train_split: str = key("train2017")
    val_split: str = key("val2017")
    ann_file: str = key("annotations/instances_{split}.json")  # under root; {split} is filled in
    images_dir: str = key("{split}")  # under root
    max_size: int = key(1333, POSITIVE_INT)  # long-side cap; img_size is the short side the detector sees
    box_policy: str = key("clip", OneOf(("clip", "raise")))  # boxes outside the image / without area
    empty_policy: str = key("skip", OneOf(("skip", "keep")))  # training images without boxes
    hflip_prob: float = key(0.5, Range(0, 1))
    aspect_ratio_group_factor: int = key(3, Range(-1, integer=True))  # torchvision's; -1: no grouping
    train_samples: int = key(512, POSITIVE_INT)  # det_shapes only: images per split, size, shapes per image
    val_samples: int = key(128, POSITIVE_INT)
    shapes_size: int = key(64, POSITIVE_INT)
    max_shapes: int = key(3, POSITIVE_INT)


@dataclass
class ResolutionSchema:
    """``recipe.resolution``: progressive resizing per epoch and the evaluation size (acon/data/resolution.py)."""

    min_res: int = key(160, POSITIVE_INT)  # training size up to start_ramp
    max_res: int = key(192, POSITIVE_INT)  # training size from end_ramp on
    start_ramp: int = key(allowed=NON_NEGATIVE_INT)  # epochs (0-based)
    end_ramp: int = key(allowed=NON_NEGATIVE_INT)
    round_to: int = key(32, POSITIVE_INT)  # ramp sizes rounded to a multiple of this
    eval_res: int = key(256, POSITIVE_INT)  # evaluation centre crop
    eval_crop_ratio: float = key(224 / 256, Range(0, 1, low_open=True))  # crop side / resized short side


@dataclass
class RecipeSchema:
    """``recipe``: optimiser, schedule, length and regularisation."""

    name: str = key()
    batch_size: int = key(allowed=POSITIVE_INT)
    base_batch_size: int = key(allowed=POSITIVE_INT)
    lr: float = key(allowed=POSITIVE)
    momentum: float = key(0.9, PROBABILITY)
    nesterov: bool = key(False)
    weight_decay: float = key(0.0, NON_NEGATIVE)
    label_smoothing: float = key(0.0, PROBABILITY)
    iterations: int | None = key(None, POSITIVE_INT)
    epochs: int | None = key(None, POSITIVE_INT)
    schedule: str = key("linear", OneOf(source="acon.optim:SCHEDULES"))
    poly_power: float | None = key(None, POSITIVE)  # schedule=poly: lr·(1 - t/T)^poly_power; null: 0.9
    lr_steps: list[int] | None = key(None)  # schedule=step: iterations (at base_batch_size) where lr drops
    lr_gamma: float = key(0.1, POSITIVE)  # schedule=step: the factor at each of lr_steps
    warmup_steps: int = key(0, NON_NEGATIVE_INT)
    warmup_lr: float = key(0.0, NON_NEGATIVE)
    warmup_epochs: float | None = key(None, POSITIVE)  # with recipe.epochs: replaces warmup_steps
    resolution: ResolutionSchema | None = None  # progressive resizing (budget recipes); null: data.img_size
    min_lr: float = key(0.0, NON_NEGATIVE)
    ema_decay: float | None = key(None, Range(0, 1, low_open=True, high_open=True))
    mixup: float = key(0.0, NON_NEGATIVE)
    cutmix: float = key(0.0, NON_NEGATIVE)
    clip_grad: float | None = key(None, POSITIVE)


@dataclass
class TrainerSchema:
    """``trainer``: device, precision, logging and checkpoint intervals."""

    device: str = key("auto", OneOf(("auto", "cpu", "cuda")))
    precision: str = key("fp32", OneOf(source="acon.engine:PRECISIONS"))
    channels_last: bool = key(False)
    compile: bool = key(False)
    sync_bn: bool = key(False)
    fuse_bn_act: Any = key("auto", OneOf(("auto", True, False)))  # acon.fuse_bn.fuse_bn_acon
    threads: Any = key("auto", AutoOr(POSITIVE_INT))  # auto: acon/cpu_budget.py; null: torch's default
    log_every: int = key(20, POSITIVE_INT)
    hist_every: int = key(200, POSITIVE_INT)
    ckpt_every_steps: int = key(500, POSITIVE_INT)
    val_every_epochs: int = key(1, POSITIVE_INT)
    val_every_steps: int | None = key(None, POSITIVE_INT)
    eval_batch_size: int = key(256, POSITIVE_INT)
    keep_step_checkpoints: int = key(0, NON_NEGATIVE_INT)
    nan_policy: str = key("stop", OneOf(("stop", "skip")))
    max_steps: int | None = key(None, POSITIVE_INT)
    progress: bool = key(True)
    dist_timeout_s: float = key(600.0, POSITIVE)
    tensorboard_errors: str = key("raise", OneOf(("raise", "warn")))  # a refused TensorBoard write
    data_timeout_s: float | None = key(300.0, POSITIVE)


@dataclass
class TaskSchema:
    """``task``: which task the shared trainer runs (``acon/tasks/``); classification is the default."""

    name: str = key("classification", OneOf(source="acon.tasks:task_names"))


@dataclass
class SegmentationTaskSchema(TaskSchema):
    """``task=segmentation``: a torchvision FCN or DeepLabV3 head on a feature backbone."""

    head: str = key("deeplabv3", OneOf(("fcn", "deeplabv3")))
    output_stride: int | None = key(None, OneOf((8, 16, 32)))  # ResNet dilation; null: native strides
    aux_loss: bool = key(False)  # an FCN head on the second-last feature map, weighted by aux_weight
    aux_weight: float = key(0.4, NON_NEGATIVE)
    ignore_index: int = key(255, NON_NEGATIVE_INT)  # mask value left out of the loss and the metrics
    eval_batch_size: int = key(1, POSITIVE_INT)  # whole validation images per rank and batch


@dataclass
class DetectionTaskSchema(TaskSchema):
    """``task=detection``: a torchvision RetinaNet or Faster R-CNN with an FPN on a feature backbone."""

    detector: str = key("retinanet", OneOf(source="acon.detection.detectors:DETECTORS"))
    fpn_channels: int = key(256, POSITIVE_INT)
    anchor_scale: float | None = key(None, POSITIVE)  # anchor size / level stride; null: torchvision's
    detections_per_img: int = key(100, POSITIVE_INT)
    kwargs: dict[str, Any] = key({})  # more keywords for torchvision's RetinaNet / FasterRCNN
    eval_batch_size: int = key(1, POSITIVE_INT)  # validation images per rank and batch


@dataclass
class BackboneSchema:
    """``backbone``: the feature extractor of a transfer task (``acon/tasks/backbone.py``)."""

    checkpoint: str | None = key(None)  # our best.pt/last.pt, or an authors' (converted) file
    freeze_bn: bool = key(False)  # every BatchNorm (Meta-ACON's β-network ones too) → FrozenBatchNorm2d
    freeze_acon: bool = key(False)  # ACON p1/p2/β (Meta-ACON: its β network) not trained
    out_indices: list[int] | None = key(None)  # null: the task's default feature maps
    freeze_at: int | None = key(None, NON_NEGATIVE_INT)  # stem + n-1 stages frozen; null: task's (pretrained)


@dataclass
class TrainSchema:
    """train.yaml's own keys (the groups carry their own schemas)."""

    model: Any = MISSING
    activation: Any = MISSING
    data: Any = MISSING
    recipe: Any = MISSING
    trainer: Any = MISSING
    task: Any = MISSING
    experiment: Any = None
    backbone: BackboneSchema = field(default_factory=BackboneSchema)
    seed: int = key(0, NON_NEGATIVE_INT)
    deterministic: bool = key(False)
    out_dir: str = key("runs")
    sweep_name: str = key("sweep")
    run_name: str = key()
    resume: str | None = key("auto")  # auto | none | a checkpoint file (checked by acon.validate)
    resume_mode: str = key("strict", OneOf(source="acon.validate:RESUME_MODES"))


@dataclass
class OfficialSchema:
    """eval.py's ``official``: how to read an authors' released checkpoint."""

    model: str | None = key(None, OneOf(source="models:list_models"))
    activation: str | None = key(None)  # inferred from the parameter names when null
    model_kwargs: dict[str, Any] = key({})


@dataclass
class EvalSchema:
    """eval.yaml's own keys."""

    data: Any = MISSING
    trainer: Any = MISSING
    checkpoint: str = key()
    out: str | None = key(None)
    batch_size: int = key(256, POSITIVE_INT)
    use_ema: bool = key(False)
    data_from_checkpoint: bool = key(True)
    official: OfficialSchema = field(default_factory=OfficialSchema)


GROUP_SCHEMAS = {
    "model": {"base_model": ModelSchema, "base_external_model": ExternalModelSchema},
    "activation": {"base_activation": ActivationSchema},
    "data": {
        "base_folder_data": FolderDataSchema,
        "base_synthetic_data": SyntheticDataSchema,
        "base_segmentation_data": SegmentationDataSchema,
        "base_detection_data": DetectionDataSchema,
    },
    "recipe": {"base_recipe": RecipeSchema},
    "trainer": {"base_trainer": TrainerSchema},
    "task": {
        "base_task": TaskSchema,
        "base_segmentation_task": SegmentationTaskSchema,
        "base_detection_task": DetectionTaskSchema,
    },
}
ROOT_SCHEMAS = {"base_train": TrainSchema, "base_eval": EvalSchema}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (before Hydra composes ``configs/``)."""
    cs = ConfigStore.instance()
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=group, name=name, node=node)
    for name, node in ROOT_SCHEMAS.items():
        cs.store(name=name, node=node)


register()
