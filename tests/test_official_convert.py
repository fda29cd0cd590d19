"""Released-checkpoint import: the authors' layouts (re-stated in official_reference.py) with random
weights, converted, must give the same logits as the reference to 1e-4."""

import pytest
import torch
from conftest import load_script
from torch import nn

import models
from models.official import OFFICIAL_INPUT, infer_official_activation, unwrap_state_dict
from tests.official_reference import RefAconC, RefMetaAconC, RefResNet, RefShuffleNetV2, randomize_batchnorm

KIND = {"relu": "relu", "acon_c": "acon", "meta_acon": "meta"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every tensor a conversion could get wrong (BN stats, biases, ACON)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                randomize_batchnorm(m, g)
                m.num_batches_tracked.fill_(7)
            elif isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, RefAconC | RefMetaAconC):
                m.p1.copy_(torch.randn(m.p1.shape, generator=g))
                m.p2.copy_(torch.randn(m.p2.shape, generator=g) * 0.25)
                if isinstance(m, RefAconC):
                    m.beta.copy_(torch.rand(m.beta.shape, generator=g) + 0.5)
    return model.eval()


def _released(ref: nn.Module) -> dict:
    """The released file format: DataParallel's ``module.`` prefix inside ``{'state_dict': ...}``."""
    return {"state_dict": {"module." + k: v.clone() for k, v in ref.state_dict().items()}}


CASES = [
    ("shufflenetv2_x0_5", "relu"),
    ("shufflenetv2_x0_5", "meta_acon"),
    ("shufflenetv2_x1_0", "acon_c"),
    ("resnet18", "acon_c"),
    ("resnet50", "acon_c"),
    ("resnet50", "meta_acon"),
]


def _reference(name: str, activation: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name.startswith("shufflenetv2"):
        size = name.split("_x")[1].replace("_", ".") + "x"
        return _randomize(RefShuffleNetV2(size, KIND[activation])), torch.randn(1, 3, 224, 224)
    return _randomize(RefResNet(int(name[6:]), KIND[activation])), torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name,activation", CASES)
def test_converted_logits_match_reference(name, activation):
    ref, x = _reference(name, activation)
    ckpt = _released(ref)
    assert infer_official_activation(ckpt) == activation
    ours = models.create_model(name, activation).eval()
    ours.load_state_dict(models.convert_official_state_dict(ckpt, name, activation))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert expected.abs().max() > 1e-2  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_missing_and_unknown_keys_are_listed():
    ref, _ = _reference("resnet18", "acon_c")
    sd = _released(ref)["state_dict"]
    del sd["module.layer2.1.acon1.p2"]
    sd["module.layer9.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(
        KeyError, match=r"unknown key.*layer9\.0\.conv1\.weight.*missing key.*layer2\.1\.acon1\.p2"
    ):
        models.convert_official_state_dict({"state_dict": sd}, "resnet18", "acon_c")


def test_wrong_activation_gives_hint():
    ckpt = _released(_reference("resnet18", "acon_c")[0])
    with pytest.raises(KeyError, match="activation"):
        models.convert_official_state_dict(ckpt, "resnet18", "relu")


def test_shape_mismatch_is_listed():
    """A Meta-ACON 0.5x checkpoint must use r=8: a converter built with r=16 sees other fc1 shapes."""
    ckpt = _released(_reference("shufflenetv2_x0_5", "meta_acon")[0])
    with pytest.raises(ValueError, match=r"first_conv\.2\.fc1\.weight"):
        models.convert_official_state_dict(ckpt, "shufflenetv2_x0_5", "meta_acon", act_kwargs={"r": 16})


def test_plain_state_dict_and_old_checkpoints_without_num_batches_tracked():
    ref, x = _reference("resnet18", "relu")
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    out = models.convert_official_state_dict(sd, "resnet18", "relu")
    ours = models.create_model("resnet18").eval()
    ours.load_state_dict(out)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)


def test_megvii_checkpoint_needs_megvii_variant():
    sd = models.create_model("shufflenetv2_x0_5", variant="megvii").state_dict()
    with pytest.raises(KeyError, match="variant='megvii'"):
        models.convert_official_state_dict(sd, "shufflenetv2_x0_5", "relu")
    assert len(models.convert_official_state_dict(sd, "shufflenetv2_x0_5", "relu", variant="megvii")) == len(
        sd
    )


def test_unwrap_rejects_non_mappings():
    with pytest.raises(TypeError, match="state_dict"):
        unwrap_state_dict({"state_dict": [1, 2]})
    assert OFFICIAL_INPUT["channel_order"] == "BGR" and OFFICIAL_INPUT["scale"] == 255.0


def test_convert_script(tmp_path):
    script = load_script("convert_official_checkpoint")
    ref, x = _reference("shufflenetv2_x0_5", "meta_acon")
    src, dst = tmp_path / "released.pth.tar", tmp_path / "converted.pth"
    torch.save(_released(ref), src)
    assert script.main([str(src), str(dst), "--model", "shufflenetv2_x0_5"]) == 0
    saved = torch.load(dst, weights_only=True)
    assert saved["model"] == "shufflenetv2_x0_5" and saved["activation"] == "meta_acon"
    ours = models.create_model("shufflenetv2_x0_5", saved["activation"]).eval()
    ours.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-4)
    loaded = models.load_official_checkpoint(str(src), "shufflenetv2_x0_5").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x), rtol=0, atol=1e-4)
