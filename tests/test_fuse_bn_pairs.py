"""``fuse_bn_acon`` finds BatchNorm → ACON pairs in converted timm and torchvision models through the
``torch.fx`` graph, fuses a pair only where the BatchNorm output feeds that activation alone, and falls back
to the ``nn.Sequential`` / ``bn_act_pairs`` layout for models ``torch.fx`` cannot trace."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from test_fused_bn_acon import close, eager_fp64, grads_close  # noqa: F401 (eager_fp64: fixture)
from torch import nn

from acon import AconC, MetaAconC, convert_activations, fuse_bn_acon
from acon.fuse_bn import FusedBNAconC, FusedBNMetaAconC, count_fused, fuse_for_run

CPU = torch.device("cpu")
RESNET18_PAIRS = {"act1"} | {f"layer{i}.{j}.act1" for i in range(1, 5) for j in range(2)}
TV_RESNET18_PAIRS = {n.replace("act1", "relu") for n in RESNET18_PAIRS}
MOBILENET_V3_SMALL_PAIRS = {"features.1.block.0.2", "features.2.block.0.2", "features.2.block.1.2"} | {
    "features.3.block.0.2",
    "features.3.block.1.2",
}

# Counted by hand:
# - timm resnet18 (17 ReLU call sites): the stem's bn1 → act1, and each of the 8 BasicBlocks' bn1 → act1
#   (its absent drop-block is an nn.Identity between them); each act2 reads bn2's output plus the
#   shortcut, so bn2 stays unfused: 9 pairs.
# - torchvision resnet18: each BasicBlock calls one `relu` twice; convert_activations makes the call after
#   bn1 `relu` and the call after the residual sum `relu_1`: stem bn1 → relu and 8 × bn1 → relu = 9 pairs.
# - torchvision mobilenet_v3_small: 14 ReLU call sites become ACON, 9 of them the squeeze-excitation
#   `activation` after the 1×1 convolution fc1 (no BatchNorm); the other 5 follow a BatchNorm inside a
#   Conv2dNormActivation (features.1's depthwise conv, features.2 and .3's expand and depthwise convs).
# - timm mobilenetv3_small_100: the same 14 = 9 + 5 split; its BatchNorms are BatchNormAct2d modules (BatchNorm
#   and act in one module): blocks.0.0.bn1 and blocks.1.{0,1}.bn{1,2}.
# - timm efficientnet_b0 (49 SiLU call sites): 16 follow the squeeze-excitation conv_reduce; the other 33 are
#   the `act` of a BatchNormAct2d: the stem's bn1, the head's bn2, the first block's bn1 and bn1, bn2 of each
#   of the 15 inverted-residual blocks (stage depths 2, 2, 3, 3, 4, 1).
TIMM_MOBILENETV3_SMALL_PAIRS = {"blocks.0.0.bn1.act"} | {
    f"blocks.1.{j}.bn{k}.act" for j in (0, 1) for k in (1, 2)
}
EFFICIENTNET_B0_PAIRS = {"bn1.act", "bn2.act", "blocks.0.0.bn1.act"} | {
    f"blocks.{stage}.{j}.bn{k}.act"
    for stage, depth in enumerate((2, 2, 3, 3, 4, 1), start=1)
    for j in range(depth)
    for k in (1, 2)
}
CONVERTED = {
    "timm_resnet18": (lambda: timm.create_model("resnet18", num_classes=10), RESNET18_PAIRS),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), TV_RESNET18_PAIRS),
    "tv_mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        MOBILENET_V3_SMALL_PAIRS,
    ),
    "timm_mobilenetv3_small_100": (
        lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
        TIMM_MOBILENETV3_SMALL_PAIRS,
    ),
    "timm_efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", num_classes=10),
        EFFICIENTNET_B0_PAIRS,
    ),
}
FAST = {
    ("timm_resnet18", "acon_c"),
    ("tv_resnet18", "meta_acon"),
    ("tv_mobilenet_v3_small", "acon_c"),
    ("timm_mobilenetv3_small_100", "acon_c"),
}


def fused_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, FusedBNAconC | FusedBNMetaAconC)}


def seeded(model: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """``model(x)`` with the RNG at ``seed`` (the same dropout masks in both models)."""
    torch.manual_seed(seed)
    return model(x)


@pytest.mark.usefixtures("eager_fp64")
@pytest.mark.parametrize(
    "name,act",
    [
        pytest.param(n, a, marks=() if (n, a) in FAST else pytest.mark.slow)
        for n in CONVERTED
        for a in ("acon_c", "meta_acon")
    ],
)
def test_converted_models_fuse_their_pairs_and_train_as_unfused(name, act):
    build, expected = CONVERTED[name]
    torch.manual_seed(0)
    # batch 4: with 2 samples, Meta-ACON's β-network BatchNorm (over per-sample means) maps two near-equal
    # values to ±1 and multiplies rounding differences ~10× per block in either model
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    ref = convert_activations(build(), act, example_input=x.float()).double()
    fused = copy.deepcopy(ref)
    line = fuse_for_run(fused, True, CPU, False)
    assert count_fused(fused) == len(expected), line
    assert fused_names(fused) == expected
    assert f"{len(expected)} BatchNorm" in line and "torch.fx graph" in line, line
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())  # the unfused checkpoint loads, strict
    for step in range(2):  # training mode: batch statistics, running averages, num_batches_tracked
        g = torch.randn(4, 10, dtype=torch.float64)
        ya, yb = seeded(ref, x, step), seeded(fused, x, step)
        ya.backward(g), yb.backward(g)
        assert close(yb, ya, torch.float64)
    grads_close(ref, fused, torch.float64)
    for (key, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers(), strict=True):
        assert close(b, a, torch.float64), key
    ref.eval(), fused.eval()
    with torch.no_grad():
        assert close(fused(x), ref(x), torch.float64)


class ResidualReader(nn.Module):
    """bn2's output feeds act2 and the sum: only bn1 → act1 may fuse, although both are declared."""

    bn_act_pairs = (("bn1", "act1"), ("bn2", "act2"))

    def __init__(self, act: type, c: int = 4) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), act(c)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), act(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        return self.act2(z) + z


class SharedBatchNorm(nn.Module):
    """One BatchNorm normalises two branches (called twice): its output has two readers."""

    def __init__(self, act: type, c: int = 4) -> None:
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, c, 1), nn.Conv2d(3, c, 1), nn.BatchNorm2d(c)
        self.body = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), act(c))
        self.act1, self.act2 = act(c), act(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act1(self.bn(self.conv1(x))) + self.act2(self.bn(self.conv2(x))) + self.body(x)


class SharedBlock(nn.Module):
    """One conv → BN → ACON block applied twice: each call's BatchNorm output feeds only the ACON."""

    def __init__(self, act: type, c: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, c, 1), nn.BatchNorm2d(c), act(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.body(x.flip(-1))


@pytest.mark.parametrize("act", [AconC, MetaAconC])
@pytest.mark.parametrize(
    "model,expected",
    [(ResidualReader, {"act1"}), (SharedBatchNorm, {"body.2"}), (SharedBlock, {"body.2"})],
)
def test_a_batchnorm_output_with_another_reader_is_not_fused(act, model, expected):
    torch.manual_seed(0)
    ref = model(act)
    fused = fuse_bn_acon(copy.deepcopy(ref))
    assert fused_names(fused) == expected
    x = torch.randn(2, 3, 5, 5)
    ya, yb = ref(x), fused(x)
    ya.sum().backward(), yb.sum().backward()
    assert close(yb, ya, torch.float32)
    grads_close(ref, fused, torch.float32)


class Untraceable(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self, act: type) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > 0 else self.body(-x)


def test_an_untraceable_model_keeps_the_layout_rule_and_says_so():
    model = Untraceable(AconC)
    line = fuse_for_run(model, True, CPU, False)
    assert fused_names(model) == {"body.2"}
    assert "1 BatchNorm" in line and "torch.fx cannot trace the model (TraceError" in line, line


def test_timm_batchnorm_act_fuses_only_without_a_drop_block_and_unfuses():
    from timm.layers import BatchNormAct2d

    from acon import unfuse_bn_acon

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Conv2d(4, 4, 1))
    plain.append(BatchNormAct2d(4, drop_layer=lambda: nn.Dropout(0.5)))  # a reader between BN and act
    ref = convert_activations(plain, "acon_c", example_input=torch.randn(2, 3, 5, 5))
    fused = fuse_bn_acon(copy.deepcopy(ref))
    assert fused_names(fused) == {"1.act"} and type(fused[3]) is BatchNormAct2d
    assert list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 5, 5)
    ya, yb = seeded(ref, x, 0), seeded(fused, x, 0)
    ya.sum().backward(), yb.sum().backward()
    assert close(yb, ya, torch.float32)
    grads_close(ref, fused, torch.float32)
    unfuse_bn_acon(fused)
    assert fused_names(fused) == set() and type(fused[1]) is BatchNormAct2d


