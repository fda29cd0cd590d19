"""Semantic segmentation: FCN / DeepLabV3 on our backbones, VOC and Cityscapes layouts, mIoU and pixel
accuracy over the whole validation set (confusion matrix summed across ranks, ignore label left out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from acon.errors import ConfigError
from acon.tasks.base import (
    DenseTask,
    check_recipe_keys,
    recipe_keys,
    transfer_result_fields,
    uniform_batch_size,
)

SEG_DATA_KINDS = ("voc", "cityscapes", "seg_shapes")


def seg_root(data: DictConfig) -> Path:
    """The dataset root; the embedded shapes set is written on first use."""
    if data.kind == "seg_shapes":
        from acon.data.seg_shapes import prepare_seg_shapes

        return prepare_seg_shapes(
            data.root, int(data.train_samples), int(data.val_samples), int(data.shapes_size)
        )
    if not data.root:
        raise ConfigError(f"data.root is not set for data={data.name}: pass data.root=/path/to/{data.kind}")
    root = Path(str(data.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={data.root!r} does not exist")
    return root


def build_seg_dataset(data: DictConfig, split: str, train: bool, ignore_index: int):
    """The checked dataset of one split (pairs listed, files and sizes checked, transforms attached)."""
    from acon.data.seg_transforms import SegTrainTransform, SegValTransform
    from acon.data.segmentation import (
        SegmentationDataset,
        check_pairs,
        cityscapes_label_map,
        cityscapes_pairs,
        voc_pairs,
    )

    root = seg_root(data)
    if data.kind == "cityscapes":
        pairs = cityscapes_pairs(root, split)
    else:
        pairs = voc_pairs(root, split, voc_mask_dir(data, split))
    pairs, _ = check_pairs(pairs, split, str(data.bad_image_policy), data.get("max_bad_images"))
    label_map = None
    if data.kind == "cityscapes" and not pairs[0][1].endswith("_labelTrainIds.png"):
        label_map = cityscapes_label_map(ignore_index)
    norm = dict(preprocess=str(data.preprocess), mean=tuple(data.mean), std=tuple(data.std))
    if train:
        transform = SegTrainTransform(
            int(data.img_size), tuple(data.scale_range), bool(data.hflip), ignore_index, **norm
        )
    else:
        transform = SegValTransform(data.val_max_size, **norm)
    return SegmentationDataset(
        pairs, transform, int(data.num_classes), ignore_index, label_map, str(data.bad_image_policy)
    )


def voc_mask_dir(data: DictConfig, split: str) -> str:
    """The mask folder of a VOC-layout split: ``data.train_mask_dir`` for the training split (SBD's
    ``SegmentationClassAug`` for ``train_aug``), ``data.val_mask_dir`` for the validation one."""
    if split == str(data.train_split):
        return str(data.get("train_mask_dir") or "SegmentationClass")
    return str(data.get("val_mask_dir") or "SegmentationClass")


def val_batch_size(dataset, requested: int) -> int:
    """``requested`` (``task.eval_batch_size``) when every validation image has one size, else 1."""
    from acon.data.segmentation import image_sizes

    return uniform_batch_size(image_sizes(dataset.pairs), requested)


@dataclass(frozen=True)
class SegSettings:
    """What the loss and the metrics read from the run's config, taken once when the task is built."""

    num_classes: int
    ignore_index: int
    aux_weight: float  # 0 without task.aux_loss
    label_smoothing: float
    eval_batch_size: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> SegSettings:
        """The settings of a run config (``task``, ``data`` and ``recipe`` groups)."""
        t = cfg.task
        return cls(
            num_classes=int(cfg.data.num_classes),
            ignore_index=int(t.ignore_index),
            aux_weight=float(t.aux_weight) if t.aux_loss else 0.0,
            label_smoothing=float(cfg.recipe.get("label_smoothing", 0.0)),
            eval_batch_size=int(t.get("eval_batch_size") or 1),
        )


