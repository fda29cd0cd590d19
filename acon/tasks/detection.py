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

from acon.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from acon.errors import ConfigError
from acon.tasks.base import (
    DenseTask,
    check_recipe_keys,
    recipe_keys,
    transfer_result_fields,
    uniform_batch_size,
)

DET_DATA_KINDS = ("coco", "det_shapes")
FEATURE_MAPS = {"retinanet": 3, "fasterrcnn": 4}
"""Backbone maps each detector takes: strides 8-32 (RetinaNet: P3-P5) or 4-32 (Faster R-CNN: P2-P5)."""
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


def image_normalisation(preprocess: str) -> dict:
    """The detector's ``image_mean`` / ``image_std`` for images in [0, 1]: ImageNet's for
    ``rgb_normalized``; for ``bgr_255`` (the authors' released backbones, BGR images from the dataset)
    the 0-255 scale with nothing subtracted."""
    if preprocess == "bgr_255":
        return {"image_mean": [0.0, 0.0, 0.0], "image_std": [1 / 255.0] * 3}
    return {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}


def _to_device(images: list, targets: list, device: torch.device) -> tuple[list, list]:
    images = [i.to(device, non_blocking=True) for i in images]
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    return images, targets


class DetectionTask(DenseTask):
    """Detection behind the shared trainer; best.pt on the highest COCO box AP."""

    name = "detection"
    primary_metric = "AP"
    higher_is_better = True
    scalar_metrics = ("AP", "AP50", "AP75", "APs", "APm", "APl")

    def __init__(self, cfg: DictConfig | None = None) -> None:
        self.eval_batch_size = int(cfg.task.get("eval_batch_size") or 1) if cfg is not None else 1
        self.recipe_keys = recipe_keys()  # no label smoothing, mixup or cutmix in torchvision's detectors

    def check_config(self, cfg: DictConfig) -> None:
        """The data kind, a data.root for COCO, recipe keys the detectors use, and the backbone
        checkpoint, before anything is read."""
        from acon.tasks.backbone import check_backbone_config

        if cfg.data.kind not in DET_DATA_KINDS:
            raise ConfigError(
                f"task=detection reads COCO-format data: data={cfg.data.name} (kind {cfg.data.kind}) is not "
                f"one of {DET_DATA_KINDS}; use data=coco data.root=PATH or data=det_shapes"
            )
        if cfg.data.kind == "coco" and not cfg.data.get("root"):
            raise ConfigError("data.root is not set for data=coco: pass data.root=/path/to/coco")
        check_recipe_keys(cfg, self.name, self.recipe_keys)
        check_backbone_config(cfg)

    def identity(self, cfg: DictConfig) -> dict:
        """The detector settings and the backbone options (its checkpoint by name)."""
        from acon.tasks.backbone import backbone_identity

        task = OmegaConf.to_container(cfg.task, resolve=True)
        task.pop("eval_batch_size", None)  # how validation is batched, not what is trained
        return {"task": task, "backbone": backbone_identity(cfg)}

    def build_loaders(self, cfg: DictConfig, info) -> tuple:
        """(train loader, val loader, training-set size) over the checked COCO splits; training batches
        group images by aspect ratio (``data.aspect_ratio_group_factor``, torchvision's reference)."""
        from acon.data import build_train_loader
        from acon.detection.dataset import build_split, collate_detection, index_of
        from acon.detection.sampler import GroupedTrainSampler, aspect_ratio_groups

        data = cfg.data
        train_set = build_split(data, str(data.train_split), train=True)
        val_set = build_split(data, str(data.val_split), train=False)
        if info.is_main:
            for split, ds in ((data.train_split, train_set), (data.val_split, val_set)):
                log.info(f"acon: {index_of(ds).ann_file}: {index_of(ds).stats.summary()} ({split})")
        batch, seed = int(cfg.recipe.batch_size), int(cfg.seed)
        factor, sampler = int(data.get("aspect_ratio_group_factor", -1)), None
        if factor >= 0:
            groups = aspect_ratio_groups([r.width / r.height for r in index_of(train_set).records], factor)
            sampler = GroupedTrainSampler(groups, batch, info.rank, info.world_size, seed)
        train = build_train_loader(
            train_set, data, batch, info.rank, info.world_size, seed, collate_detection, sampler=sampler
        )
        return train, self._val_loader(val_set, cfg, self.eval_batch_size, info), len(train_set)

    def _val_loader(self, dataset, cfg: DictConfig, batch_size: int, info):
        """Exact-once validation batches of at most ``batch_size`` images, 1 unless all share a size."""
        from acon.data import build_eval_loader
        from acon.detection.dataset import collate_detection, image_sizes

        batch = uniform_batch_size(image_sizes(dataset), batch_size)
        return build_eval_loader(
            dataset, cfg.data, batch, info.rank, info.world_size, collate_fn=collate_detection
        )

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict):
        """The validation split of ``cfg.data`` alone (datasets cached by their resolved data config), at
        most ``task.eval_batch_size`` images a batch."""
        from acon.detection.dataset import build_split

        key = "detection:" + OmegaConf.to_yaml(cfg.data, resolve=True)
        if key not in cache:
            cache[key] = build_split(cfg.data, str(cfg.data.val_split), train=False)
        return self._val_loader(cache[key], cfg, min(int(batch_size), self.eval_batch_size), info)

    def build_model(self, cfg: DictConfig, load_backbone: bool | None = None) -> nn.Module:
        """``task.detector`` with an FPN on the backbone of the ``model``/``activation``/``backbone`` groups,
        normalising images as ``data.preprocess`` says."""
        from acon.detection.detectors import build_detector
        from acon.tasks.backbone import build_backbone, default_out_indices

        t = cfg.task
        out_indices = default_out_indices(cfg, FEATURE_MAPS[str(t.detector)])
        body = build_backbone(cfg, out_indices, load_checkpoint=load_backbone)
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
            **image_normalisation(str(cfg.data.get("preprocess", "rgb_normalized"))),
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
        """COCO box metrics of the detections on every validation image, gathered from every rank (the
        loader's batches hold images of one size: padding never changes a result)."""
        from acon.detection.dataset import index_of
        from acon.detection.metrics import gathered_box_metrics, to_coco_results
        from acon.distributed import all_reduce_sum
        from acon.engine import autocast

        index = index_of(loader)
        was_training = model.training
        model.eval()
        results, image_ids, skipped, bad_files = [], [], 0, []
        for images, targets, n_bad in loader:
            skipped += int(n_bad)
            bad_files.extend(getattr(n_bad, "files", ()))
            if images is None:  # every image of the batch was skipped
                continue
            images, _ = _to_device(images, [], info.device)
            with autocast(info.device, cfg.trainer.precision):
                outputs = model(images)
            ids = [t["image_id"] for t in targets]
            results += to_coco_results(outputs, ids, index.label_to_category)
            image_ids += ids
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
        if not inputs:
            return None
        first = [i for i in inputs if i.shape == inputs[0].shape][:4]
        return torch.stack(first) if first else None

    def metrics_text(self, metrics: dict) -> str:
        """``AP X% AP50 Y% AP75 Z%`` (the epoch line's words)."""
        return " ".join(f"{k} {metrics[k]:.2f}%" for k in ("AP", "AP50", "AP75"))

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """Final AP, AP50, AP75, APs/m/l, the best AP and its epoch."""
        return transfer_result_fields(self, final, best)
