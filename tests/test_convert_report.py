"""convert_activations and model=timm|torchvision say what they converted and what they left alone."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from conftest import compose

from acon import convert_activations
from acon.builders import build_model


def test_mobilenet_v3_reports_the_hardswish_it_keeps(caplog):
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    with caplog.at_level(logging.INFO, logger="acon.convert"):
        out = convert_activations(model, "acon_c", example_input=torch.randn(2, 3, 32, 32))
    report = out.acon_conversion
    assert report.converted == {"relu": 14} and report.left_alone == {"hardswish": 19}
    lines = [r.getMessage() for r in caplog.records if r.name == "acon.convert"]
    assert len(lines) == 1, lines
    assert "converted 14 of 33 activation call sites of MobileNetV3 to acon_c (relu 14)" in lines[0]
    assert "left alone: hardswish 19" in lines[0]


def test_every_site_converted_names_no_leftovers(caplog):
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None)
    with caplog.at_level(logging.INFO, logger="acon.convert"):
        out = convert_activations(
            model, "acon_c", example_input=torch.randn(2, 3, 32, 32), targets=["relu", "hardswish"]
        )
    assert (
        out.acon_conversion.converted == {"relu": 14, "hardswish": 19} and not out.acon_conversion.left_alone
    )
    assert "left alone" not in caplog.records[-1].getMessage()


def test_no_target_site_names_what_the_model_calls():
    model = torchvision.models.get_model("mobilenet_v2", weights=None)
    with pytest.raises(ValueError, match=r"no relu/silu activation .* found: relu6 35"):
        convert_activations(model, "acon_c", example_input=torch.randn(2, 3, 32, 32))


def test_run_model_logs_its_conversion(caplog):
    cfg = compose(["model=torchvision", "model.tv_name=mobilenet_v3_small", "data.img_size=32"])
    with caplog.at_level(logging.INFO, logger="acon.convert"):
        build_model(cfg.model, cfg.activation, 10)
        relu = compose(["model=torchvision", "model.tv_name=mobilenet_v3_small", "activation=relu"])
        build_model(relu.model, relu.activation, 10)
    lines = [r.getMessage() for r in caplog.records if r.name == "acon.convert"]
    assert "converted 14 of 33" in lines[0] and "to AconC" in lines[0], lines
    assert "activation=relu keeps mobilenet_v3_small's own activations" in lines[1], lines
