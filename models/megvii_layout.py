"""The module layout ShuffleNetV2 and TFNet share in the authors' releases, and timm's protocol on it.

``first_conv`` (stem; its last module is feature index 0), ``maxpool``, ``features`` (one flat Sequential
of blocks; ``stage_ends`` holds the index of each stage's last block, feature indices 1..S),
``conv_last`` (the last 1x1 conv, feature index S + 1), then ``dropout`` and ``classifier.0`` (a Linear
inside a Sequential, the authors' key). A family sets these modules, calls ``init_megvii_head`` and
``init_feature_info``, and gets the forward passes, the head, pruning and parameter groups from here.
"""

# No postponed annotations here: FX copies forward()'s annotations into code that TorchScript compiles.

import torch
from timm.models import checkpoint_seq
from torch import nn

from models.timm_api import DropoutHeadMixin


class MegviiLayoutMixin(DropoutHeadMixin):
    """first_conv - maxpool - features - conv_last - dropout - classifier.0 (see the module docstring)."""

    def init_megvii_head(
        self, num_features: int, num_classes: int, global_pool: str, drop_rate: float, bias: bool
    ) -> None:
        """``dropout`` and ``classifier.0`` (with a bias if ``bias``) after ``conv_last``."""
        self.head_bias = bias
        self.init_dropout_head(num_features, num_classes, global_pool, drop_rate)

    def build_classifier(self, num_classes: int) -> nn.Module:
        """``classifier.0``, the authors' key; empty for 0 classes."""
        if num_classes <= 0:
            return nn.Sequential()
        return nn.Sequential(nn.Linear(self.num_features, num_classes, bias=self.head_bias))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The Linear layer (``classifier.0``), or the empty head when there are no classes."""
        return self.classifier[0] if len(self.classifier) else self.classifier

    def _last_index(self) -> int:
        """Feature index of ``conv_last``."""
        return len(self.stage_ends) + 1

    def _prune_for_features(self, last: int) -> None:
        """Drop the modules no selected feature map depends on (head, later stages)."""
        self.classifier = self.dropout = None
        if last < self._last_index():
            self.conv_last = None
        if last == 0:
            self.features = nn.Sequential()
        elif last < self._last_index():
            self.features = self.features[: self.stage_ends[last - 1] + 1]

    def stage_list(self) -> list[nn.Module]:
        """The modules after the max-pool, one per feature index 1.. (``conv_last`` is the last)."""
        starts = [0] + [e + 1 for e in self.stage_ends[:-1]]
        stages = [self.features[a : e + 1] for a, e in zip(starts, self.stage_ends, strict=True)]
        return [*stages, self.conv_last]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's output (feature index 0), before the max-pool."""
        return self.first_conv(x)

    def drop_stages_after(self, index: int) -> None:
        """Remove the blocks after feature index ``index`` (``conv_last`` below its own index)."""
        if index < self._last_index():
            self.conv_last = nn.Identity()
        if index <= 0:
            self.features = nn.Sequential()
        elif index < self._last_index():
            self.features = self.features[: self.stage_ends[index - 1] + 1]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups: the stem, then one per block (the last 1x1 conv is the last group)."""
        return dict(stem=r"^first_conv", blocks=[(r"^features\.(\d+)", None), (r"^conv_last", (99999,))])

    @torch.jit.unused
    def forward_feature_list(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps selected by ``out_indices`` (our own ``features_only`` output)."""
        wanted, out = set(self.feature_info.out_indices), []
        x = self.first_conv(x)
        if 0 in wanted:
            out.append(x)
        x = self.maxpool(x)
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self.stage_ends and self.stage_ends.index(i) + 1 in wanted:
                out.append(x)
        if self.conv_last is not None:
            x = self.conv_last(x)
            if self._last_index() in wanted:
                out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled output of the last 1x1 conv."""
        x = self.maxpool(self.first_conv(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.features, x)
        else:
            x = self.features(x)
        return self.conv_last(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_feature_list(x)
        return self.forward_head(self.forward_features(x))
