"""Meta-ACON's β network inside a fused BatchNorm → ACON op (``acon.fused.bn_act``, ``acon.fused.triton_bn_act``).

The op's forward runs the β network on z's spatial mean as a small graph of its own, kept on the op's
``ctx``; its backward differentiates that graph with the ACON gradient of β, which gives the gradient of
z's spatial mean and those of the β network's parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def beta_net_params(meta: nn.Module) -> list[Tensor]:
    """The β network's parameters of an :class:`acon.activations.MetaAconC`, in the op's argument order."""
    params = [meta.fc1.weight, meta.fc1.bias, meta.bn1.weight, meta.bn1.bias]
    params += [meta.fc2.weight, meta.fc2.bias, meta.bn2.weight, meta.bn2.bias]
    return [p for p in params if p is not None]


def leaf_beta_net_params(meta: nn.Module) -> list[Tensor] | None:
    """:func:`beta_net_params` read straight from the submodules' parameter dicts (a few times faster than
    attribute access), or None unless all eight are plain parameters (none missing or parametrized)."""
    mods = meta._modules
    params = []
    for name in ("fc1", "bn1", "fc2", "bn2"):
        own = mods[name]._parameters
        params += (own.get("weight"), own.get("bias"))
    return None if any(p is None for p in params) else params


def run_beta_net(ctx, beta_fn, zbar: Tensor, x: Tensor) -> Tensor:
    """β (detached) from ``beta_fn`` on z's spatial mean ``zbar`` (N, C); the graph and ``zbar`` are kept on
    ``ctx`` for :func:`beta_net_grads`. ``beta_fn`` may instead be a β network with its own backward
    (``acon.fused.meta_native.NativeBetaNet``, the C++ one): then it keeps what its backward needs."""
    if hasattr(beta_fn, "backward"):  # takes zbar in fp32 (not rounded to x's dtype first)
        ctx.beta_net = beta_fn
        return beta_fn.forward(zbar).view(x.shape[:2] + (1,) * (x.dim() - 2)).to(x.dtype)
    with torch.enable_grad():
        zbar = zbar.detach().to(x.dtype).requires_grad_()
        ctx.beta_graph = beta_fn(zbar, x)
    ctx.zbar = zbar
    return ctx.beta_graph.detach()


def beta_net_grads(ctx, dbeta: Tensor, beta_params: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
    """Backward of the β network given dβ: the gradient of z's spatial mean (N, C) and those of the β
    network's parameters (None where one needs none)."""
    net = getattr(ctx, "beta_net", None)
    if net is not None:
        dzbar, grads = net.backward(dbeta)
        return dzbar, [g if p.requires_grad else None for g, p in zip(grads, beta_params, strict=True)]
    wanted = [ctx.zbar] + [p for p in beta_params if p.requires_grad]
    # retained: small (N, C) tensors, freed with ctx; the outer graph may be run again (retain_graph)
    grads = torch.autograd.grad(ctx.beta_graph, wanted, dbeta, retain_graph=True, allow_unused=True)
    it = iter(grads[1:])
    return grads[0], [next(it) if p.requires_grad else None for p in beta_params]