class UntraceableAroundParts(nn.Module):
    """A forward torch.fx cannot trace (iterating over a shape, as detection models do) around parts it can:
    a converted timm ResNet (its blocks' bn1 → drop-block → act1 pairs are neither nn.Sequential neighbours
    nor declared), and a part that returns its BatchNorm's output to an ACON the top level applies."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = convert_activations(
            timm.create_model("resnet18", num_classes=0), "acon_c", example_input=torch.randn(1, 3, 32, 32)
        )
        self.neck = nn.ModuleDict({"conv": nn.Conv2d(512, 4, 1), "bn": nn.BatchNorm2d(4)})
        self.act = AconC(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in x.shape[:1]:  # a Proxy cannot be iterated
            feat = self.backbone.forward_features(x)
        return self.act(self.neck["bn"](self.neck["conv"](feat)))


@pytest.mark.usefixtures("eager_fp64")
def test_an_untraceable_model_is_traced_part_by_part():
    torch.manual_seed(0)
    ref = UntraceableAroundParts().double()
    fused = copy.deepcopy(ref)
    line = fuse_for_run(fused, "auto", CPU, False)
    assert fused_names(fused) == {f"backbone.{n}" for n in RESNET18_PAIRS}  # not the top level's act
    assert "torch.fx cannot trace the model (TraceError: Proxy object cannot be iterated.); 9 found" in line
    assert "graphs of its parts" in line and "See the" not in line, line  # the reason's first sentence
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)  # batch 4: see the converted models' test
    ya, yb = ref(x), fused(x)
    ya.sum().backward(), yb.sum().backward()
    assert close(yb, ya, torch.float64)
    grads_close(ref, fused, torch.float64)


class CachesOnProxies(nn.Module):
    """A part that stores what its forward computed on the module (as anchor generators cache anchors)
    before it fails under tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), AconC(4))
        self.sizes = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes = x.shape[-2:]
        return self.body(x) if x.sum() > 0 else self.body(-x)


def test_tracing_leaves_no_proxy_behind():
    model = nn.ModuleDict({"head": CachesOnProxies()})
    line = fuse_for_run(model, True, CPU, False)
    assert fused_names(model) == {"head.body.2"} and "graphs of its parts" in line, line
    assert model["head"].sizes is None
    model["head"](torch.randn(1, 3, 4, 4))
    assert model["head"].sizes == (4, 4)
