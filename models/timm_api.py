"""timm's model protocol for our families: head, pooling, grad checkpointing and intermediate features.

A family subclasses ``TimmModelMixin`` and provides ``stem`` (the first feature map), ``maxpool`` (if it
has one), the modules after it (``stage_list``), ``drop_stages_after``, the classifier attribute named by
``classifier_name`` (and ``build_classifier`` if it is not a plain Linear), and its own scriptable
``forward_features`` / ``forward_head`` / ``group_matcher``. Feature index 0 is the stem, then one index per stage (timm's
``feature_info`` order). ``DropoutHeadMixin`` adds ``forward_head`` for the families whose dropout is a
module (ShuffleNetV2, TFNet, MobileNet); ``models.megvii_layout`` the rest of ShuffleNetV2's and TFNet's
shared layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

from models.features import FeatureInfo, FeatureSpec

POOL_TYPES = ("avg", "max", "avgmax", "")


class GlobalPool(SelectAdaptivePool2d):
    """timm's global pooling to 1x1 as reductions over H and W (``mean``/``amax``), whose CUDA backward is
    deterministic, where ``nn.AdaptiveAvgPool2d``/``AdaptiveMaxPool2d`` have none (torch raises under
    ``use_deterministic_algorithms``). No parameters, so no change to state dicts, parameters or FLOPs."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__(pool_type=f"fast{pool_type}" if pool_type else "", flatten=flatten)
        self.pool_type = pool_type  # timm's name for it (``is_identity``, ``repr``)


def make_global_pool(pool_type: str) -> GlobalPool:
    """timm's global pooling, flattened to (N, C); ``''`` keeps the (N, C, H, W) map."""
    if pool_type not in POOL_TYPES:
        raise ValueError(f"global_pool={pool_type!r} is not one of {POOL_TYPES}")
    return GlobalPool(pool_type, flatten=bool(pool_type))


class TimmModelMixin:
    """The methods timm's tools expect, shared by every family (see the module docstring)."""

    classifier_name = "fc"

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Pooling, dropout and classifier of width ``num_features`` -> ``num_classes``."""
        self.num_features = self.head_hidden_size = num_features
        self.num_classes, self.drop_rate, self.grad_checkpointing = num_classes, drop_rate, False
        self.global_pool = make_global_pool(global_pool)
        setattr(self, self.classifier_name, self.build_classifier(num_classes))

    def init_feature_info(
        self, specs: Sequence[FeatureSpec], features_only: bool, out_indices: Sequence[int]
    ) -> None:
        """``feature_info`` from the tap points: timm's list of dicts, or the selected taps (pruned) for
        our own ``features_only`` model, which the family prunes in ``_prune_for_features``."""
        self.feature_specs = tuple(specs)
        self.features_only = features_only
        if features_only:
            self.feature_info = FeatureInfo(self.feature_specs, out_indices)
            self._prune_for_features(max(self.feature_info.out_indices))
        else:
            self.feature_info = [dict(vars(spec)) for spec in self.feature_specs]

    def build_classifier(self, num_classes: int) -> nn.Module:
        """The classifier module (identity for ``num_classes=0``)."""
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier module, as timm names it."""
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0 removes it); ``global_pool`` ('' for none) if given."""
        ref = next(self.parameters())
        if global_pool is not None:
            self.global_pool = make_global_pool(global_pool)
        self.num_classes = num_classes
        head = self.build_classifier(num_classes).to(device=ref.device, dtype=ref.dtype)
        setattr(self, self.classifier_name, head.train(self.training))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the stages' activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One stage, checkpointed block by block when grad checkpointing is on."""
        if self.grad_checkpointing and not torch.jit.is_scripting() and isinstance(stage, nn.Sequential):
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Final features and the feature maps at ``indices`` (0 stem, 1-4 stages), timm's convention."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: only 'NCHW' is supported")
        stages = self.stage_list()
        take_indices, max_index = feature_take_indices(len(stages) + 1, indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        if getattr(self, "maxpool", None) is not None:
            x = self.maxpool(x)
        for i, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = self.run_stage(stage, x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stage_list()) + 1, indices)
        self.drop_stages_after(max_index)
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


class DropoutHeadMixin(TimmModelMixin):
    """Global pool, the ``dropout`` module and ``classifier``: the head of ShuffleNetV2, TFNet, MobileNet."""

    classifier_name = "classifier"

    def init_dropout_head(
        self, num_features: int, num_classes: int, global_pool: str, drop_rate: float
    ) -> None:
        """``dropout`` (``nn.Dropout(drop_rate)``), then pooling and classifier as in ``init_head``."""
        self.dropout = nn.Dropout(drop_rate)
        self.init_head(num_features, num_classes, global_pool, 0.0)
        self.drop_rate = drop_rate

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and classifier."""
        x = self.dropout(self.global_pool(x))
        return x if pre_logits else self.classifier(x)
