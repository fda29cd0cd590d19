"""Model zoo: ShuffleNetV2 and ResNet with an injected activation, as in the ACON paper's tables."""

from models.complexity import activation_sites, count_flops, count_params
from models.detection import build_fpn_backbone
from models.features import FeatureInfo, FPNBackbone
from models.official import convert_official_state_dict, load_official_checkpoint
from models.registry import MODELS, create_model, get_entry, list_models, model_activation

__all__ = [
    "MODELS",
    "FPNBackbone",
    "FeatureInfo",
    "activation_sites",
    "build_fpn_backbone",
    "convert_official_state_dict",
    "count_flops",
    "count_params",
    "create_model",
    "get_entry",
    "list_models",
    "load_official_checkpoint",
    "model_activation",
]
