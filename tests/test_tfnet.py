"""ACON-FReLU and TFNet against the authors' layout (re-stated in official_reference.py), the activation
ablation, and eval.py on a TFNet checkpoint in the released format."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import compose, run_cli
from torch import nn

import acon
import models
from acon.data import build_datasets
from models.official import infer_official_activation
from tests.official_reference import RefFunnelAcon, RefTFNet, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
SIZES = {"tfnet_x0_5": 0.5, "tfnet_x1_0": 1.0, "tfnet_x1_5": 1.5, "tfnet_x2_0": 2.0}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, conv biases and funnel weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_batchnorm(m, g)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _released(ref: nn.Module) -> dict:
    return {"state_dict": {"module." + k: v.clone() for k, v in ref.state_dict().items()}}


@pytest.mark.parametrize("stride", [1, 2])
def test_acon_frelu_equals_the_authors_module(stride):
    ref = _randomize(RefFunnelAcon(6, stride))
    ours = acon.create_activation("acon_frelu", 6, stride=stride).eval()
    assert isinstance(ours, acon.AconFReLU)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)
    assert ours(x).shape[-1] == (9 if stride == 1 else 5)


@pytest.mark.parametrize("stride", [1, 2])
def test_acon_frelu_scripts_to_the_same_function(stride):
    """TorchScript (timm's scriptable models, FX graphs scripted) skips only the input checks."""
    m = _randomize(acon.AconFReLU(6, stride))
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(m)(x), m(x), rtol=0, atol=0)


def test_acon_frelu_rejects_flat_input_and_bad_stride():
    with pytest.raises(ValueError, match=r"AconFReLU needs \(N, C, H, W\).*\(4, 6\)"):
        acon.AconFReLU(6)(torch.randn(4, 6))
    with pytest.raises(ValueError, match="channels"):
        acon.AconFReLU(6)(torch.randn(1, 5, 4, 4))
    with pytest.raises(ValueError, match="stride"):
        acon.AconFReLU(6, stride=3)


@pytest.mark.parametrize("name", list(SIZES))
def test_tfnet_params_and_state_dict_equal_the_authors(name):
    with torch.device("meta"):
        ref, ours = RefTFNet(SIZES[name]), models.create_model(name)
    assert models.count_params(ours) == models.count_params(ref)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }


@pytest.mark.parametrize("name", ["tfnet_x0_5", pytest.param("tfnet_x2_0", marks=pytest.mark.slow)])
def test_converted_tfnet_logits_match_reference(name):
    torch.manual_seed(0)
    ref = _randomize(RefTFNet(SIZES[name]))
    ckpt = _released(ref)
    assert infer_official_activation(ckpt) == "acon_frelu"
    ours = models.create_model(name, "acon_frelu").eval()
    ours.load_state_dict(models.convert_official_state_dict(ckpt, name, "acon_frelu"))
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)  # float64: the logits reach ~1e2
    with torch.no_grad():
        expected, got = ref.double()(x), ours.double()(x)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_relu_ablation_replaces_every_acon_frelu():
    """activation=relu: ReLU at every site; stride-2 sites max-pool first (the stride-2 identity path)."""
    m = models.create_model("tfnet_x0_5", "relu", num_classes=5)
    assert not any(isinstance(x, acon.AconFReLU) for x in m.modules())
    down = m.features[0].acon
    assert isinstance(down[0], nn.MaxPool2d) and isinstance(down[1], acon.ReLU)
    assert isinstance(m.features[1].acon, acon.ReLU) and isinstance(m.conv_last[2], acon.ReLU)
    assert not any(isinstance(x, nn.Conv2d) and x.kernel_size != (1, 1) for x in m.features.modules())
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    meta = models.create_model("tfnet_x0_5", "meta_acon", num_classes=5)
    assert isinstance(meta.features[2].acon[1], acon.MetaAconC)


def test_tfnet_small_input_trains_on_16px():
    torch.manual_seed(0)
    m = models.create_model("tfnet_x0_5", num_classes=10, small_input=True)
    out = m(torch.randn(4, 3, 16, 16))
    out.logsumexp(1).mean().backward()
    assert out.shape == (4, 10) and all(p.grad is not None for p in m.parameters())


def test_eval_official_keys_build_the_converted_tfnet(tmp_path):
    """eval.py's ``official.model`` / ``official.activation`` path, in process (eval.py itself: slow test)."""
    from acon.evaluation import model_for_checkpoint

    ref = _randomize(RefTFNet(0.5, n_class=3))
    keys = [
        "checkpoint=x",
        "data.num_classes=3",
        "official.model=tfnet_x0_5",
        "official.activation=acon_frelu",
    ]
    model, data, _ = model_for_checkpoint(_released(ref), tmp_path / "x", compose(keys, config_name="eval"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=1e-4, atol=1e-4)
    assert data.preprocess == "bgr_255"


@pytest.mark.slow
def test_eval_py_converts_a_released_tfnet(tiny_imagenet, tmp_path):
    torch.manual_seed(0)
    ref = _randomize(RefTFNet(0.5, n_class=3))
    path = tmp_path / "tfnet.0.5.pth"
    torch.save(_released(ref), path)
    data = [f"data.root={tiny_imagenet}", "data.num_classes=3", "data.num_workers=0"]
    run_cli(
        [sys.executable, "eval.py", f"checkpoint={path}", "data=folder", *data, "official.model=tfnet_x0_5"]
        + ["official.activation=acon_frelu", "trainer.device=cpu", f"out={tmp_path / 'e.json'}"],
        env={"ACON_EVAL_DIR": str(tmp_path / "eval")},
    )
    got = json.loads((tmp_path / "e.json").read_text())
    _, val = build_datasets(compose(["data=folder", *data, "data.preprocess=bgr_255"]).data)
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(ref(x[None]), torch.tensor([y])).item() for x, y in val]
    assert got["count"] == len(val) == 9
    assert abs(got["loss"] - sum(losses) / len(losses)) < 1e-4 * max(1.0, abs(got["loss"]))


def test_timm_registers_acon_tfnet():
    import timm

    import models.timm_models  # noqa: F401  (registers acon_<name>)

    m = timm.create_model("acon_tfnet_x0_5", num_classes=4)
    assert isinstance(m.features[0].acon, acon.AconFReLU) and m.classifier[0].out_features == 4
    assert {"acon_tfnet_x2_0", "acon_mobilenetv2_x1_4"} <= set(timm.list_models("acon_*"))
