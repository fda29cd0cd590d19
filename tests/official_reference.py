"""Test fixture: the authors' released network layouts, re-stated independently of ``models/``.

Mirrors the facts of the released code (megvii-model/ShuffleNet-Series, nmaac/acon and its TFNet) that
a converted checkpoint depends on: module / state-dict names, conv biases, where the stride sits, the channel
split of the ShuffleNet unit (reshape/permute form), the ACON-C formula as written by the authors
(``(p1*x - p2*x) * sigmoid(beta*(p1*x - p2*x)) + p2*x``), Meta-ACON's β network on the spatial
mean, and the fixed 7x7 average pool of the ShuffleNetV2 head. Used only to check the converter.
"""

from __future__ import annotations

import torch
from torch import nn


class RefAconC(nn.Module):
    """ACON-C with the authors' parameter names and formula."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, width, 1, 1))

    def forward(self, x):
        d = self.p1 * x - self.p2 * x
        return d * torch.sigmoid(self.beta * d) + self.p2 * x


class RefMetaAconC(nn.Module):
    """Meta-ACON-C with the authors' names: β = σ(bn2(fc2(bn1(fc1(mean_HW x))))), hidden max(r, C // r)."""

    def __init__(self, width: int, r: int = 16) -> None:
        super().__init__()
        hidden = max(r, width // r)
        self.fc1 = nn.Conv2d(width, hidden, kernel_size=1, stride=1, bias=True)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, width, kernel_size=1, stride=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))

    def forward(self, x):
        pooled = x.mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        beta = torch.sigmoid(self.bn2(self.fc2(self.bn1(self.fc1(pooled)))))
        d = self.p1 * x - self.p2 * x
        return d * torch.sigmoid(beta * d) + self.p2 * x


def ref_act(kind: str, width: int, r: int) -> nn.Module:
    """The authors' activation of ``kind`` ('relu', 'acon', 'meta')."""
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "acon":
        return RefAconC(width)
    return RefMetaAconC(width, r=r)


