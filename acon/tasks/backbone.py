"""Feature backbones for transfer tasks: the ``model`` + ``activation`` groups with ``features_only``.

``build_backbone(cfg, default_out_indices)`` returns a module whose forward gives a list of feature maps
and whose ``feature_info.channels()`` / ``.reduction()`` describe them (timm's convention): our
registered families (ShuffleNetV2, ResNet, ...), or ``model=timm`` models that have ``features_only``.
Then, as the ``backbone`` group asks: ``backbone.checkpoint`` (our best.pt/last.pt, or an authors' file,
converted) with its missing and unexpected keys listed, read only when no full checkpoint follows (eval.py,
a resume); ``backbone.freeze_at`` (the stem and the first ``freeze_at - 1`` stages stop training, their
BatchNorms frozen: Detectron2's ``FREEZE_AT``, torchvision's ``trainable_backbone_layers``);
``backbone.freeze_bn`` (every BatchNorm, Meta-ACON's β-network ones included, becomes torchvision's
``FrozenBatchNorm2d``); ``backbone.freeze_acon``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from acon.errors import ConfigError

log = logging.getLogger("acon")


def _kwargs(model_cfg: DictConfig) -> dict:
    return OmegaConf.to_container(model_cfg.kwargs, resolve=True) if model_cfg.get("kwargs") else {}


def feature_strides(cfg: DictConfig) -> list[int]:
    """The stride of every feature map the ``model`` group's network offers (built on the meta device)."""
    from acon.builders import EXTERNAL_ARCHS

    with torch.device("meta"):
        if cfg.model.arch in EXTERNAL_ARCHS:
            import timm

            probe = timm.create_model(str(cfg.model.timm_name), pretrained=False, features_only=True)
            return [int(r) for r in probe.feature_info.reduction()]
        import models

        probe = models.create_model(cfg.model.arch, small_input=bool(cfg.model.small_input))
    return [int(spec["reduction"]) for spec in probe.feature_info]


def default_out_indices(cfg: DictConfig, count: int) -> tuple[int, ...]:
    """The feature maps of the ``count`` deepest distinct strides after the stem (index 0), each the first
    map at its stride: ResNet (strides 2-32) gives (1, 2, 3, 4) for 4 and (3, 4) for 2; ShuffleNetV2
    (2, 8, 16, 32, 32: its 1x1 ``conv_last`` repeats stride 32) gives (1, 2, 3) for 4 or 3, (2, 3) for 2."""
    try:
        strides = feature_strides(cfg)
    except (RuntimeError, ValueError, TypeError, AttributeError):
        return tuple(range(-count, 0))
    first: dict[int, int] = {}
    for i, stride in enumerate(strides[1:], start=1):
        first.setdefault(stride, i)
    return tuple(sorted(first.values())[-count:])


def out_indices_of(cfg: DictConfig, default: Sequence[int]) -> tuple[int, ...]:
    """``backbone.out_indices`` when set, else the task's ``default``."""
    chosen = OmegaConf.select(cfg, "backbone.out_indices", default=None)
    return tuple(int(i) for i in (chosen if chosen is not None else default))


