"""Parameter and FLOP counting.

``count_flops`` returns multiply-accumulates (MACs), the unit the paper calls FLOPs: those of every
convolution and matrix product (linear layers, including the small 1x1 convs inside Meta-ACON's
β network), counted by ``torch.utils.flop_counter.FlopCounterMode`` (which reports 2 per MAC) and
halved. Bias additions, BatchNorm, pooling, element-wise activations (ReLU, Swish, ACON) and the
spatial means are not counted, as in the paper's numbers. The forward pass runs on the meta device,
so counting costs no arithmetic and no memory, whatever the model size.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from acon import AconB, AconC, FReLU, MetaAconC, Swish

LEARNABLE_ACTIVATIONS = (Swish, AconB, AconC, MetaAconC, FReLU, nn.PReLU)
"""Activation modules with parameters (``FReLU`` covers ACON-FReLU, its subclass)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); BN running statistics are not parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_bn_params(model: nn.Module) -> int:
    """Parameters of the BatchNorm layers (their affine weight and bias)."""
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())


def count_conv_bias_params(model: nn.Module) -> int:
    """Biases of the network's convolutions (ACON-FReLU's funnel included, Meta-ACON's β network not)."""
    inner = {id(c) for m in model.modules() if isinstance(m, MetaAconC) for c in m.modules()}
    return sum(
        m.bias.numel()
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.bias is not None and id(m) not in inner
    )


def count_flops(model: nn.Module, img_size: int | tuple[int, int] = 224, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass on a single ``in_chans x img_size x img_size`` image."""
    model = unwrap_model(model)
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    tensors = {
        name: torch.empty_like(t, device="meta")
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    x = torch.empty(1, in_chans, h, w, device="meta")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, tensors, (x,))
    finally:
        model.train(was_training)
    total = counter.get_total_flops()
    if total % 2:
        raise RuntimeError(f"FlopCounterMode returned an odd FLOP count {total}; expected 2 per MAC")
    return total // 2


def activation_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Every learnable activation module (Swish/ACON-A, ACON-B, ACON-C, Meta-ACON, (ACON-)FReLU, PReLU) by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LEARNABLE_ACTIVATIONS)}
