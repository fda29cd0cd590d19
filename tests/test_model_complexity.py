"""Golden complexity tests: exact params/MACs for every model x activation, and the paper's table."""

import functools

import pytest
import torch
from conftest import load_script
from torch import nn

import models
from acon import AconC, MetaAconC, Swish
from models.complexity import count_bn_params
from models.golden import ACTIVATIONS, ALT_VARIANT, EXACT, LIGHT_EXACT, PAPER, WELL_KNOWN
from models.shufflenetv2 import STAGE_REPEATS, WIDTHS

# The families with a second (bias-free) variant; TFNet and the MobileNets are in test_model_complexity_light.
CORE = [n for n in models.list_models() if models.get_entry(n).family in ALT_VARIANT]
ALL = [(n, a) for n in CORE for a in ACTIVATIONS]


@functools.cache
def _meta_model(name: str, activation: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return models.create_model(name, activation, **kw)


def _alt(name: str) -> dict:
    return {"variant": ALT_VARIANT[models.get_entry(name).family]}


def test_golden_table_covers_every_model_and_activation():
    assert sorted(EXACT) == sorted(CORE)
    assert sorted([*EXACT, *LIGHT_EXACT]) == sorted(models.list_models())
    assert all(sorted(v) == sorted(ACTIVATIONS) for v in EXACT.values())


@pytest.mark.parametrize("name,activation", ALL)
def test_exact_params_default_variant(name, activation):
    m = _meta_model(name, activation)
    assert models.count_params(m) == EXACT[name][activation].params
    assert count_bn_params(m) == EXACT[name][activation].bn_params


# Default run: every ReLU model, plus each learnable activation on one small model per family (meta_acon
# also on resnet50); the full grid is in the slow run (the meta-device pass costs ~0.5 s per model).
_MACS_DEFAULT = [(n, "relu") for n in CORE] + [("resnet50", "meta_acon")]
_MACS_DEFAULT += [(n, a) for n in ("shufflenetv2_x0_5", "resnet18") for a in ("swish", "acon_c", "meta_acon")]


@pytest.mark.parametrize("name,activation", _MACS_DEFAULT)
def test_exact_macs_default_variant(name, activation):
    assert models.count_flops(_meta_model(name, activation)) == EXACT[name][activation].macs


@pytest.mark.slow
@pytest.mark.parametrize("name,activation", [p for p in ALL if p not in _MACS_DEFAULT])
def test_exact_macs_default_variant_slow(name, activation):
    assert models.count_flops(_meta_model(name, activation)) == EXACT[name][activation].macs


_ALT_DEFAULT = [(n, "relu") for n in CORE] + [(n, "meta_acon") for n in PAPER]


@pytest.mark.parametrize("name,activation", _ALT_DEFAULT)
def test_exact_params_alternative_variant(name, activation):
    """The bias-free variant: the basis of the paper-convention params (MACs: relu below, rest slow)."""
    m = _meta_model(name, activation, **_alt(name))
    assert models.count_params(m) == EXACT[name][activation].alt_params
    assert count_bn_params(m) == EXACT[name][activation].bn_params


@pytest.mark.parametrize("name", CORE)
def test_exact_macs_alternative_variant(name):
    assert models.count_flops(_meta_model(name, "relu", **_alt(name))) == EXACT[name]["relu"].alt_macs


@pytest.mark.slow
@pytest.mark.parametrize("name,activation", ALL)
def test_exact_counts_alternative_variant_slow(name, activation):
    m = _meta_model(name, activation, **_alt(name))
    golden = EXACT[name][activation]
    assert (models.count_params(m), models.count_flops(m)) == (golden.alt_params, golden.alt_macs)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_table(name):
    row, golden = PAPER[name], EXACT[name]
    assert row["flops"].matches(golden["relu"].paper_flops), (name, golden["relu"].paper_flops)
    assert row["params"].matches(golden["relu"].paper_params), (name, golden["relu"].paper_params)
    assert row["params_meta_acon"].matches(golden["meta_acon"].paper_params)
    for act in ("swish", "acon_c"):  # one printed number for ReLU / Swish / ACON-C
        assert 0 < golden[act].paper_params - golden["relu"].paper_params < row["params"].unit
    assert golden["meta_acon"].macs - golden["relu"].macs < row["flops"].unit


@pytest.mark.parametrize("name", sorted(WELL_KNOWN))
def test_well_known_relu_counts(name):
    row, golden = WELL_KNOWN[name], EXACT[name]["relu"]
    assert row["flops"].matches(golden.paper_flops) and row["params"].matches(golden.paper_params)


def test_published_rounding_is_strict():
    from models.golden import Published

    assert Published("3.9G").matches(3_857_973_248) and not Published("3.8G").matches(3_857_973_248)
    assert not Published("41M").matches(40_476_448) and Published("41M", "up").matches(40_476_448)
    assert not Published("60.0M").matches(60_117_096)  # the conv-bias variant counts 60.1M


def test_paper_convention_equals_direct_count():
    """paper_params is the bias-free variant minus BN affine params, counted directly here."""
    m = _meta_model("resnet50", "meta_acon", variant="torchvision")
    direct = sum(
        p.numel()
        for mod in m.modules()
        if not isinstance(mod, nn.BatchNorm2d)
        for p in mod._parameters.values()
        if p is not None
    )
    assert direct == EXACT["resnet50"]["meta_acon"].paper_params


def test_resnet_torchvision_variant_matches_torchvision_counts():
    import torchvision

    with torch.device("meta"):
        tv = torchvision.models.resnet50()
    golden = EXACT["resnet50"]["relu"]
    assert (golden.alt_params, golden.alt_macs) == (models.count_params(tv), models.count_flops(tv))


def test_count_flops_matches_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))
    assert models.count_flops(net, img_size=32) == 8 * 16 * 16 * 27 + 8 * 16 * 16 * 10
    assert models.count_flops(nn.DataParallel(net), img_size=32) == 8 * 16 * 16 * 27 + 8 * 16 * 16 * 10
    assert net.training  # the mode is restored
    assert models.count_params(net) == 8 * 27 + 8 + 8 * 256 * 10 + 10