def build_feature_body(
    cfg: DictConfig, out_indices: Sequence[int], output_stride: int | None = None
) -> nn.Module:
    """The ``features_only`` network of the ``model`` and ``activation`` groups, randomly initialised, its
    deepest map at ``output_stride`` (None: native; ResNets by dilation, timm models by their own option)."""
    from acon.builders import EXTERNAL_ARCHS, NATIVE_ACTIVATION

    model_cfg, act_cfg = cfg.model, cfg.activation
    if model_cfg.arch not in EXTERNAL_ARCHS:
        import models

        body = models.create_model(
            model_cfg.arch,
            activation=instantiate(act_cfg.layer),
            small_input=bool(model_cfg.small_input),
            features_only=True,
            out_indices=tuple(out_indices),
            **_kwargs(model_cfg),
        )
        apply_output_stride(body, output_stride)
        return body
    if model_cfg.arch != "timm":
        raise ConfigError(
            f"model=torchvision ({model_cfg.tv_name}) has no features_only; as a transfer backbone use "
            f"model=timm model.timm_name=<name> (timm's features_only models) or one of ours"
        )
    import timm

    kwargs = {**_kwargs(model_cfg), **({"output_stride": output_stride} if output_stride else {})}
    try:
        body = timm.create_model(
            str(model_cfg.timm_name),
            pretrained=False,
            features_only=True,
            out_indices=tuple(out_indices),
            **kwargs,
        )
    except (RuntimeError, ValueError, IndexError, AssertionError) as e:
        raise ConfigError(f"model.timm_name={model_cfg.timm_name!r} has no features_only form: {e}") from None
    if act_cfg.name == NATIVE_ACTIVATION:
        return body
    from acon.convert import convert_activations

    size = int(model_cfg.example_size)
    example = torch.randn(2, int(kwargs.get("in_chans", 3)), size, size)
    targets = OmegaConf.to_container(model_cfg.targets) if model_cfg.get("targets") else None
    converted = convert_activations(
        body, instantiate(act_cfg.layer), example_input=example, targets=targets, init=model_cfg.init
    )
    converted.feature_info = body.feature_info
    return converted


def checkpoint_weights(path: Path, cfg: DictConfig) -> dict[str, torch.Tensor]:
    """The classifier weights in ``path``: ours (``model``), a converted authors' file (``state_dict`` in our
    keys) or an authors' released file (converted here for ``model.arch`` and the activation)."""
    from acon import checkpoint as ckpt

    state = ckpt.load_checkpoint(path, map_location="cpu")
    if state.get("format") == ckpt.FORMAT:
        weights = state["model"]
        warn_stem_mismatch(state, path, cfg)
    elif isinstance(state.get("model"), str) and isinstance(state.get("state_dict"), dict):
        weights = state["state_dict"]  # written by scripts/convert_official_checkpoint.py
    else:
        import models

        try:
            weights = models.convert_official_state_dict(
                state, str(cfg.model.arch), str(cfg.activation.name), **_kwargs(cfg.model)
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(f"backbone.checkpoint={str(path)!r}: {e}") from None
    return {k.removeprefix("module."): v for k, v in weights.items()}


def warn_stem_mismatch(state: dict, path: Path, cfg: DictConfig) -> None:
    """Warn when our checkpoint's stem (``model.small_input``) differs from this backbone's: the tensors
    have the same shapes, so they load, but the filters were learnt at another stride."""
    theirs = (state.get("config") or {}).get("model") or {}
    if "small_input" not in theirs or bool(theirs["small_input"]) == bool(cfg.model.small_input):
        return
    stem = {True: "the small-input stem (stride 1, no max-pool)", False: "the normal stem (stride 4)"}
    log.warning(
        f"acon: warning: backbone.checkpoint {path} was trained with {stem[bool(theirs['small_input'])]} "
        f"(model {theirs.get('name', '?')}) but this backbone has {stem[bool(cfg.model.small_input)]} "
        f"(model {cfg.model.name}): its weights load but were learnt at another scale; "
        f"pass model={theirs.get('name', '?')} to keep the checkpoint's stem"
    )


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file (the record of which backbone a run started from)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone_checkpoint(body: nn.Module, path: str | Path, cfg: DictConfig) -> tuple[list, list]:
    """Load the matching weights of ``path`` into ``body``; log and return (missing, unexpected) keys.

    A classifier's head and the stages a ``features_only`` body pruned are expected among the unexpected
    keys; a tensor of another shape is an error naming the keys.
    """
    from acon import checkpoint as ckpt

    path = Path(path).expanduser()
    weights = checkpoint_weights(path, cfg)
    own = body.state_dict()
    shapes = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(weights))
        if weights[k].shape != own[k].shape
    ]
    if shapes:
        raise ckpt.CheckpointError(
            f"backbone.checkpoint={str(path)!r}: shapes differ: {'; '.join(shapes[:10])}"
        )
    body.load_state_dict(weights, strict=False)
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    loaded = len(own) - len(missing)
    log.info(
        f"acon: backbone.checkpoint {path} (sha256 {file_sha256(path)}): {loaded} of {len(own)} tensors loaded"
    )
    log.info(f"acon: backbone.checkpoint missing keys ({len(missing)}): {', '.join(missing) or '-'}")
    log.info(f"acon: backbone.checkpoint unexpected keys ({len(unexpected)}): {', '.join(unexpected) or '-'}")
    return missing, unexpected


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d below ``module`` (Meta-ACON's β-network BNs, SyncBatchNorm included) by a
    ``FrozenBatchNorm2d`` with its statistics and affine parameters; returns how many were replaced."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    count = 0
    for name, child in list(module.named_children()):
        if (
            isinstance(child, nn.BatchNorm2d | nn.SyncBatchNorm)
            and child.affine
            and child.track_running_stats
        ):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen.to(child.weight.device))
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def freeze_activations(module: nn.Module) -> int:
    """Stop training every ACON parameter (p1, p2, β, ACON-B's p; Meta-ACON's whole β network);
    returns the number of tensors frozen."""
    from models.complexity import LEARNABLE_ACTIVATIONS

    count = 0
    for m in module.modules():
        if isinstance(m, LEARNABLE_ACTIVATIONS):
            for p in m.parameters():
                count += int(p.requires_grad)
                p.requires_grad_(False)
    return count


