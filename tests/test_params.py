"""Optimiser parameter groups: the paper's no-weight-decay rule."""

from __future__ import annotations

import torch
from torch import nn

from acon import AconB, AconC, MetaAconC, Swish, activation_parameters, is_weight_decayed, param_groups


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        AconC(8),
        nn.Conv2d(8, 8, 1, bias=True),
        MetaAconC(8, r=2),
        Swish(8),
        AconB(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


DECAYED = {"0.weight", "3.weight", "4.fc1.weight", "4.fc2.weight", "9.weight"}


def test_param_groups_split_like_the_authors_recipe():
    model = _model()
    groups = param_groups(model, weight_decay=4e-5)
    assert [g["weight_decay"] for g in groups] == [4e-5, 0.0]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert decay == DECAYED
    assert no_decay == set(names.values()) - DECAYED
    for must in ("1.weight", "1.bias", "2.p1", "2.p2", "2.beta", "3.bias", "4.p1", "4.p2", "4.bn1.weight"):
        assert must in no_decay
    for must in ("4.fc1.bias", "4.bn2.bias", "5.beta", "6.p", "6.beta", "9.bias"):
        assert must in no_decay
    # the released training scripts' rule: 'weight' in the name and more than one dim
    for n, p in model.named_parameters():
        assert is_weight_decayed(n, p) == ("weight" in n and p.dim() > 1), n


def test_param_groups_feed_an_optimizer_and_skip_frozen():
    model = _model()
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    assert all(p is not model[0].weight for g in groups for p in g["params"])
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    p1_before = model[2].p1.detach().clone()
    model[2].p1.grad = torch.zeros_like(model[2].p1)
    model[3].weight.grad = torch.zeros_like(model[3].weight)
    w_before = model[3].weight.detach().clone()
    opt.step()
    assert torch.equal(model[2].p1, p1_before)  # zero grad and no decay: unchanged
    torch.testing.assert_close(model[3].weight.detach(), w_before * (1 - 0.1 * 0.1))  # decayed


def test_activation_parameters_names():
    names = [n for n, _ in activation_parameters(_model())]
    assert names == ["2.p1", "2.p2", "2.beta", "4.p1", "4.p2", "5.beta", "6.p", "6.beta"]
    assert [n for n, _ in activation_parameters(AconC(4))] == ["p1", "p2", "beta"]
