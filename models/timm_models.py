"""Registration of the zoo in timm's registry as ``acon_<name>`` (timm's own models stay untouched).

``timm.create_model("acon_resnet50", activation="acon_c")`` builds ``models.create_model("resnet50",
activation="acon_c")``; every keyword of ``models.create_model`` is accepted.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models import register_model
from torch import nn

from models.registry import create_model, list_models

PREFIX = "acon_"


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(
        pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs
    ) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{PREFIX}{name}: no hosted weights; convert the authors' checkpoint with "
                "scripts/convert_official_checkpoint.py and load it"
            )
        return create_model(name, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = PREFIX + name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name} from the acon-suite model zoo (see models.create_model)."
    return entrypoint


TIMM_NAMES: list[str] = [register_model(_entrypoint(n)).__name__ for n in list_models()]