def _dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Turn a stride-2 residual stage into a stride-1 one whose 3x3 convs are dilated (torchvision's
    ``replace_stride_with_dilation``): the first block keeps the previous dilation, the others ``dilation``."""
    previous = dilation // 2
    for i, block in enumerate(stage):
        for conv in block.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            if conv.stride == (2, 2):
                conv.stride = (1, 1)
            if conv.kernel_size == (3, 3):
                d = previous if i == 0 else dilation
                conv.dilation, conv.padding = (d, d), (d, d)


def apply_output_stride(body: nn.Module, output_stride: int | None) -> None:
    """Dilate a ResNet body's last stages so its deepest map has stride ``output_stride`` (8 or 16; None or
    the native 32: nothing). Other families keep their native strides; asking them for another is an error."""
    from models.features import FeatureInfo, FeatureSpec

    specs = getattr(body, "feature_specs", None)
    native = specs[-1].reduction if specs else None
    if output_stride is None or output_stride == native:
        return
    if not callable(getattr(body, "stages", None)) or not specs:
        name = getattr(body, "model_name", type(body).__name__)
        raise ConfigError(
            f"task.output_stride={output_stride}: {name} runs at its native strides only (dilation is "
            f"implemented for ResNets); use task.output_stride=null"
        )
    new_specs, dilation = [specs[0]], 1
    for spec, stage in zip(specs[1:], body.stages(), strict=True):
        if spec.reduction > output_stride:
            dilation *= 2
            if stage is not None:
                _dilate_stage(stage, dilation)
        new_specs.append(FeatureSpec(spec.module, spec.num_chs, min(spec.reduction, output_stride)))
    body.feature_specs = tuple(new_specs)
    body.feature_info = FeatureInfo(new_specs, body.feature_info.out_indices)


def modules_through(body: nn.Module, target: str) -> list[str]:
    """The names of the modules that run up to and including ``target`` (registration order, which is the
    order of the forward pass in our families and timm's): whole children before it, then recursively."""
    names: list[str] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full == target:
                names.append(full)
                return True
            if target.startswith(full + "."):
                return walk(child, full + ".")
            names.append(full)
        return False

    if not walk(body, ""):
        raise ValueError(f"{type(body).__name__} has no module {target!r}")
    return names


def freeze_stages(body: nn.Module, freeze_at: int) -> list[str]:
    """Stop training the stem (``freeze_at`` >= 1) and the first ``freeze_at - 1`` stages: their parameters
    (ACON's p1/p2/β and Meta-ACON's β network included) and BatchNorm statistics, by ``timm.utils.freeze``.
    Returns the frozen modules' names."""
    from timm.utils import freeze

    if freeze_at <= 0:
        return []
    specs = getattr(body, "feature_specs", None)
    modules = [s.module for s in specs] if specs else list(body.feature_info.module_name())
    if freeze_at > len(modules):
        raise ConfigError(
            f"backbone.freeze_at={freeze_at}: {type(body).__name__} has a stem and {len(modules) - 1} stages"
        )
    names = modules_through(body, modules[freeze_at - 1])
    freeze(body, names)
    return names


DEFAULT_FREEZE_AT = {"detection": 2, "segmentation": 0}
"""With a pretrained backbone: Detectron2's ``FREEZE_AT=2`` (torchvision's ``trainable_backbone_layers=3``),
stem and first stage frozen, for detection; torchvision's segmentation reference and DeepLabV3 train every
layer. A randomly initialised backbone trains every layer (torchvision's default without weights)."""


def freeze_at_of(cfg: DictConfig) -> int:
    """``backbone.freeze_at`` when set, else the task's default (``DEFAULT_FREEZE_AT``) for a backbone with
    a ``backbone.checkpoint``, 0 for one trained from scratch."""
    chosen = OmegaConf.select(cfg, "backbone.freeze_at", default=None)
    if chosen is not None:
        return int(chosen)
    if not OmegaConf.select(cfg, "backbone.checkpoint", default=None):
        return 0
    return DEFAULT_FREEZE_AT.get(str(cfg.task.name), 0)


def full_weights_follow(cfg: DictConfig) -> bool:
    """True when this run resumes (or fine-tunes) a checkpoint: its weights replace the backbone's."""
    from acon.report import run_dir_of
    from acon.rundir import resume_path

    return resume_path(cfg, run_dir_of(cfg)) is not None


def build_backbone(
    cfg: DictConfig,
    default_out_indices: Sequence[int],
    output_stride: int | None = None,
    load_checkpoint: bool | None = None,
) -> nn.Module:
    """The feature backbone of a transfer task (``build_feature_body``), with ``backbone.*`` applied in
    order: checkpoint (``load_checkpoint``: None reads it unless the run resumes a checkpoint, False
    never), then frozen stages, frozen BatchNorms, frozen ACON parameters."""
    body = build_feature_body(cfg, out_indices_of(cfg, default_out_indices), output_stride)
    bb = cfg.get("backbone") or {}
    if bb.get("checkpoint"):
        if load_checkpoint is None:
            load_checkpoint = not full_weights_follow(cfg)
        if load_checkpoint:
            load_backbone_checkpoint(body, bb["checkpoint"], cfg)
        else:
            log.info(
                f"acon: backbone.checkpoint {bb['checkpoint']} not read: the run's checkpoint has every weight"
            )
    frozen = freeze_stages(body, freeze_at_of(cfg))
    if frozen:
        log.info(f"acon: backbone.freeze_at={freeze_at_of(cfg)}: frozen {', '.join(frozen)}")
    if bb.get("freeze_bn"):
        freeze_batchnorm(body)
    if bb.get("freeze_acon"):
        freeze_activations(body)
    return body


def backbone_identity(cfg: DictConfig) -> dict:
    """The ``backbone`` options a resumed run must share: the checkpoint by file name only (its folder is
    where it happens to lie; after the first save the run's own checkpoints hold every weight)."""
    bb = OmegaConf.to_container(cfg.backbone, resolve=True) if cfg.get("backbone") else {}
    if bb.get("checkpoint"):
        bb["checkpoint"] = Path(str(bb["checkpoint"])).name
    return bb


def check_backbone_config(cfg: DictConfig) -> None:
    """``backbone.checkpoint`` exists (before any data is read), unless a resumed checkpoint replaces it."""
    path = OmegaConf.select(cfg, "backbone.checkpoint", default=None)
    if path and not Path(str(path)).expanduser().is_file() and not full_weights_follow(cfg):
        raise ConfigError(
            f"backbone.checkpoint={path!r} does not exist: pass our best.pt/last.pt or a converted file"
        )
