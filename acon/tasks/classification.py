"""Image classification (the paper's ImageNet task): top-1/top-5 error, the suite's default task."""

from __future__ import annotations

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn


class ClassificationTask:
    """Softmax classifier over image folders; best.pt on the lowest top-1 error."""

    name = "classification"
    primary_metric = "top1_err"
    higher_is_better = False
    scalar_metrics = ("top1_err", "top5_err", "loss")
    recipe_keys = None  # every recipe key: mixup, cutmix and label smoothing included

    def __init__(self, cfg: DictConfig | None = None) -> None:
        self.cfg = cfg

    def check_config(self, cfg: DictConfig) -> None:
        """Nothing beyond the shared checks."""

    def identity(self, cfg: DictConfig) -> dict:
        """Nothing beyond model, activation, recipe and classes (checkpoints of earlier versions resume)."""
        return {}

    def build_loaders(self, cfg: DictConfig, info) -> tuple:
        """(train loader, val loader, training-set size) for the configured data pipeline."""
        from acon.data.resolution import attach, budget_data, schedule_of

        schedule_of(cfg.recipe)  # a bad recipe.resolution fails before any folder is listed
        loaders = self._build_loaders(cfg, budget_data(cfg.data, cfg.recipe), info)
        attach(self, cfg, loaders[0])  # recipe.resolution: the train loader follows the epoch's size
        return loaders

    def _build_loaders(self, cfg: DictConfig, data: DictConfig, info) -> tuple:
        """The loaders of ``data`` (the data group, sizes of the recipe applied)."""
        from acon.data import build_datasets, build_eval_loader, build_train_loader
        from acon.data.build import build_pipeline_loaders

        batch, eval_batch, seed = int(cfg.recipe.batch_size), int(cfg.trainer.eval_batch_size), int(cfg.seed)
        if data.get("pipeline", "reference") != "reference":
            return build_pipeline_loaders(
                data,
                batch,
                eval_batch,
                info.rank,
                info.world_size,
                seed,
                info.device,
                channels_last=bool(cfg.trainer.channels_last),
            )
        train_set, val_set = build_datasets(data)
        train = build_train_loader(train_set, data, batch, info.rank, info.world_size, seed)
        val = build_eval_loader(val_set, data, eval_batch, info.rank, info.world_size)
        return train, val, len(train_set)

    def build_val_loader(self, cfg: DictConfig, batch_size: int, info, cache: dict):
        """The validation folder of ``cfg.data`` (datasets cached by their resolved data config)."""
        from acon.data import build_eval_loader, build_val_dataset
        from acon.data.resolution import budget_data

        data = budget_data(cfg.data, cfg.get("recipe"))  # recipe.resolution: its evaluation size
        key = OmegaConf.to_yaml(data, resolve=True)
        if key not in cache:
            cache[key] = build_val_dataset(data)
        return build_eval_loader(cache[key], data, batch_size, info.rank, info.world_size)

    def build_model(self, cfg: DictConfig, load_backbone: bool | None = None) -> nn.Module:
        """The classifier of the ``model`` and ``activation`` groups with ``data.num_classes`` outputs."""
        from acon.builders import build_model

        return build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))

    def build_mixup(self, cfg: DictConfig):
        """timm's Mixup/CutMix over ``data.num_classes`` when the recipe asks for it, else None."""
        from acon.optim import build_mixup

        return build_mixup(cfg.recipe, int(cfg.data.num_classes))

    def build_criterion(self, cfg: DictConfig, mixup) -> nn.Module:
        """Cross-entropy (soft targets under mixup, label smoothing as the recipe says)."""
        from acon.optim import build_criterion

        return build_criterion(cfg.recipe, mixup)

    def flops_input(self, cfg: DictConfig) -> int:
        """The square crop the reported error is measured at: ``data.img_size``, or a budget recipe's
        evaluation crop (``recipe.resolution.eval_res``)."""
        from acon.data.resolution import eval_sizes

        sizes = eval_sizes(cfg.recipe)
        return int(cfg.data.img_size) if sizes is None else sizes[0]

    def loss(self, ctx, inputs, targets) -> torch.Tensor:
        """Mixup (if on), forward under autocast and the recipe's criterion, in fp32."""
        from acon.engine import forward_loss

        return forward_loss(ctx, inputs, targets)

    def evaluate(self, model: nn.Module, loader, cfg: DictConfig, info) -> dict:
        """Top-1/top-5 error and loss over every sample, summed across ranks."""
        from acon.engine import evaluate

        t = cfg.trainer
        metrics = evaluate(model, loader, info.device, t.precision, bool(t.channels_last))
        self.scalar_metrics = tuple(k for k in type(self).scalar_metrics if k in metrics)  # no top-5 of <6
        return metrics

    def sample_input(self, inputs) -> torch.Tensor | None:
        """The first 8 images (None for a batch whose every image was skipped)."""
        return None if inputs is None else inputs[:8]

    def metrics_text(self, metrics: dict) -> str:
        """``top-1 err X% top-5 err Y%`` (the epoch line's words)."""
        top5 = f" top-5 err {metrics['top5_err']:.2f}%" if "top5_err" in metrics else ""
        return f"top-1 err {metrics['top1_err']:.2f}%{top5}"

    def result_fields(self, final: dict, best: dict | None) -> dict:
        """Final and best top-1 error, final top-5 error, the best epoch."""
        best = best or {"top1_err": final["top1_err"], "epoch": final["epoch"]}
        return {
            "top1_err": final["top1_err"],
            **({"top5_err": final["top5_err"]} if "top5_err" in final else {}),
            "best_top1_err": best["top1_err"],
            "best_epoch": best["epoch"],
        }
