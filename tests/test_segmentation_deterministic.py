"""Segmentation under ``deterministic=true``: no op that raises on CUDA under
``torch.use_deterministic_algorithms(True)`` (recorded on a CPU, as for the classification models), and the
deterministic forms give the native ops' numbers."""

from __future__ import annotations

import pytest
import torch
from test_deterministic_models import CUDA_RAISING_ATEN, CUDA_RAISING_FUNCTIONS, AtenNames, FunctionNames
from torch import nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from acon.tasks.segmentation_deterministic import (
    bilinear_weights,
    pixel_cross_entropy,
    resize_bilinear,
    segmentation_model,
)


@pytest.fixture
def deterministic(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


class TwoMaps(nn.Module):
    """A tiny feature body: {"out": stride-8 map, "aux": stride-4 map}."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.b = nn.Conv2d(6, 8, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.a(x)
        return {"out": self.b(a), "aux": a}


def tiny(head: str) -> nn.Module:
    torch.manual_seed(0)
    classifier = DeepLabHead(8, 4) if head == "deeplabv3" else FCNHead(8, 4)
    return segmentation_model(head, TwoMaps(), classifier, FCNHead(6, 4)).train()


def step(model: nn.Module, x: torch.Tensor, masks: torch.Tensor):
    """A training step's forward and backward with the task's loss; (loss, logits, grads)."""
    model.zero_grad()
    torch.manual_seed(1)  # the heads' dropout draws the same masks in both steps
    out = model(x)
    loss = pixel_cross_entropy(out["out"], masks, 255, "mean", 0.1)
    loss = loss + 0.4 * pixel_cross_entropy(out["aux"], masks, 255, "mean", 0.1)
    loss.backward()
    return loss.detach(), out["out"].detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_training_step_runs_no_op_that_raises_on_cuda_and_matches_the_native_ops(head, deterministic):
    """Before: the step ran upsample_bilinear2d_backward, _adaptive_avg_pool2d_backward and nll_loss2d,
    which raise on CUDA under deterministic=true (CPU has kernels for them, so it is checked here by
    recording the ops, the way tests/test_deterministic_models.py checks the classifiers)."""
    x, masks = torch.randn(2, 3, 61, 83), torch.randint(0, 4, (2, 61, 83))
    masks[:, :5] = 255  # ignored pixels
    model = tiny(head)
    functions, aten = FunctionNames(), AtenNames()
    with functions, aten:
        loss, logits, grads = step(model, x, masks)
    assert not functions.names & CUDA_RAISING_FUNCTIONS, functions.names & CUDA_RAISING_FUNCTIONS
    assert not aten.names & CUDA_RAISING_ATEN, aten.names & CUDA_RAISING_ATEN
    torch.use_deterministic_algorithms(False)  # the native ops, as a run without deterministic=true
    native = AtenNames()
    with native:
        loss_n, logits_n, grads_n = step(model, x, masks)
    assert "upsample_bilinear2d_backward" in native.names and "nll_loss2d_forward" in native.names
    assert logits.shape == (2, 4, 61, 83)
    torch.testing.assert_close(logits, logits_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_n, rtol=1e-5, atol=1e-6)
    for g, g_n in zip(grads, grads_n, strict=True):
        torch.testing.assert_close(g, g_n, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (17, 3), (64, 48)])
def test_bilinear_weights_are_torchs_interpolation(size, deterministic):
    x = torch.randn(2, 3, 9, 12, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    aten = AtenNames()
    with aten:
        ours = resize_bilinear(x, size)
    assert "upsample_bilinear2d" not in aten.names  # the matmul form
    torch.testing.assert_close(ours, expected)
    assert torch.allclose(
        bilinear_weights(size[0], 9, None, torch.float64).sum(1), torch.ones(size[0], dtype=torch.float64)
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pixel_loss_rows_are_the_same_loss(reduction, deterministic):
    logits, masks = torch.randn(2, 5, 7, 6), torch.randint(0, 5, (2, 7, 6))
    masks[0, :3] = 255
    expected = F.cross_entropy(logits, masks, ignore_index=255, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(pixel_cross_entropy(logits, masks, 255, reduction, 0.1), expected)


def test_the_state_dict_is_torchvisions():
    """The deterministic forms change no parameter or buffer name: checkpoints load either way."""
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3

    torch.manual_seed(0)
    ours = tiny("deeplabv3")
    theirs = DeepLabV3(TwoMaps(), DeepLabHead(8, 4), FCNHead(6, 4))
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_flops_are_the_same_under_deterministic_mode(deterministic):
    """The FLOP count results.json reports does not change with deterministic=true (no backward there:
    the native upsampling)."""
    from models.complexity import count_flops

    flops = count_flops(tiny("deeplabv3"), (64, 48))
    torch.use_deterministic_algorithms(False)
    assert count_flops(tiny("deeplabv3"), (64, 48)) == flops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_cuda_segmentation_step_under_deterministic_mode(head, deterministic):
    """On CUDA the step runs (before: RuntimeError from the upsampling backward) and repeats bit for bit."""
    model = tiny(head).cuda()
    x = torch.randn(2, 3, 129, 257, device="cuda")
    masks = torch.randint(0, 4, (2, 129, 257), device="cuda")
    masks[:, :9] = 255
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = step(model, x, masks)
        second = step(model, x, masks)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2], strict=True))


def test_the_task_model_and_loss_take_the_deterministic_path(deterministic):
    """The segmentation task's own network (DeepLabV3 + aux head on ShuffleNetV2) and its loss, as
    train.py builds them under deterministic=true: no op in the forward or backward that raises on CUDA."""
    from conftest import compose

    from acon.engine import StepContext
    from acon.tasks import task_of

    cfg = compose(
        ["task=segmentation", "model=shufflenetv2_x0_5_small", "task.head=deeplabv3", "task.aux_loss=true"]
        + ["task.output_stride=null", "data.num_classes=4", "deterministic=true"]
    )
    task = task_of(cfg)
    model = task.build_model(cfg).train()
    ctx = StepContext(model, None, None, None, None, torch.device("cpu"))
    masks = torch.randint(0, 4, (2, 40, 56))
    functions, aten = FunctionNames(), AtenNames()
    with functions, aten:
        task.loss(ctx, torch.randn(2, 3, 40, 56), masks).backward()
    assert not functions.names & CUDA_RAISING_FUNCTIONS, functions.names & CUDA_RAISING_FUNCTIONS
    assert not aten.names & CUDA_RAISING_ATEN, aten.names & CUDA_RAISING_ATEN
