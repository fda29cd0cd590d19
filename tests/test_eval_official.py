"""eval.py on an authors'-format checkpoint: converted on the fly, BGR 0-255 preprocessing applied."""

from __future__ import annotations

import json
import sys

import torch
from conftest import compose, run_cli

from acon.data import build_datasets
from tests.official_reference import RefShuffleNetV2


def test_eval_converts_authors_checkpoint_with_their_preprocessing(tiny_imagenet, tmp_path):
    torch.manual_seed(0)
    ref = RefShuffleNetV2("0.5x", kind="acon", n_class=3).eval()
    for m in ref.modules():  # non-trivial BN statistics, as in a trained checkpoint
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "ShuffleNetV2+ACON.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    data = [f"data.root={tiny_imagenet}", "data.num_classes=3", "data.num_workers=0"]
    run_cli(
        [
            sys.executable,
            "eval.py",
            f"checkpoint={path}",
            "data=folder",
            *data,
            "official.model=shufflenetv2_x0_5",
            "official.activation=acon_c",
            "trainer.device=cpu",
            f"out={tmp_path / 'e.json'}",
        ],
        env={"ACON_EVAL_DIR": str(tmp_path / "eval")},
    )
    got = json.loads((tmp_path / "e.json").read_text())
    # the authors' own network on BGR 0-255 input (no normalisation), image by image
    cfg = compose(["data=folder", *data, "data.preprocess=bgr_255"]).data
    _, val = build_datasets(cfg)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(ref(x[None]), torch.tensor([y])).item() for x, y in val]
    assert got["count"] == len(val) == 9
    assert abs(got["loss"] - sum(losses) / len(losses)) < 1e-4 * max(1.0, abs(got["loss"]))
