"""Config → model: the single place where the ``model`` and ``activation`` groups meet."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


def build_model(model_cfg: DictConfig, activation_cfg: DictConfig, num_classes: int) -> nn.Module:
    """``models.create_model`` with the activation partial instantiated from its config."""
    import models

    kwargs = OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.get("kwargs") else {}
    return models.create_model(
        model_cfg.arch,
        activation=instantiate(activation_cfg.layer),
        num_classes=num_classes,
        small_input=bool(model_cfg.small_input),
        **kwargs,
    )


def run_identity(cfg: DictConfig) -> dict:
    """What a resumed run must share with its checkpoint: model, activation (impl aside) and recipe.

    A run that extends or fine-tunes a checkpoint (``resume_mode``) records that too.
    """
    act = OmegaConf.to_container(cfg.activation, resolve=True)
    act.get("layer", {}).pop("impl", None)
    identity = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "activation": act,
        "recipe": OmegaConf.to_container(cfg.recipe, resolve=True),
        "num_classes": int(cfg.data.num_classes),
    }
    if cfg.get("resume_mode", "strict") != "strict":
        identity["resume_mode"] = str(cfg.resume_mode)
    return identity
