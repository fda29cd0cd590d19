"""Object detection: torchvision's RetinaNet / Faster R-CNN with an FPN on our backbones, COCO box AP.

Data: ``data=coco data.root=...`` (instances JSON + images, checked by ``acon.detection.coco``) or the
embedded ``data=det_shapes`` (written on first use, read by the same reader). Metrics: pycocotools'
COCOeval over the predictions of every rank (AP, AP50, AP75, APs, APm, APl, in percent); best.pt keeps
the highest AP.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from acon.errors import ConfigError
from acon.tasks.base import transfer_result_fields

DET_DATA_KINDS = ("coco", "det_shapes")
log = logging.getLogger("acon")


class Detector(nn.Module):
    """A torchvision detector (``net``). Lists of images run it (losses in training, detections in eval);
    an NCHW tensor runs only the normalisation, the backbone and the FPN, as FLOP counts and the
    Meta-ACON β probes do (the heads' cost depends on the number of proposals)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images, targets=None):
        if isinstance(images, torch.Tensor):
            t = self.net.transform
            mean = torch.as_tensor(t.image_mean, dtype=images.dtype, device=images.device)[:, None, None]
            std = torch.as_tensor(t.image_std, dtype=images.dtype, device=images.device)[:, None, None]
            return list(self.net.backbone((images - mean) / std).values())
        return self.net(images, targets)


def default_out_indices(cfg: DictConfig) -> tuple[int, ...]:
    """Feature maps at strides 8-32 (RetinaNet: P3-P5) or 4-32 (Faster R-CNN: P2-P5); ShuffleNetV2's
    stage outputs 1-3 (strides 8, 16, 32; its index 4 repeats stride 32)."""
    if str(cfg.model.get("arch", "")).startswith("shufflenetv2"):
        return (1, 2, 3)
    return (2, 3, 4) if cfg.task.detector == "retinanet" else (1, 2, 3, 4)


def _to_device(images: list, targets: list, device: torch.device) -> tuple[list, list]:
    images = [i.to(device, non_blocking=True) for i in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


def predict(model: nn.Module, images: list) -> list[dict]:
    """Detections for ``images``: one call when they share a size, else one image at a time, so that
    padding to a common size never changes a result (the metrics do not depend on the batch size)."""
    if all(i.shape == images[0].shape for i in images):
        return model(images)
    return [out for i in images for out in model([i])]


class DetectionTask:
    """Detection behind the shared trainer; best.pt on the highest COCO box AP."""

    name = "detection"
    primary_metric = "AP"
    higher_is_better = True
    scalar_metrics = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def check_config(self, cfg: DictConfig) -> None:
        """The data kind, a data.root for COCO, and the backbone checkpoint, before anything is read."""
        from acon.tasks.backbone import check_backbone_config

        if cfg.data.kind not in DET_DATA_KINDS:
            raise ConfigError(
                f"task=detection reads COCO-format data: data={cfg.data.name} (kind {cfg.data.kind}) is not "
                f"one of {DET_DATA_KINDS}; use data=coco data.root=PATH or data=det_shapes"
            )
        if cfg.data.kind == "coco" and not cfg.data.get("root"):
            raise ConfigError("data.root is not set for data=coco: pass data.root=/path/to/coco")
        check_backbone_config(cfg)

    def identity(self, cfg: DictConfig) -> dict:
        """The detector settings and the backbone options."""
        return {
            "task": OmegaConf.to_container(cfg.task, resolve=True),
            "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        }

    def build_loaders(self, cfg: DictConfig, info) -> tuple:
        """(train loader, val loader, training-set size) over the checked COCO splits."""
        from acon.data import build_eval_loader, build_train_loader
        from acon.detection.dataset import build_split, collate_detection

        data = cfg.data
        train_set = build_split(data, str(data.train_split), train=True)
        val_set = build_split(data, str(data.val_split), train=False)
        if info.is_main:
            for split, ds in ((data.train_split, train_set), (data.val_split, val_set)):
                log.info(f"acon: {ds.index.ann_file}: {ds.index.stats.summary()} ({split})")
        batch, seed = int(cfg.recipe.batch_size), int(cfg.seed)
        kw = dict(rank=info.rank, world_size=info.world_size, collate_fn=collate_detection)
        train = build_train_loader(train_set, data, batch, seed=seed, **kw)
        val = build_eval_loader(val_set, data, int(cfg.trainer.eval_batch_size), **kw)
        return train, val, len(train_set)

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict):
        """The validation split of ``cfg.data`` alone (datasets cached by their resolved data config)."""
        from acon.data import build_eval_loader
        from acon.detection.dataset import build_split, collate_detection

        key = "detection:" + OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in cache:
            cache[key] = build_split(cfg.data, str(cfg.data.val_split), train=False)
        return build_eval_loader(
            cache[key], cfg.data, batch_size, info.rank, info.world_size, collate_fn=collate_detection
        )

    def build_model(self, cfg: DictConfig) -> nn.Module:
        """``task.detector`` with an FPN on the backbone of the ``model``/``activation``/``backbone`` groups."""
        from acon.detection.detectors import build_detector
        from acon.tasks.backbone import build_backbone

        t = cfg.task
        body = build_backbone(cfg, default_out_indices(cfg))
        extra = OmegaConf.to_container(t.kwargs, resolve=True) if t.get("kwargs") else {}
        net = build_detector(
            str(t.detector),
            body,
            int(cfg.data.num_classes) + 1,
            min_size=int(cfg.data.img_size),
            max_size=int(cfg.data.max_size),
            fpn_channels=int(t.fpn_channels),
            anchor_scale=t.anchor_scale,
            detections_per_img=int(t.detections_per_img),
            **extra,
        )
        return Detector(net)

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """The detector's summed losses (classification, box regression; RPN for Faster R-CNN), fp32."""
        from acon.engine import autocast

        images, targets = _to_device(inputs, targets, ctx.device)
        with autocast(ctx.device, ctx.precision):
            losses = ctx.model(images, targets)
        return sum(v.float() for v in losses.values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """COCO box metrics of the detections on every validation image, gathered from every rank."""
        from acon.detection.metrics import gathered_box_metrics, to_coco_results
        from acon.distributed import all_reduce_sum
        from acon.engine import autocast

        index = loader.dataset.index
        was_training = model.training
        model.eval()
        results, image_ids, skipped, bad_files = [], [], 0, []
        for images, targets, n_bad in loader:
            images, _ = _to_device(images, [], info.device)
            with autocast(info.device, cfg.trainer.precision):
                outputs = predict(model, images)
            ids = [t["image_id"] for t in targets]
            results += to_coco_results(outputs, ids, index.label_to_category)
            image_ids += ids
            skipped += int(n_bad)
            bad_files.extend(getattr(n_bad, "files", ()))
        model.train(was_training)
        count, skipped = all_reduce_sum([len(image_ids), skipped], info.device)
        if count == 0:
            raise RuntimeError("evaluation saw no images")
        metrics = gathered_box_metrics(self._ground_truth(index), results, image_ids)
        return {
            **metrics,
            "count": int(count),
            "bad_images_skipped": int(skipped),
            "bad_image_files": bad_files,
        }

    @staticmethod
    def _ground_truth(index):
        if getattr(index, "coco_gt", None) is None:
            from acon.detection.metrics import coco_ground_truth

            index.coco_gt = coco_ground_truth(index.data)
        return index.coco_gt

    def sample_input(self, inputs) -> torch.Tensor | None:
        """Up to 4 images of the batch's first size, as an NCHW batch (for the β probes)."""
        first = [i for i in inputs if i.shape == inputs[0].shape][:4]
        return torch.stack(first) if first else None

    def metrics_text(self, metrics: dict) -> str:
        """``AP X% AP50 Y% AP75 Z%`` (the epoch line's words)."""
        return " ".join(f"{k} {metrics[k]:.2f}%" for k in ("AP", "AP50", "AP75"))

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """Final AP, AP50, AP75, APs/m/l, the best AP and its epoch."""
        return transfer_result_fields(self, final, best)
