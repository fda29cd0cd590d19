"""Config → model: the single place where the ``model`` and ``activation`` groups meet."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

EXTERNAL_ARCHS = ("timm", "torchvision")


def model_archs() -> list[str]:
    """Every valid ``model.arch``: the registered families and the external libraries."""
    import models

    return [*models.list_models(), *EXTERNAL_ARCHS]


"""``model.arch`` values that build another library's classifier and convert its activations."""
NATIVE_ACTIVATION = "relu"
"""``activation=relu`` on an external model keeps the model's own activations (the baseline column)."""


def _kwargs(model_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.get("kwargs") else {}


def external_model_name(model_cfg: DictConfig) -> str:
    """The timm or torchvision model name of an external ``model`` config."""
    return str(model_cfg.timm_name if model_cfg.arch == "timm" else model_cfg.tv_name)


def build_external_model(model_cfg: DictConfig, activation_cfg: DictConfig, num_classes: int) -> nn.Module:
    """A timm or torchvision classifier with its activations converted by ``acon.convert_activations``.

    The example input is (2, in_chans, S, S) with S = ``model.example_size`` (the data's image size);
    ``model.targets`` and ``model.init`` are passed through, ``model.kwargs`` go to the constructor."""
    from acon.convert import convert_activations

    name, kwargs = external_model_name(model_cfg), _kwargs(model_cfg)
    if model_cfg.arch == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if activation_cfg.name == NATIVE_ACTIVATION:
        import logging

        logging.getLogger("acon.convert").info(
            "acon: activation=%s keeps %s's own activations (nothing converted)", NATIVE_ACTIVATION, name
        )
        return model
    size = int(model_cfg.example_size)
    example = torch.randn(2, int(kwargs.get("in_chans", 3)), size, size)
    targets = OmegaConf.to_container(model_cfg.targets) if model_cfg.get("targets") else None
    return convert_activations(
        model, instantiate(activation_cfg.layer), example_input=example, targets=targets, init=model_cfg.init
    )


def build_model(model_cfg: DictConfig, activation_cfg: DictConfig, num_classes: int) -> nn.Module:
    """``models.create_model`` with the activation partial instantiated from its config; an external
    (``model=timm`` / ``model=torchvision``) classifier converted by ``build_external_model``."""
    import models

    if model_cfg.arch in EXTERNAL_ARCHS:
        return build_external_model(model_cfg, activation_cfg, num_classes)
    return models.create_model(
        model_cfg.arch,
        activation=instantiate(activation_cfg.layer),
        num_classes=num_classes,
        small_input=bool(model_cfg.small_input),
        **_kwargs(model_cfg),
    )


def run_identity(cfg: DictConfig) -> dict:
    """What a resumed run must share with its checkpoint: model, activation (impl aside), recipe and
    what the task adds (``Task.identity``).

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
    from acon.tasks import task_of

    identity.update(task_of(cfg).identity(cfg))  # what a task adds (head, backbone); none for classification
    if cfg.get("resume_mode", "strict") != "strict":
        identity["resume_mode"] = str(cfg.resume_mode)
    return identity