def _shufflenet_sites(width: str) -> list[int]:
    c = WIDTHS[width]
    sites, in_chs = [c[0]], c[0]
    for repeats, out in zip(STAGE_REPEATS, c[1:4], strict=True):
        sites += [out // 2, out - in_chs, in_chs]  # stride-2 block: main pw, main out, projection
        sites += [out // 2, out // 2] * (repeats - 1)
        in_chs = out
    return sites + [c[4]]


_RESNET_PLANES = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}


def _resnet_sites(name: str, placement: str = "paper") -> list[int]:
    bottleneck, layers = _RESNET_PLANES[name]
    sites = [64] if placement == "all" else []
    for planes, n in zip((64, 128, 256, 512), layers, strict=True):
        if bottleneck:
            sites += ([planes, planes, 4 * planes] if placement == "all" else [planes]) * n
        else:
            sites += [planes, planes] * n
    return sites


def _expected_sites(name: str) -> list[int]:
    if name.startswith("shufflenetv2_x"):
        return _shufflenet_sites(name[len("shufflenetv2_x") :].replace("_", ".") + "x")
    return _resnet_sites(name)


def _meta_acon_params(c: int, r: int) -> int:
    h = max(r, c // r)
    return (c * h + h) + 2 * h + (h * c + c) + 2 * c + 2 * c  # fc1, bn1, fc2, bn2, p1 and p2


@pytest.mark.parametrize("name", CORE)
def test_acon_sites_add_3c_parameters(name):
    sites = _expected_sites(name)
    relu = EXACT[name]["relu"].params
    assert EXACT[name]["acon_c"].params - relu == 3 * sum(sites)
    assert EXACT[name]["swish"].params - relu == sum(sites)
    r = models.get_entry(name).meta_acon_r
    assert EXACT[name]["meta_acon"].params - relu == sum(_meta_acon_params(c, r) for c in sites)
    found = models.activation_sites(_meta_model(name, "acon_c"))
    assert all(isinstance(m, AconC) for m in found.values())
    assert sorted(m.channels for m in found.values()) == sorted(sites)


def test_resnet_paper_placement_names():
    found = models.activation_sites(_meta_model("resnet50", "acon_c"))
    assert found and all(k.endswith(".acon") for k in found)
    found = models.activation_sites(_meta_model("resnet18", "acon_c"))
    assert {k.rsplit(".", 1)[1] for k in found} == {"acon1", "acon2"}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_all_placement_sites(name):
    m = _meta_model(name, "swish", act_placement="all")
    sites = models.activation_sites(m)
    assert sorted(s.beta.shape[1] for s in sites.values()) == sorted(_resnet_sites(name, "all"))
    assert isinstance(m.act1, Swish)


@pytest.mark.parametrize("name,r", [("shufflenetv2_x0_5", 8), ("shufflenetv2_x1_5", 16), ("resnet50", 16)])
def test_meta_acon_r(name, r):
    sites = models.activation_sites(_meta_model(name, "meta_acon"))
    assert {m.r for m in sites.values()} == {r}
    with torch.device("meta"):
        m = models.create_model(name, "meta_acon", act_kwargs={"r": 4})
        n = models.create_model(name, functools.partial(MetaAconC, r=2))
    assert {s.r for s in models.activation_sites(m).values()} == {4}
    assert {s.r for s in models.activation_sites(n).values()} == {2}


def test_model_table_script_prints_golden_numbers(capsys):
    script = load_script("model_table")
    assert script.main([]) == 0
    out = capsys.readouterr().out
    assert "| resnet50 | 3.858G | 25.584M |" in out
    assert "| resnet152 | 11.3G / 11.282G | 60.0M / 60.041M | 60.5M / 60.510M |" in out
    assert all(f"| {n} " in out for n in models.list_models())
