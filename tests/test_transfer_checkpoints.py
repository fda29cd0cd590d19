"""Fine-tuned checkpoints stand alone: eval.py and a resume never read the ImageNet backbone file, and its
folder is not part of the run identity (its name is)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from acon import checkpoint as ckpt
from acon.builders import build_model, run_identity
from acon.distributed import DistInfo
from acon.evaluation import evaluate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def write_backbone(cfg, path) -> None:
    """An ImageNet-style classifier checkpoint of the run's model and activation (our format)."""
    torch.manual_seed(3)
    model = build_model(cfg.model, cfg.activation, 10)
    torch.save({"format": ckpt.FORMAT, "model": model.state_dict()}, path)


def seg_overrides(tmp_path, bb) -> list[str]:
    return [
        "task=segmentation",
        f"data.root={tmp_path / 'shapes'}",
        "data.train_samples=8",
        "data.val_samples=2",
        "data.shapes_size=32",
        "data.img_size=32",
        "recipe.batch_size=4",
        "recipe.base_batch_size=4",
        "recipe.epochs=1",
        "recipe.warmup_steps=0",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"backbone.checkpoint={bb}",
        f"out_dir={tmp_path / 'runs'}",
        "run_name=r",
    ]


def test_segmentation_checkpoint_evaluates_and_resumes_without_the_backbone_file(tmp_path):
    from acon.trainer import train

    bb = tmp_path / "imagenet" / "bb.pt"
    bb.parent.mkdir()
    base = seg_overrides(tmp_path, bb)
    write_backbone(compose(base), bb)
    assert train(compose([*base, "trainer.max_steps=1"])) is None  # stopped after step 1: last.pt
    last = tmp_path / "runs" / "r" / "last.pt"
    identity = ckpt.load_checkpoint(last)["identity"]
    assert identity["backbone"]["checkpoint"] == "bb.pt" and str(bb.parent) not in str(identity)
    bb.rename(tmp_path / "bb_moved.pt")  # the ImageNet file moved away (or deleted)

    ecfg = compose([f"checkpoint={last}", "trainer.device=cpu"], config_name="eval")
    row = evaluate_checkpoint(last, ecfg, DistInfo(), {})
    assert row["task"] == "segmentation" and row["count"] == 2 and 0 <= row["mIoU"] <= 100

    results = train(compose(base))  # the same command again: resumes last.pt and finishes
    assert results["status"] == "complete" and results["steps"] == 2
    assert run_identity(compose(base))["backbone"] == identity["backbone"]


def test_resume_does_not_reload_the_backbone_even_when_present(tmp_path, monkeypatch):
    """Full weights follow: the build of a resumed run skips the backbone file although it still exists."""
    from acon.tasks import backbone
    from acon.trainer import train

    bb = tmp_path / "bb.pt"
    base = seg_overrides(tmp_path, bb)
    write_backbone(compose(base), bb)
    train(compose([*base, "trainer.max_steps=1"]))
    monkeypatch.setattr(backbone, "load_backbone_checkpoint", lambda *a: pytest.fail("backbone file read"))
    assert train(compose(base))["steps"] == 2


@pytest.mark.slow  # a detection run; run with -m slow
def test_detection_checkpoint_evaluates_without_the_backbone_file(tmp_path):
    from acon.trainer import train

    bb = tmp_path / "bb.pt"
    base = [
        "task=detection",
        f"data.root={tmp_path / 'shapes'}",
        "data.train_samples=8",
        "data.val_samples=4",
        "recipe.batch_size=4",
        "recipe.base_batch_size=4",
        "recipe.epochs=1",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"backbone.checkpoint={bb}",
        f"out_dir={tmp_path / 'runs'}",
        "run_name=d",
        "trainer.max_steps=1",
    ]
    write_backbone(compose(base), bb)
    train(compose(base))
    bb.unlink()
    last = tmp_path / "runs" / "d" / "last.pt"
    row = evaluate_checkpoint(last, compose([f"checkpoint={last}"], config_name="eval"), DistInfo(), {})
    assert row["task"] == "detection" and row["count"] == 4
