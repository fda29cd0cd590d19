"""One experiment file per cell of the paper's table: it composes, builds, trains, and quotes the paper."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CONFIGS, compose, tiny_overrides

from acon.activations import AconC, MetaAconC, Swish
from acon.frelu import AconFReLU
from acon.tables import load_paper_results

MODELS = (
    "shufflenetv2_x0_5",
    "shufflenetv2_x1_0",
    "shufflenetv2_x1_5",
    "shufflenetv2_x2_0",
    "resnet18",
    "resnet50",
    "resnet101",
    "resnet152",
)
ACTIVATIONS = ("relu", "swish", "acon_c", "meta_acon")
# experiment name -> (model config, activation): the paper's table, the TFNet table (TFNet and its
# MobileNetV2 baselines), the abstract's MobileNet-0.25 and the SENet comparison (ReLU + SE).
CELL_SPECS = {f"{m}_{a}": (m, a) for m in MODELS for a in ACTIVATIONS}
CELL_SPECS |= {f"tfnet_x{w}_acon_frelu": (f"tfnet_x{w}", "acon_frelu") for w in ("0_5", "1_0", "1_5", "2_0")}
CELL_SPECS |= {f"mobilenetv2_x{w}_relu": (f"mobilenetv2_x{w}", "relu") for w in ("0_17", "0_6", "1_0", "1_4")}
CELL_SPECS |= {f"mobilenetv1_x0_25_{a}": ("mobilenetv1_x0_25", a) for a in ("relu", "acon_c", "meta_acon")}
CELL_SPECS |= {
    f"{m}_relu_se": (f"{m}_se", "relu") for m in ("shufflenetv2_x0_5", "shufflenetv2_x1_5", "resnet50")
}
CELLS = list(CELL_SPECS)
ACT_MODULE = {"swish": Swish, "acon_c": AconC, "meta_acon": MetaAconC, "acon_frelu": AconFReLU}
# Extension table (not in the paper): other libraries' classifiers with their activations converted.
EXT_MODELS = {
    "ext_mobilenetv2_100": ("torchvision", "mobilenet_v2"),
    "ext_efficientnet_b0": ("timm", "efficientnet_b0"),
}
EXT_ACTIVATIONS = ("relu", "acon_c", "meta_acon")  # relu: the model's own activation (ReLU6 / SiLU)
EXTENSIONS = [f"{m}_{a}" for m in EXT_MODELS for a in EXT_ACTIVATIONS]
# One 2-step training per family and activation by default; every cell under -m slow.
REPRESENTATIVE = ["shufflenetv2_x0_5_meta_acon", "resnet18_acon_c", "resnet50_swish", "resnet50_relu"]
REPRESENTATIVE += ["tfnet_x0_5_acon_frelu"]


def header(name: str) -> dict[str, str]:
    """The ``# Key: value`` lines at the top of an experiment file."""
    out = {}
    for line in (CONFIGS / "experiment" / f"{name}.yaml").read_text().splitlines():
        m = re.match(r"#\s*([A-Za-z][\w\- ()%]*?):\s*(.*)$", line)
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def test_every_cell_has_a_file_and_nothing_else_is_unexpected():
    files = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert set(CELLS) <= files, sorted(set(CELLS) - files)
    assert files - set(CELLS) == {"proxy_digits", "proxy_tfnet_digits", *EXTENSIONS}


@pytest.mark.parametrize("name", EXTENSIONS)
def test_extension_header_is_marked_and_has_no_paper_number(name):
    # The paper-cell rule, adapted: an extension states command, hardware and hours like every cell, says
    # it is an extension, and quotes no paper number (the paper has none for these models).
    h = header(name)
    assert f"experiment={name}" in h["Command"] and "train.py" in h["Command"]
    assert "A100" in h["Hardware"] or "H100" in h["Hardware"]
    assert re.match(r"\d+(\.\d+)? ", h["Expected GPU-hours"]) and "estimate" in h["Expected GPU-hours"]
    assert h["Extension"].startswith("yes") and "no paper number" in h["Extension"]
    assert h["Paper top-1 error (%)"] == ""
    assert not any(name.startswith(m) for m, _ in load_paper_results())


@pytest.mark.parametrize(
    "name",
    [
        n if n == "ext_efficientnet_b0_meta_acon" else pytest.param(n, marks=pytest.mark.slow)
        for n in EXTENSIONS
    ],
)
def test_extension_composes_and_builds_the_converted_model(name):
    from acon.builders import build_model

    cfg = compose([f"experiment={name}"])
    model_key, act = next((m, a) for m in EXT_MODELS for a in EXT_ACTIVATIONS if f"{m}_{a}" == name)
    arch, lib_name = EXT_MODELS[model_key]
    assert cfg.model.arch == arch and cfg.activation.name == act and cfg.data.num_classes == 1000
    with torch.device("meta"):
        net = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
    kinds = {type(m) for m in net.modules()}
    assert (AconC in kinds) == (act == "acon_c") and (MetaAconC in kinds) == (act == "meta_acon")
    native = torch.nn.ReLU6 if arch == "torchvision" else torch.nn.SiLU
    assert (native in kinds) == (act == "relu")  # converted at every site, or left as it was