def all_reduce_tensors(*tensors: torch.Tensor) -> None:
    """Sum tensors across ranks in place, in their own dtype (int64 counts stay exact)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


class SegmentationTask(DenseTask):
    """Per-pixel classification; best.pt on the highest mIoU."""

    name = "segmentation"
    primary_metric = "mIoU"
    higher_is_better = True
    scalar_metrics = ("mIoU", "pixel_acc", "loss")

    def __init__(self, cfg: DictConfig | None = None) -> None:
        self._settings = SegSettings.from_cfg(cfg) if cfg is not None else None
        self.recipe_keys = recipe_keys("label_smoothing")  # mixup/cutmix would mix whole-image labels

    @property
    def settings(self) -> SegSettings:
        """The run's settings (the task must have been built from a config: ``task_of(cfg)``)."""
        if self._settings is None:
            raise RuntimeError("SegmentationTask was built without a config: use acon.tasks.task_of(cfg)")
        return self._settings

    def check_config(self, cfg: DictConfig) -> None:
        """Segmentation data, no mixup/cutmix, an ignore label outside the classes, existing paths."""
        from acon.tasks.backbone import check_backbone_config

        if cfg.data.kind not in SEG_DATA_KINDS:
            raise ConfigError(
                f"task=segmentation needs segmentation data (data=voc|cityscapes|seg_shapes), not "
                f"data={cfg.data.name} (kind {cfg.data.kind})"
            )
        if cfg.data.get("pipeline", "reference") != "reference":
            raise ConfigError(
                f"data.pipeline={cfg.data.pipeline!r}: task=segmentation reads data.pipeline=reference"
            )
        check_recipe_keys(cfg, self.name, self.recipe_keys)
        if 0 <= int(cfg.task.ignore_index) < int(cfg.data.num_classes):
            raise ConfigError(
                f"task.ignore_index={cfg.task.ignore_index} is a class (data.num_classes={cfg.data.num_classes})"
            )
        check_backbone_config(cfg)
        if cfg.data.kind != "seg_shapes":
            seg_root(cfg.data)

    def identity(self, cfg: DictConfig) -> dict:
        """The head and backbone settings (the backbone checkpoint by name): a resumed run must share them."""
        from acon.tasks.backbone import backbone_identity

        task = OmegaConf.to_container(cfg.task, resolve=True)
        task.pop("eval_batch_size", None)  # how validation is batched, not what is trained
        return {"task": task, "backbone": backbone_identity(cfg)}

    def build_loaders(self, cfg: DictConfig, info) -> tuple:
        """Resumable train loader of random crops; exact-once val loader of whole images (padded)."""
        from acon.data import build_eval_loader, build_train_loader
        from acon.data.segmentation import PadCollate

        data, ig = cfg.data, self.settings.ignore_index
        train_set = build_seg_dataset(data, str(data.train_split), True, ig)
        val_set = build_seg_dataset(data, str(data.val_split), False, ig)
        batch, seed, collate = int(cfg.recipe.batch_size), int(cfg.seed), PadCollate(ig)
        train = build_train_loader(
            train_set, data, batch, info.rank, info.world_size, seed, collate_fn=collate
        )
        eval_batch = val_batch_size(val_set, self.settings.eval_batch_size)
        val = build_eval_loader(val_set, data, eval_batch, info.rank, info.world_size, collate_fn=collate)
        return train, val, len(train_set)

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict):
        """The validation split of ``cfg.data`` alone, at most ``task.eval_batch_size`` whole images a batch."""
        from acon.data import build_eval_loader
        from acon.data.segmentation import PadCollate

        ig = self.settings.ignore_index
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in cache:
            cache[key] = build_seg_dataset(cfg.data, str(cfg.data.val_split), False, ig)
        requested = min(int(batch_size), self.settings.eval_batch_size)
        collate, batch = PadCollate(ig), val_batch_size(cache[key], requested)
        return build_eval_loader(cache[key], cfg.data, batch, info.rank, info.world_size, collate_fn=collate)

    def build_model(self, cfg: DictConfig, load_backbone: bool | None = None) -> nn.Module:
        """``task.head`` on the backbone (see ``acon.tasks.seg_model``)."""
        from acon.tasks.seg_model import build_segmentation_model

        return build_segmentation_model(cfg, load_backbone)

    def _pixel_loss(self, logits: torch.Tensor, masks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        from acon.tasks.segmentation_deterministic import pixel_cross_entropy

        st = self.settings
        return pixel_cross_entropy(logits.float(), masks, st.ignore_index, reduction, st.label_smoothing)

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """Per-pixel cross-entropy on the main head (plus ``task.aux_weight`` × the auxiliary one)."""
        from acon.engine import autocast, to_device

        images, masks = to_device(inputs, ctx), targets.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, ctx.precision):
            out = ctx.model(images)
        loss = self._pixel_loss(out["out"], masks)
        if self.settings.aux_weight and "aux" in out:
            loss = loss + self.settings.aux_weight * self._pixel_loss(out["aux"], masks)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """mIoU, pixel accuracy and mean pixel loss over every image on every rank (the confusion matrix
        summed across ranks as int64); batches whose every image was skipped count only as skipped."""
        from acon.engine import StepContext, autocast, to_device
        from acon.tasks.seg_metrics import confusion_matrix, segmentation_scores

        st, t = self.settings, cfg.trainer
        k = st.num_classes
        ctx = StepContext(model, None, None, None, None, info.device, t.precision, bool(t.channels_last))
        was_training = model.training
        model.eval()
        conf = torch.zeros(k, k, dtype=torch.int64, device=info.device)
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, pixels, images, skipped
        bad_files: list[str] = []
        for images, masks, n_bad in loader:
            sums[3] += int(n_bad)
            bad_files.extend(getattr(n_bad, "files", ()))
            if images is None:
                continue
            images, masks = to_device(images, ctx), masks.to(info.device)
            with autocast(info.device, t.precision):
                logits = model(images)["out"].float()
            sums[0] += self._pixel_loss(logits, masks, "sum")
            sums[1] += (masks != st.ignore_index).sum()
            sums[2] += masks.shape[0]
            conf += confusion_matrix(logits.argmax(1), masks, k, st.ignore_index)
        model.train(was_training)
        all_reduce_tensors(conf, sums)
        loss_sum, pixels, count, skipped = sums.tolist()
        if count == 0:
            raise RuntimeError("evaluation saw no samples")
        from acon.data.seg_classes import class_names

        return {
            **segmentation_scores(conf.cpu(), class_names(str(cfg.data.kind), k)),
            "loss": loss_sum / max(pixels, 1.0),
            "count": int(count),
            "bad_images_skipped": int(skipped),
            "bad_image_files": bad_files,
        }

    def sample_input(self, inputs) -> torch.Tensor | None:
        """The first 8 crops (None for a batch whose every image was skipped)."""
        return None if inputs is None else inputs[:8]

    def metrics_text(self, metrics: dict) -> str:
        """``mIoU X% pixel acc Y%``."""
        return f"mIoU {metrics['mIoU']:.2f}% pixel acc {metrics['pixel_acc']:.2f}%"

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """Final mIoU, pixel accuracy and per-class IoU, the best mIoU and its epoch."""
        return transfer_result_fields(self, final, best, extra=("iou_per_class", "iou_by_class"))
