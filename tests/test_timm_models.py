"""Our acon_* models as timm models: the protocol timm's tools use, and the authors' weights through timm."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.models import FeatureListNet, get_notrace_functions, get_notrace_modules
from timm.models._manipulate import group_parameters

import models
import models.timm_models as tm
from acon import AconC, AconFReLU, MetaAconC
from acon.data.transforms import val_transform
from tests.official_reference import RefShuffleNetV2, RefTFNet

X = torch.randn(2, 3, 64, 64)


# one model per family, with its default activation (ACON-C, TFNet's own ACON-FReLU)
FAMILY_MODELS = {
    "acon_resnet18": AconC,
    "acon_shufflenetv2_x0_5": AconC,
    "acon_tfnet_x0_5": AconFReLU,
    "acon_mobilenetv2_x0_17": AconC,
    "acon_mobilenetv1_x0_25": AconC,
}


@pytest.mark.parametrize("name,default_act", FAMILY_MODELS.items())
def test_head_and_classifier_protocol(name, default_act, one_thread):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=7).eval()
    assert any(isinstance(mm, default_act) for mm in m.modules())
    feats = m.forward_features(X)
    assert feats.shape[1] == m.num_features == m.head_hidden_size and feats.shape[-1] == 2
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.head_hidden_size) and m(X).shape == (2, 7)
    assert m.get_classifier().out_features == 7
    m.reset_classifier(0)
    assert m.num_classes == 0 and m(X).shape == pre.shape
    m.reset_classifier(0, "")
    assert m(X).shape == feats.shape
    m.reset_classifier(3, "max")
    assert m(X).shape == (2, 3) and not m.get_classifier().training  # new head follows the model's mode
    groups = group_parameters(m, m.group_matcher(coarse=False))
    assert len(groups) > 2 and len(group_parameters(m, m.group_matcher(coarse=True))) > 2
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model(name, not_a_model_arg=1)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_intermediates_pruning_and_grad_checkpointing(name, one_thread):
    torch.manual_seed(0)
    m = timm.create_model(name, activation="meta_acon", drop_rate=0.1).eval()
    assert isinstance(next(mm for mm in m.modules() if isinstance(mm, MetaAconC)), MetaAconC)
    with torch.no_grad():
        final, inter = m.forward_intermediates(X)
        torch.testing.assert_close(final, m.forward_features(X))
        info = m.feature_info
        assert [t.shape[1] for t in inter] == [f["num_chs"] for f in info]
        assert [64 // t.shape[-1] for t in inter] == [f["reduction"] for f in info]
        early = m.forward_intermediates(X, indices=[2], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[2])
        ref = m(X)
        m.set_grad_checkpointing()
        torch.testing.assert_close(m(X), ref)
        assert m.prune_intermediate_layers([2]) == [2]
        torch.testing.assert_close(m.forward_features(X), inter[2])
    m.train()(X).sum().backward()


def test_features_only_through_timm_wrapper_and_in_chans(one_thread):
    f = timm.create_model("acon_shufflenetv2_x0_5", features_only=True, out_indices=(1, 2, 4))
    assert isinstance(f, FeatureListNet) and f.feature_info.channels() == [48, 96, 1024]
    assert [o.shape[-1] for o in f(X)] == [8, 4, 2]
    one = timm.create_model("acon_resnet18", in_chans=1, num_classes=0).eval()
    assert one.in_chans == 1 and one(torch.randn(1, 1, 32, 32)).shape == (1, 512)


@pytest.mark.parametrize(
    "name,channels",
    [
        ("acon_tfnet_x0_5", [8, 16, 32, 64, 128]),  # stem, then the four stages (each doubles)
        ("acon_mobilenetv2_x1_0", [16, 24, 32, 96, 1280]),  # timm's taps; the last with the last conv
        ("acon_mobilenetv1_x0_25", [16, 32, 64, 128, 256]),
    ],
)
def test_features_only_and_in_chans_of_the_tfnet_table_models(name, channels, one_thread):
    f = timm.create_model(name, features_only=True, in_chans=1)
    assert isinstance(f, FeatureListNet) and f.feature_info.channels() == channels
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    out = f(torch.randn(1, 1, 64, 64))
    assert [o.shape[1] for o in out] == channels and [o.shape[-1] for o in out] == [32, 16, 8, 4, 2]


@pytest.mark.slow  # timm's own suite scripts and FX-traces every acon_* model too
@pytest.mark.parametrize("name,act", [("acon_shufflenetv2_x0_5", AconC), ("acon_tfnet_x0_5", AconFReLU)])
def test_torchscript_and_fx_keep_the_acon_modules_whole(name, act, one_thread):
    with timm.set_scriptable(True):
        m = timm.create_model(name, act_kwargs={"impl": "reference"} if act is AconC else None).eval()
    scripted = torch.jit.script(m)
    with torch.no_grad():
        torch.testing.assert_close(scripted(X), m(X), rtol=1e-5, atol=1e-5)
    assert {AconC, MetaAconC, AconFReLU} <= set(get_notrace_modules())
    from torchvision.models.feature_extraction import create_feature_extractor

    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    fx = create_feature_extractor(m, return_nodes=["conv_last.2"], tracer_kwargs=kw)
    assert "conv_last.2" in dict(fx.named_modules()) and isinstance(fx.get_submodule("conv_last.2"), act)
    with torch.no_grad():  # the traced graph scripts too (timm's test_model_forward_fx_torchscript)
        torch.testing.assert_close(torch.jit.script(fx)(X)["conv_last.2"], m.forward_features(X))


def test_data_config_is_our_evaluation_transform(tmp_path):
    m = timm.create_model("acon_resnet18")
    cfg = resolve_model_data_config(m)
    assert (
        cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.875 and cfg["input_size"] == (3, 224, 224)
    )
    img = Image.fromarray(torch.randint(0, 255, (300, 260, 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(create_transform(**cfg)(img), val_transform(224, 256)(img), rtol=0, atol=1e-5)


RELEASED = {  # timm tag: (our name, activation, the authors' network re-stated)
    "acon_shufflenetv2_x0_5.megvii_in1k": (
        "shufflenetv2_x0_5",
        "acon_c",
        lambda: RefShuffleNetV2("0.5x", kind="acon", n_class=1000),
    ),
    "acon_tfnet_x0_5.megvii_in1k": ("tfnet_x0_5", "acon_frelu", lambda: RefTFNet(0.5)),
}


def _authors_checkpoint(path, make_ref):
    torch.manual_seed(0)
    ref = make_ref().eval()
    for mod in ref.modules():  # non-trivial BN statistics, as in a trained checkpoint
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    return ref


@pytest.mark.parametrize("name", RELEASED)
def test_megvii_tag_loads_the_authors_checkpoint_like_eval_py(name, tmp_path, one_thread):
    ours_name, activation, make_ref = RELEASED[name]
    path = tmp_path / "released.pth.tar"
    ref = _authors_checkpoint(path, make_ref)
    m = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    # eval.py's path: the same converter, the weights as released, BGR 0-255 input
    ours = models.create_model(ours_name, activation=activation).eval()
    state = torch.load(path, weights_only=True)
    ours.load_state_dict(models.convert_official_state_dict(state, ours_name, activation))
    # short side already 256: the resize is a no-op in both pipelines (eval.py resizes like the authors'
    # OpenCV code, without antialiasing, which timm's transforms do not offer)
    img = Image.fromarray(torch.randint(0, 255, (256, 300, 3), dtype=torch.uint8).numpy())
    x_timm = create_transform(**resolve_model_data_config(m))(img)[None]  # RGB, 0-255 by std=1/255
    x_eval = val_transform(224, 256, preprocess="bgr_255")(img)[None]
    torch.testing.assert_close(x_timm.flip(1), x_eval, rtol=0, atol=1e-3)
    with torch.no_grad():
        expected = ref(x_eval)
        torch.testing.assert_close(ours(x_eval), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(x_timm), expected, rtol=1e-4, atol=1e-4)
    assert "BGR" in m.pretrained_cfg["notes"][0] and m.pretrained_cfg["std"] == (1 / 255,) * 3
    assert activation in m.pretrained_cfg["notes"][0]
    adapted = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=5
    )
    assert adapted.get_classifier().out_features == 5


def test_pretrained_without_a_file_and_tag_activations():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model("acon_resnet50.megvii_meta_in1k", pretrained=True)
    meta = timm.create_model("acon_resnet50.megvii_meta_in1k", device="meta")
    assert isinstance(meta.layer1[0].acon, MetaAconC) and next(meta.parameters()).is_meta
    assert set(timm.list_models("acon_*", pretrained=False)) == set(tm.TIMM_NAMES)
    tags = timm.list_models("acon_*", include_tags=True)
    assert {"acon_shufflenetv2_x1_5.megvii_meta_in1k", "acon_tfnet_x2_0.megvii_in1k"} <= set(tags)
    tfnet = timm.create_model("acon_tfnet_x1_0.megvii_in1k", device="meta")
    assert isinstance(tfnet.features[0].acon, AconFReLU)


@pytest.mark.slow
def test_torch_compile_accepts_the_fused_op(one_thread):
    m = timm.create_model("acon_shufflenetv2_x0_5", activation="meta_acon").eval()
    compiled = torch.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(compiled(X), m(X), rtol=1e-4, atol=1e-4)