@pytest.mark.parametrize("name", CELLS)
def test_experiment_header_states_command_hardware_hours_and_paper_value(name):
    h = header(name)
    assert f"experiment={name}" in h["Command"] and "train.py" in h["Command"]
    assert "A100" in h["Hardware"] or "H100" in h["Hardware"]
    hours = h["Expected GPU-hours"]
    assert re.match(r"\d+(\.\d+)? ", hours) and "estimate" in hours
    paper = load_paper_results()
    model, act = CELL_SPECS[name]
    quoted = h["Paper top-1 error (%)"]
    if (model, act) in paper:
        assert float(quoted) == paper[(model, act)]
    else:
        assert quoted == "", f"{name}: the paper does not publish this cell; the header must stay empty"


def test_paper_data_file_holds_exactly_the_published_cells():
    paper = load_paper_results()
    assert len(paper) == 30
    assert paper[("shufflenetv2_x0_5", "meta_acon")] == 34.8
    assert paper[("resnet152", "relu")] == 22.3
    assert all((m, a) in paper for m in ("resnet50", "resnet101", "resnet152") for a in ACTIVATIONS)
    assert not any(m == "resnet18" or m.startswith("mobilenetv1") or m.endswith("_se") for m, _ in paper)
    # the TFNet table: TFNet, MobileNetV2 and ShuffleNetV2 (ReLU) at four sizes each
    tfnet = [paper[(f"tfnet_x{w}", "acon_frelu")] for w in ("0_5", "1_0", "1_5", "2_0")]
    mbv2 = [paper[(f"mobilenetv2_x{w}", "relu")] for w in ("0_17", "0_6", "1_0", "1_4")]
    snet = [paper[(f"shufflenetv2_x{w}", "relu")] for w in ("0_5", "1_0", "1_5", "2_0")]
    assert (tfnet, mbv2, snet) == (
        [36.6, 29.7, 26.0, 24.3],
        [52.6, 33.3, 28.0, 25.3],
        [39.4, 30.6, 27.4, 25.0],
    )
    assert {a for m, a in paper if m in ("shufflenetv2_x1_0", "shufflenetv2_x2_0")} == {"relu"}


# The paper's table composes in full by default; of the later cells one per family (the rest: -m slow).
_NEW_DEFAULT = {"tfnet_x0_5_acon_frelu", "mobilenetv2_x0_17_relu", "mobilenetv1_x0_25_meta_acon"}
_NEW_DEFAULT |= {"shufflenetv2_x0_5_relu_se", "resnet50_relu_se"}


@pytest.mark.parametrize(
    "name",
    [
        c
        if c in _NEW_DEFAULT or (c.startswith(MODELS) and not c.endswith("_se"))
        else pytest.param(c, marks=pytest.mark.slow)
        for c in CELLS
    ],
)
def test_experiment_composes_and_builds(name):
    from acon.builders import build_model

    cfg = compose([f"experiment={name}"])
    model, act = CELL_SPECS[name]
    assert (cfg.model.name, cfg.activation.name) == (model, act)
    assert cfg.recipe.name == ("resnet" if model.startswith("resnet") else "shufflenetv2")
    assert bool(cfg.model.kwargs.get("se", False)) == model.endswith("_se")
    assert cfg.data.name == "imagenet" and cfg.data.num_classes == 1000
    assert cfg.trainer.device == "cuda" and cfg.trainer.precision == "bf16"
    assert cfg.run_name == f"imagenet-{model}-{act}-s0"
    with torch.device("meta"):
        net = build_model(cfg.model, cfg.activation, int(cfg.data.num_classes))
    kinds = {type(m) for m in net.modules()}
    for other, cls in ACT_MODULE.items():
        assert (cls in kinds) == (other == act), f"{name}: {cls.__name__} present={cls in kinds}"
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[-1].out_features == 1000


def _train_two_steps(name, tiny_imagenet, tmp_path):
    from acon.trainer import train

    out = tmp_path / "runs"
    cfg = compose(
        tiny_overrides(tiny_imagenet, out, steps=2) + [f"experiment={name}", "trainer.precision=fp32"]
    )
    assert train(cfg) is None  # stopped at max_steps before the end of the schedule
    run_dir = out / cfg.run_name
    from acon.checkpoint import load_checkpoint

    state = load_checkpoint(run_dir / "last.pt")
    assert state["progress"]["step"] == 2
    assert state["identity"]["activation"]["name"] == cfg.activation.name
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_experiments_train_two_steps(name, tiny_imagenet, tmp_path):
    _train_two_steps(name, tiny_imagenet, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CELLS if c not in REPRESENTATIVE])
def test_every_experiment_trains_two_steps(name, tiny_imagenet, tmp_path):
    _train_two_steps(name, tiny_imagenet, tmp_path)


def test_proxy_experiment_is_the_cpu_digits_proxy():
    cfg = compose(["experiment=proxy_digits", "activation=meta_acon", "seed=1"])
    assert cfg.data.name == "digits" and cfg.model.name == "shufflenetv2_x0_5_small"
    assert cfg.trainer.device == "cpu" and cfg.recipe.name == "digits" and cfg.recipe.epochs >= 1
    assert cfg.run_name == "digits-shufflenetv2_x0_5_small-meta_acon-s1"