class RefShuffleUnit(nn.Module):
    """The authors' ShuffleV2 block: constructed with the branch input width ``inp``."""

    def __init__(self, inp: int, oup: int, mid: int, stride: int, kind: str, r: int) -> None:
        super().__init__()
        self.stride = stride
        outputs = oup - inp
        self.branch_main = nn.Sequential(
            nn.Conv2d(inp, mid, 1, 1, 0, bias=True),
            nn.BatchNorm2d(mid),
            ref_act(kind, mid, r),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=True),
            nn.BatchNorm2d(mid),
            nn.Conv2d(mid, outputs, 1, 1, 0, bias=True),
            nn.BatchNorm2d(outputs),
            ref_act(kind, outputs, r),
        )
        if stride == 2:
            self.branch_proj = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=True),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, inp, 1, 1, 0, bias=True),
                nn.BatchNorm2d(inp),
                ref_act(kind, inp, r),
            )

    def forward(self, x):
        if self.stride == 2:
            return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)
        b, c, h, w = x.shape
        y = x.reshape(b * c // 2, 2, h * w).permute(1, 0, 2).reshape(2, -1, c // 2, h, w)
        return torch.cat((y[0], self.branch_main(y[1])), 1)


class RefShuffleNetV2(nn.Module):
    """The authors' ShuffleNetV2 ACON / Meta-ACON network (input 224x224: fixed 7x7 average pool)."""

    CHANNELS = {
        "0.5x": [24, 48, 96, 192, 1024],
        "1.0x": [24, 116, 232, 464, 1024],
        "1.5x": [24, 176, 352, 704, 1024],
        "2.0x": [24, 244, 488, 976, 2048],
    }

    def __init__(self, model_size: str = "1.5x", kind: str = "acon", n_class: int = 1000) -> None:
        super().__init__()
        ch = self.CHANNELS[model_size]
        r = 8 if model_size == "0.5x" else 16
        self.model_size, self.last = model_size, ch[-1]
        self.first_conv = nn.Sequential(
            nn.Conv2d(3, ch[0], 3, 2, 1, bias=True), nn.BatchNorm2d(ch[0]), ref_act(kind, ch[0], r)
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        units, inp = [], ch[0]
        for stage, repeats in enumerate([4, 8, 4]):
            out = ch[stage + 1]
            for i in range(repeats):
                if i == 0:
                    units.append(RefShuffleUnit(inp, out, out // 2, 2, kind, r))
                else:
                    units.append(RefShuffleUnit(inp // 2, out, out // 2, 1, kind, r))
                inp = out
        self.features = nn.Sequential(*units)
        self.conv_last = nn.Sequential(
            nn.Conv2d(inp, ch[-1], 1, 1, 0, bias=True), nn.BatchNorm2d(ch[-1]), ref_act(kind, ch[-1], r)
        )
        self.globalpool = nn.AvgPool2d(7)
        if model_size == "2.0x":
            self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Sequential(nn.Linear(ch[-1], n_class, bias=True))

    def forward(self, x):
        x = self.conv_last(self.features(self.maxpool(self.first_conv(x))))
        x = self.globalpool(x)
        if self.model_size == "2.0x":
            x = self.dropout(x)
        return self.classifier(x.contiguous().view(-1, self.last))


class RefBasic(nn.Module):
    """The authors' BasicBlock_ACON: acon1 after bn1, acon2 after the addition."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, kind="acon"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.acon1 = ref_act(kind, planes, 16)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.acon2 = ref_act(kind, planes, 16)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.acon1(self.bn1(self.conv1(x)))))
        return self.acon2(out + identity)


class RefBottleneck(nn.Module):
    """The authors' Bottleneck_ACON: stride on conv1 (1x1), ``acon`` after the 3x3, ReLU elsewhere."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, kind="acon"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride, bias=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.acon = ref_act(kind, planes, 16)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.acon(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class RefResNet(nn.Module):
    """The authors' ResNet (ACON / Meta-ACON release): conv biases everywhere, ReLU stem."""

    LAYERS = {18: (RefBasic, [2, 2, 2, 2]), 34: (RefBasic, [3, 4, 6, 3]), 50: (RefBottleneck, [3, 4, 6, 3])}

    def __init__(self, depth: int = 50, kind: str = "acon", num_classes: int = 1000) -> None:
        super().__init__()
        block, layers = self.LAYERS[depth]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=True)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers, strict=True)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                down = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=True),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            blocks = [block(self.inplanes, planes, stride, down, kind)]
            self.inplanes = planes * block.expansion
            blocks += [block(self.inplanes, planes, kind=kind) for _ in range(1, n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class RefFunnelAcon(nn.Module):
    """The authors' Acon_FReLU: bn2(S_1(x or maxpool(x), bn1(dwconv3x3(x)))), names as released."""

    def __init__(self, width: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv_frelu = nn.Conv2d(width, width, 3, stride, 1, groups=width, bias=True)
        self.bn1 = nn.BatchNorm2d(width)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        a = nn.functional.max_pool2d(x, 3, 2, 1) if self.stride == 2 else x
        b = self.bn1(self.conv_frelu(x))
        return self.bn2((a - b) * torch.sigmoid(a - b) + b)


class RefTFBlock(nn.Module):
    """The authors' TFBlock: pw-BN-Acon_FReLU-pw-BN, then Acon_FReLU on x + branch or on [x, branch]."""

    def __init__(self, inp: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.branch_main = nn.Sequential(
            nn.Conv2d(inp, inp, 1, 1, bias=True),
            nn.BatchNorm2d(inp),
            RefFunnelAcon(inp),
            nn.Conv2d(inp, inp, 1, 1, bias=True),
            nn.BatchNorm2d(inp),
        )
        self.acon = RefFunnelAcon(inp * stride, stride)

    def forward(self, x):
        y = self.branch_main(x)
        return self.acon(torch.cat((x, y), 1) if self.stride == 2 else x + y)


class RefTFNet(nn.Module):
    """The authors' TFNet: 16 * size stem (ReLU), stages 2/3/8/3 doubling width, 1024-wide last conv,
    fixed 7x7 average pool (224x224 input), dropout 0.2 only above size 0.5."""

    def __init__(self, model_size: float = 0.5, n_class: int = 1000) -> None:
        super().__init__()
        c = int(16 * model_size)
        self.model_size = model_size
        self.first_conv = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=True), nn.BatchNorm2d(c), nn.ReLU())
        blocks = []
        for repeats in (2, 3, 8, 3):
            blocks.append(RefTFBlock(c, 2))
            c *= 2
            blocks += [RefTFBlock(c, 1) for _ in range(repeats - 1)]
        self.features = nn.Sequential(*blocks)
        self.conv_last = nn.Sequential(
            nn.Conv2d(c, 1024, 1, 1, 0, bias=True), nn.BatchNorm2d(1024), RefFunnelAcon(1024)
        )
        self.globalpool = nn.AvgPool2d(7)
        self.dropout = nn.Dropout(0.2 if model_size > 0.5 else 0.0)
        self.classifier = nn.Sequential(nn.Linear(1024, n_class, bias=True))

    def forward(self, x):
        x = self.globalpool(self.conv_last(self.features(self.first_conv(x))))
        return self.classifier(self.dropout(x).flatten(1))


def randomize_batchnorm(bn: nn.BatchNorm2d, g: torch.Generator) -> None:
    """Non-trivial affine parameters and running statistics, drawn from ``g`` (in place, no grad)."""
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
