"""The activations beyond the paper's (GELU, Mish, Hard-Swish, PReLU, SiLU, CELU, FReLU): factory, configs,
every model family, convert_activations on a timm model, the digits proxy, golden counts and the tables."""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CONFIGS, compose
from hydra.utils import instantiate
from torch import nn

import models
from acon import AconFReLU, FReLU, convert_activations, create_activation, resolve_activation
from acon.params import param_groups
from acon.table_hparams import write_hparams
from acon.table_render import to_markdown
from acon.tables import ADDED_ACTIVATIONS, PAPER_ACTIVATIONS, Run, build_cells
from models.golden import EXACT, FRELU_EXACT, LIGHT_EXACT, PARAMETER_FREE_ADDED

ADDED = ("gelu", "mish", "hard_swish", "prelu", "silu", "celu", "frelu")
# name -> the function the module computes (PReLU: at its initial slope 0.25)
REFERENCE = {
    "gelu": F.gelu,
    "mish": F.mish,
    "hard_swish": F.hardswish,
    "silu": F.silu,
    "celu": F.celu,
    "prelu": lambda x: F.prelu(x, torch.full((x.shape[1],), 0.25)),
}


def test_the_table_order_lists_exactly_the_added_configs():
    assert sorted(ADDED_ACTIVATIONS) == sorted(ADDED)
    assert set(ADDED) <= {p.stem for p in (CONFIGS / "activation").glob("*.yaml")}
    assert not set(ADDED) & set(PAPER_ACTIVATIONS)


@pytest.mark.parametrize("name", ADDED)
def test_factory_name_and_config_build_the_same_module(name):
    x = torch.randn(2, 6, 5, 5)
    by_name = create_activation(name, 6)
    by_config = create_activation(instantiate(compose([f"activation={name}"]).activation.layer), 6)
    assert type(by_name) is type(by_config)
    assert by_name.__module__.startswith(("torch.nn", "timm.layers", "acon.frelu"))
    if name in REFERENCE:
        torch.testing.assert_close(by_name(x), REFERENCE[name](x))
    assert by_name(x).shape == x.shape
    assert resolve_activation(name.upper().replace("_", "-")) is resolve_activation(name)


def test_prelu_is_per_channel_and_never_weight_decayed():
    act = create_activation("prelu", 7)
    assert isinstance(act, nn.PReLU) and act.num_parameters == 7
    model = nn.Sequential(nn.Conv2d(3, 7, 3), act)
    decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert id(act.weight) not in decayed and id(model[0].weight) in decayed


def test_frelu_is_the_funnel_maximum_and_acon_frelu_shares_its_funnel():
    torch.manual_seed(0)
    act = FReLU(4).train()
    x = torch.randn(3, 4, 6, 6)
    funnel = F.batch_norm(act.conv_frelu(x), None, None, act.bn1.weight, act.bn1.bias, training=True)
    torch.testing.assert_close(act(x), torch.maximum(x, funnel))
    down = FReLU(4, stride=2).eval()
    assert down(x).shape == (3, 4, 3, 3)
    assert isinstance(AconFReLU(4), FReLU) and {k for k, _ in AconFReLU(4).named_children()} == {
        "conv_frelu",
        "bn1",
        "maxpool",
        "bn2",
    }
    with pytest.raises(ValueError, match=r"FReLU needs \(N, C, H, W\)"):
        act(torch.randn(3, 4))


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "resnet18", "mobilenetv2_x0_17", "tfnet_x0_5"])
def test_every_family_builds_and_runs_each_added_activation(name):
    """One forward per family on 32 px for GELU, PReLU and FReLU; the module sits at the activation sites."""
    x = torch.randn(2, 3, 32, 32)
    kinds = {"prelu": nn.PReLU, "frelu": FReLU, "gelu": type(create_activation("gelu", 1))}
    for act in ("gelu", "prelu", "frelu"):  # the other parameter-free ones take GELU's path (timm)
        torch.manual_seed(0)
        model = models.create_model(name, act, num_classes=5, small_input=True).eval()
        assert model(x).shape == (2, 5), (name, act)
        if act in kinds:
            assert any(isinstance(m, kinds[act]) for m in model.modules()), (name, act)
    tf = models.create_model("tfnet_x0_5", "frelu", small_input=True)
    assert {m.stride for m in tf.modules() if isinstance(m, FReLU)} == {1, 2}  # stride-2 sites are FReLU's


