"""Semantic segmentation: FCN / DeepLabV3 on our backbones, VOC and Cityscapes layouts, mIoU and pixel
accuracy over the whole validation set (confusion matrix summed across ranks, ignore label left out)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from acon.errors import ConfigError
from acon.tasks.base import transfer_result_fields

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
    pairs = cityscapes_pairs(root, split) if data.kind == "cityscapes" else voc_pairs(root, split)
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


def val_batch_size(dataset, requested: int) -> int:
    """``requested`` when every validation image has one size, else 1: whole images of several sizes are
    not padded together, so the metrics never depend on the batch size or the batch's neighbours."""
    from acon.data.segmentation import image_sizes

    return requested if len(image_sizes(dataset.pairs)) == 1 else 1


class SegmentationTask:
    """Per-pixel classification; best.pt on the highest mIoU."""

    name = "segmentation"
    primary_metric = "mIoU"
    higher_is_better = True
    scalar_metrics = ("mIoU", "pixel_acc", "loss")

    def __init__(self) -> None:
        self.ignore_index, self.aux_weight, self.label_smoothing = 255, 0.0, 0.0

    def setup(self, cfg: DictConfig) -> None:
        """Keep what the loss needs from the run's config."""
        self.ignore_index = int(cfg.task.ignore_index)
        self.aux_weight = float(cfg.task.aux_weight) if cfg.task.aux_loss else 0.0
        self.label_smoothing = float(cfg.recipe.get("label_smoothing", 0.0))

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
        for key in ("mixup", "cutmix"):
            if float(cfg.recipe.get(key) or 0.0) > 0:
                raise ConfigError(f"recipe.{key}={cfg.recipe[key]} mixes labels; task=segmentation needs 0")
        if 0 <= int(cfg.task.ignore_index) < int(cfg.data.num_classes):
            raise ConfigError(
                f"task.ignore_index={cfg.task.ignore_index} is a class (data.num_classes={cfg.data.num_classes})"
            )
        check_backbone_config(cfg)
        if cfg.data.kind != "seg_shapes":
            seg_root(cfg.data)

    def identity(self, cfg: DictConfig) -> dict:
        """The head and backbone settings: a resumed run must share them."""
        return {
            "task": OmegaConf.to_container(cfg.task, resolve=True),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        }

    def build_loaders(self, cfg: DictConfig, info) -> tuple:
        """Resumable train loader of random crops; exact-once val loader of whole images (padded)."""
        from acon.data import build_eval_loader, build_train_loader
        from acon.data.segmentation import PadCollate

        self.setup(cfg)
        data, ig = cfg.data, self.ignore_index
        train_set = build_seg_dataset(data, str(data.train_split), True, ig)
        val_set = build_seg_dataset(data, str(data.val_split), False, ig)
        batch, seed, collate = int(cfg.recipe.batch_size), int(cfg.seed), PadCollate(ig)
        train = build_train_loader(
            train_set, data, batch, info.rank, info.world_size, seed, collate_fn=collate
        )
        eval_batch = val_batch_size(val_set, int(cfg.trainer.eval_batch_size))
        val = build_eval_loader(val_set, data, eval_batch, info.rank, info.world_size, collate_fn=collate)
        return train, val, len(train_set)

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict):
        """The validation split of ``cfg.data`` alone."""
        from acon.data import build_eval_loader
        from acon.data.segmentation import PadCollate

        self.setup(cfg)
        key = OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in cache:
            cache[key] = build_seg_dataset(cfg.data, str(cfg.data.val_split), False, self.ignore_index)
        collate, batch = PadCollate(self.ignore_index), val_batch_size(cache[key], batch_size)
        return build_eval_loader(cache[key], cfg.data, batch, info.rank, info.world_size, collate_fn=collate)

    def build_model(self, cfg: DictConfig) -> nn.Module:
        """``task.head`` on the backbone (see ``acon.tasks.seg_model``)."""
        from acon.tasks.seg_model import build_segmentation_model

        self.setup(cfg)
        return build_segmentation_model(cfg)

    def _pixel_loss(self, logits: torch.Tensor, masks: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(
            logits.float(),
            masks,
            ignore_index=self.ignore_index,
            reduction=reduction,
            label_smoothing=self.label_smoothing,
        )

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """Per-pixel cross-entropy on the main head (plus ``task.aux_weight`` × the auxiliary one)."""
        from acon.engine import autocast, to_device

        images, masks = to_device(inputs, ctx), targets.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, ctx.precision):
            out = ctx.model(images)
        loss = self._pixel_loss(out["out"], masks)
        if self.aux_weight and "aux" in out:
            loss = loss + self.aux_weight * self._pixel_loss(out["aux"], masks)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """mIoU, pixel accuracy and mean pixel loss over every image on every rank."""
        from acon.distributed import all_reduce_sum
        from acon.engine import StepContext, autocast, to_device
        from acon.tasks.seg_metrics import confusion_matrix, segmentation_scores

        self.setup(cfg)
        t, k = cfg.trainer, int(cfg.data.num_classes)
        ctx = StepContext(model, None, None, None, None, info.device, t.precision, bool(t.channels_last))
        was_training = model.training
        model.eval()
        conf = torch.zeros(k, k, dtype=torch.int64)
        loss_sum = pixels = count = skipped = 0.0
        bad_files: list[str] = []
        for images, masks, n_bad in loader:
            images, masks = to_device(images, ctx), masks.to(info.device)
            with autocast(info.device, t.precision):
                logits = model(images)["out"].float()
            loss_sum += self._pixel_loss(logits, masks, "sum").item()
            pixels += (masks != self.ignore_index).sum().item()
            conf += confusion_matrix(logits.argmax(1), masks, k, self.ignore_index).cpu()
            count += masks.shape[0]
            skipped += n_bad
            bad_files.extend(getattr(n_bad, "files", ()))
        model.train(was_training)
        totals = all_reduce_sum([loss_sum, pixels, count, skipped, *conf.flatten().tolist()], info.device)
        loss_sum, pixels, count, skipped = totals[:4]
        if count == 0:
            raise RuntimeError("evaluation saw no samples")
        conf = torch.tensor(totals[4:], dtype=torch.float64).round().long().reshape(k, k)
        from acon.data.seg_classes import class_names

        return {
            **segmentation_scores(conf, class_names(str(cfg.data.kind), k)),
            "loss": loss_sum / max(pixels, 1.0),
            "count": int(count),
            "bad_images_skipped": int(skipped),
            "bad_image_files": bad_files,
        }

    def sample_input(self, inputs) -> torch.Tensor | None:
        """The first 8 crops."""
        return inputs[:8]

    def metrics_text(self, metrics: dict) -> str:
        """``mIoU X% pixel acc Y%``."""
        return f"mIoU {metrics['mIoU']:.2f}% pixel acc {metrics['pixel_acc']:.2f}%"

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """Final mIoU, pixel accuracy and per-class IoU, the best mIoU and its epoch."""
        return transfer_result_fields(self, final, best, extra=("iou_per_class", "iou_by_class"))