@functools.cache
def _meta_model(name: str, activation: str) -> nn.Module:
    with torch.device("meta"):
        return models.create_model(name, activation)


def _counts(name: str, activation: str) -> tuple[int, int]:
    """(params, BatchNorm affine params) of the 224 px, 1000-class model."""
    from models.complexity import count_bn_params

    m = _meta_model(name, activation)
    return models.count_params(m), count_bn_params(m)


@pytest.mark.parametrize(
    "name", ["shufflenetv2_x0_5", "resnet18", pytest.param("resnet50", marks=pytest.mark.slow)]
)
def test_golden_params_of_the_added_activations(name):
    relu = EXACT[name]["relu"]
    for act in PARAMETER_FREE_ADDED:
        assert _counts(name, act) == (relu.params, relu.bn_params), act
    assert _counts(name, "prelu") == (EXACT[name]["swish"].params, relu.bn_params)
    params, macs, bn = FRELU_EXACT[name]
    assert _counts(name, "frelu") == (params, bn)


# Default run: FReLU's MACs (the only added activation with any) on ShuffleNetV2 0.5x; the rest: -m slow.
@pytest.mark.parametrize(
    "name,activation",
    [("shufflenetv2_x0_5", "frelu")]
    + [
        pytest.param(n, a, marks=pytest.mark.slow)
        for n in FRELU_EXACT
        for a in ("frelu", "prelu", *PARAMETER_FREE_ADDED)
        if (n, a) != ("shufflenetv2_x0_5", "frelu")
    ],
)
def test_golden_macs_of_the_added_activations(name, activation):
    want = FRELU_EXACT[name][1] if activation == "frelu" else EXACT[name]["relu"].macs
    assert models.count_flops(_meta_model(name, activation)) == want


def test_tfnet_frelu_is_acon_frelu_without_its_last_batchnorm():
    acon_frelu = LIGHT_EXACT["tfnet_x0_5"]["acon_frelu"]
    params, bn = _counts("tfnet_x0_5", "frelu")
    assert models.count_flops(_meta_model("tfnet_x0_5", "frelu")) == acon_frelu.macs
    assert acon_frelu.params - params == acon_frelu.bn_params - bn > 0


@pytest.mark.parametrize("name", ADDED)
def test_converted_timm_model_trains_a_step(name):
    """convert_activations puts the activation at every ReLU site of a timm ResNet; forward + backward."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    layer = instantiate(compose([f"activation={name}"]).activation.layer)  # what model=timm converts with
    model = convert_activations(model, layer, example_input=torch.randn(1, 3, 32, 32))
    report = model.acon_conversion
    assert sum(report.converted.values()) >= relus > 0
    assert report.activation == type(create_activation(name, 1)).__name__
    assert not any(type(m) is nn.ReLU for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model.train()(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    own = [p for m in model.modules() if isinstance(m, nn.PReLU | FReLU) for p in m.parameters()]
    assert bool(own) == (name in ("prelu", "frelu"))
    assert all(p.grad is not None for p in own)
    before = [p.detach().clone() for p in own]
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not own or any(not torch.equal(b, p) for b, p in zip(before, own, strict=True))
    assert torch.isfinite(loss)


def _train_digits(name: str, tmp_path: Path) -> dict:
    from acon.checkpoint import load_checkpoint
    from acon.trainer import train

    out = tmp_path / "runs"
    cfg = compose(
        ["experiment=proxy_digits", f"activation={name}", f"out_dir={out}", "trainer.max_steps=2"]
        + ["recipe.batch_size=16", "recipe.base_batch_size=16"]
    )
    assert train(cfg) is None  # stopped at max_steps
    state = load_checkpoint(out / cfg.run_name / "last.pt")
    assert state["progress"]["step"] == 2 and state["identity"]["activation"]["name"] == name
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    return state["model"]


# The default suite trains FReLU (a module with a conv and a BatchNorm of its own); the rest: -m slow.
@pytest.mark.parametrize(
    "name", ["frelu"] + [pytest.param(n, marks=pytest.mark.slow) for n in ADDED if n != "frelu"]
)
def test_digits_proxy_trains_two_steps(name, tmp_path):
    weights = _train_digits(name, tmp_path)
    if name == "frelu":
        tracked = [
            v for k, v in weights.items() if k.endswith("bn1.num_batches_tracked") and ".acon" not in k
        ]
        assert tracked and all(int(v) == 2 for v in tracked)  # the funnel's BatchNorm saw both steps
    if name == "prelu":
        slopes = [v for k, v in weights.items() if v.dim() == 1 and k.endswith(".weight") and "bn" not in k]
        assert slopes and any(not torch.all(s == 0.25) for s in slopes)  # the per-channel slopes trained


def _run(activation: str, seed: int, err: float, tmp_path: Path) -> Run:
    path = tmp_path / f"digits-net-{activation}-s{seed}"
    return Run(path, "digits", "net", activation, seed, err, float("nan"), {"name": "digits"}, {})


def test_tables_list_the_added_activations_after_the_paper_ones_with_delta_vs_relu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acts = [
        "frelu",
        "gelu",
        "relu",
        "meta_acon",
        "prelu",
        "swish",
        "celu",
        "acon_c",
        "mish",
        "silu",
        "hard_swish",
    ]
    runs = [_run(a, s, 10.0 + i + s, tmp_path) for i, a in enumerate(acts) for s in (0, 1)]
    table = to_markdown(build_cells(runs, paper={}))
    head, _, ours, delta = table.splitlines()[:4]
    labels = "ReLU | Swish | ACON-C | Meta-ACON | SiLU | GELU | Mish | Hard-Swish | CELU | PReLU | FReLU"
    assert head == f"| model |  | {labels} |"
    order = [
        "relu",
        "swish",
        "acon_c",
        "meta_acon",
        "silu",
        "gelu",
        "mish",
        "hard_swish",
        "celu",
        "prelu",
        "frelu",
    ]
    relu = 10.0 + acts.index("relu") + 0.5
    want = [(10.0 + acts.index(a) + 0.5) - relu for a in order[1:]]
    assert delta == "| | Δ vs ReLU | — | " + " | ".join(f"{d:+.2f}".replace("-", "−") for d in want) + " |"
    assert ours.count("(n=2)") == 11
    out = write_hparams(runs, tmp_path / "hparams")
    seen = set()
    for session in out:
        ea = EventAccumulator(str(session))
        ea.Reload()
        content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        seen.add(info.hparams["activation"].string_value)
    assert seen == set(acts)


def test_proxy_table_in_docs_lists_every_added_activation():
    table = (CONFIGS.parent / "docs" / "proxy" / "table.csv").read_text()
    with_delta = {r["activation"] for r in csv.DictReader(io.StringIO(table)) if r["delta_relu"]}
    assert with_delta == {"swish", "acon_c", "meta_acon", *ADDED}


@pytest.mark.parametrize("name", ["frelu", pytest.param("prelu", marks=pytest.mark.slow)])
def test_transfer_backbone_dilates_and_freezes_the_added_activation(name):
    """A detection/segmentation body at output stride 8 (FReLU's funnel is dilated with the stage), and
    backbone.freeze_acon freezes the activation's own parameters (PReLU slopes, the FReLU funnel)."""
    from acon.tasks.backbone import build_backbone

    cfg = compose(["model=resnet18", f"activation={name}", "backbone.freeze_acon=true"])
    body = build_backbone(cfg, (1, 2, 3, 4), 8)
    feats = body(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]
    own = [p for m in body.modules() if isinstance(m, nn.PReLU | FReLU) for p in m.parameters()]
    assert own and not any(p.requires_grad for p in own)
    assert any(p.requires_grad for p in body.parameters())
