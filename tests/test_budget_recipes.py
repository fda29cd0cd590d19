"""Budget recipes (recipe=budget_16|32|88): FFCV's progressive resizing as a function of the epoch, followed by
running loader workers on every pipeline, evaluation above the last training size, the triangular lr and an
exact resume in the middle of the ramp; the recipes compose as FFCV's files say."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose, tiny_overrides

from acon.data.resolution import EpochResolution, ResolutionSchedule, SharedSize, follow_size
from acon.optim import step_lrs
from acon.trainer import train

FFCV_RAMPS = {16: (11, 13), 32: (23, 27), 88: (65, 76)}  # ffcv-imagenet rn18/rn50_<E>_epochs.yaml


def ffcv_resolution(epoch, min_res=160, max_res=192, start_ramp=11, end_ramp=13):
    """ffcv-imagenet train_imagenet.py's get_resolution, as written there."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def test_resolution_schedule_is_ffcvs_for_every_ramp():
    for epochs, ramp in FFCV_RAMPS.items():
        s = ResolutionSchedule(160, 192, *ramp)
        assert s.sizes(epochs) == [ffcv_resolution(e, 160, 192, *ramp) for e in range(epochs)]
    s = ResolutionSchedule(128, 224, 2, 6)  # a longer ramp: steps of 32 on the way
    expected = [128, 128, 128, 160, 192, 192, 224, 224]  # 176 rounds half to even: 192
    assert s.sizes(8) == [ffcv_resolution(e, 128, 224, 2, 6) for e in range(8)] == expected


def test_recipes_follow_ffcv_files():
    for epochs, ramp in FFCV_RAMPS.items():
        cfg = compose(["experiment=budget/resnet50", f"recipe=budget_{epochs}"])
        r = cfg.recipe
        assert (r.epochs, r.resolution.start_ramp, r.resolution.end_ramp) == (epochs, *ramp)
        assert (r.batch_size, r.lr, r.weight_decay, r.label_smoothing) == (4096, 1.7, 1e-4, 0.1)
        assert (r.schedule, r.warmup_epochs, r.resolution.eval_res) == ("triangular", 2, 256)
        assert cfg.run_name.endswith(f"-budget_{epochs}-s0") and cfg.data.train_transform.color_jitter == 0
    rn18 = compose(["experiment=budget/resnet18", "recipe=budget_88"]).recipe
    assert (rn18.batch_size, rn18.lr, rn18.weight_decay, rn18.warmup_lr) == (1024, 0.5, 5e-5, 5e-5)


def test_every_budget_experiment_header_states_command_hardware_hours_and_result():
    for path in sorted((ROOT / "configs/experiment/budget").glob("*.yaml")):
        head = path.read_text().split("defaults:")[0]
        for word in ("Command: ", "Hardware: ", "Expected GPU-hours (from FLOPs", "Expected top-1"):
            assert word in head, (path.name, word)
        assert f"experiment=budget/{path.stem} recipe=budget_16" in head


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "shufflenetv2_x1_0"])
def test_shufflenet_budget_experiments_keep_the_papers_weight_decay(name):
    cfg = compose([f"experiment=budget/{name}", "recipe=budget_32"])
    assert (cfg.model.name, cfg.recipe.weight_decay, cfg.recipe.epochs, cfg.recipe.lr) == (
        name,
        4e-5,
        32,
        0.5,
    )


def test_triangular_schedule_is_ffcvs_per_iteration_lr():
    """FFCV: np.interp(epoch, [0, 2, E], [1e-4 lr, lr, 0]) at each iteration; step k here runs at t = k."""
    r = compose(["experiment=budget/resnet18", "recipe=budget_16"]).recipe
    per_epoch, epochs = 10, 16
    total = per_epoch * epochs
    lrs = step_lrs(r, total, list(range(1, total + 1)))
    ffcv = np.interp(np.arange(1, total + 1) / per_epoch, [0, 2, epochs], [1e-4 * 0.5, 0.5, 0])
    assert np.allclose(lrs, ffcv, atol=1e-9)


def _budget(root: Path, out: Path, *extra: str) -> list[str]:
    """budget_16 shrunk: 3 epochs of 3 steps, sizes 16 → 24 → 32 px (ramp from epoch 0 to 2), eval 40."""
    ov = [
        o for o in tiny_overrides(root, out) if not o.startswith(("recipe.batch", "recipe.base", "recipe.ep"))
    ]
    return [
        *ov,
        "recipe=budget_16",
        "model=shufflenetv2_x0_5_small",
        "activation=relu",
        "recipe.batch_size=8",
        "recipe.base_batch_size=8",
        "recipe.epochs=3",
        "recipe.warmup_epochs=1",
        "recipe.resolution.min_res=16",
        "recipe.resolution.max_res=32",
        "recipe.resolution.start_ramp=0",
        "recipe.resolution.end_ramp=2",
        "recipe.resolution.round_to=8",
        "recipe.resolution.eval_res=40",
        "trainer.threads=1",
        "deterministic=true",
        "run_name=r",
        *extra,
    ]


class _Sizes:
    """The input size of every forward of the classifier, as (training?, height)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int]] = []

    def __call__(self, module, args) -> None:
        if type(module).__name__.startswith("ShuffleNet") and args and isinstance(args[0], torch.Tensor):
            self.seen.append((module.training, int(args[0].shape[-1])))

    def train(self) -> list[int]:
        return [h for training, h in self.seen if training]

    def evals(self) -> set[int]:
        return {h for training, h in self.seen if not training}


@pytest.fixture
def sizes():
    rec = _Sizes()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(rec)
    yield rec
    hook.remove()


@pytest.mark.slow
def test_budget_run_sizes_per_step_eval_size_and_exact_resume_mid_ramp(tiny_imagenet, tmp_path, sizes):
    whole = train(compose(_budget(tiny_imagenet, tmp_path / "whole")))
    assert sizes.train() == [16] * 3 + [24] * 3 + [32] * 3  # one size per epoch, changed between epochs
    assert 40 in sizes.evals() and max(sizes.train()) < 40  # evaluation above the last training size
    sizes.seen.clear()
    cut = _budget(tiny_imagenet, tmp_path / "cut")
    assert train(compose([*cut, "trainer.max_steps=4"])) is None  # stops at epoch 2, step 1 (24 px)
    resumed = train(compose(cut))  # resume=auto: continues from last.pt
    assert sizes.train() == [16] * 3 + [24] + [24] * 2 + [32] * 3
    assert resumed["top1_err"] == whole["top1_err"] and resumed["steps"] == whole["steps"] == 9
    assert whole["flops_img_size"] == 40  # FLOPs at the evaluation crop, where the error was measured
    a = torch.load(tmp_path / "whole/r/last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut/r/last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    from acon.evaluation import run_eval

    sizes.seen.clear()  # eval.py evaluates a budget checkpoint at its recipe's evaluation size
    ov = [f"checkpoint={tmp_path / 'cut/r/last.pt'}", "trainer.device=cpu", "data.num_workers=0"]
    (row,) = run_eval(compose([*ov, f"out={tmp_path / 'e.json'}"], "eval"))
    assert sizes.evals() == {40} and row["top1_err"] == resumed["top1_err"]


def test_flops_are_counted_at_the_evaluation_crop(tiny_imagenet, tmp_path):
    from acon.console import size_text
    from acon.tasks.classification import ClassificationTask

    budget = compose(_budget(tiny_imagenet, tmp_path))
    plain = compose(tiny_overrides(tiny_imagenet, tmp_path))
    assert ClassificationTask(budget).flops_input(budget) == 40  # recipe.resolution.eval_res
    assert ClassificationTask(plain).flops_input(plain) == int(plain.data.img_size)
    assert (size_text(224), size_text((1024, 2048))) == ("224", "1024x2048")


def _shards(src: Path, dst: Path) -> Path:
    sys.path.insert(0, str(ROOT / "scripts"))
    from prepare_fast_imagenet import prepare

    for split in ("train", "val"):
        prepare(src / split, dst, split, samples_per_shard=8, shuffle=split == "train")
    return dst


def _epoch_shapes(root: Path, out: Path, pipeline: str, device: str) -> tuple[list[set], int, set]:
    """Each of 3 epochs' batch sizes from two persistent workers, the number of distinct worker-pid sets
    over the epochs, and the validation batches' size."""
    from acon.tasks.classification import ClassificationTask

    cfg = compose(
        [
            *_budget(root, out),
            f"data.pipeline={pipeline}",
            "data.num_workers=2",
            "data.persistent_workers=true",
            "data.prefetch_factor=1",
        ]
    )
    info = type("Info", (), {"rank": 0, "world_size": 1, "device": torch.device(device)})()
    task = ClassificationTask(cfg)
    train_loader, val_loader, _ = task.build_loaders(cfg, info)
    inner = getattr(train_loader, "loader", train_loader)
    got, pids = [], set()
    for epoch in range(3):
        task.resolution.set_epoch(epoch)
        if hasattr(inner.sampler, "set_position"):
            inner.sampler.set_position(epoch, 0)
        else:
            inner.dataset.set_position(epoch, 0)
        got.append({(tuple(images.shape[-2:]), images.device.type) for images, _, _ in train_loader})
        pids.add(tuple(sorted(w.pid for w in inner._iterator._workers)))
    return got, len(pids), {tuple(images.shape[-2:]) for images, _, _ in val_loader}


@pytest.mark.parametrize(
    "pipeline", ["fast", *(pytest.param(p, marks=pytest.mark.slow) for p in ("reference", "gpu", "shards"))]
)
def test_pipelines_follow_the_epoch_size_with_the_same_workers(tiny_imagenet, tmp_path, pipeline):
    """Two persistent workers: each epoch's batches come at that epoch's size from the same processes."""
    root = _shards(tiny_imagenet, tmp_path / "shards") if pipeline == "shards" else tiny_imagenet
    got, worker_sets, val = _epoch_shapes(root, tmp_path / "o", pipeline, "cpu")
    assert got == [{((16, 16), "cpu")}, {((24, 24), "cpu")}, {((32, 32), "cpu")}] and worker_sets == 1
    assert val == {(40, 40)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pipeline", ["gpu", "shards_gpu"])
def test_cuda_batch_stage_follows_the_epoch_size(tiny_imagenet, tmp_path, pipeline):
    """On a GPU the crop-resize runs in the device stage (nvJPEG decode): it follows the epoch's size too."""
    root = _shards(tiny_imagenet, tmp_path / "shards") if pipeline == "shards_gpu" else tiny_imagenet
    got, worker_sets, val = _epoch_shapes(root, tmp_path / "o", pipeline, "cuda")
    assert got == [{((16, 16), "cuda")}, {((24, 24), "cuda")}, {((32, 32), "cuda")}] and worker_sets == 1
    assert val == {(40, 40)}


def test_a_loader_without_a_resizing_step_is_refused():
    from acon.errors import ConfigError

    with pytest.raises(ConfigError, match="recipe.resolution needs a training pipeline with a resizing crop"):
        follow_size(torch.utils.data.DataLoader([1, 2, 3]), SharedSize(16))


def test_resolution_errors_name_the_key(tiny_imagenet, tmp_path):
    from acon.data.resolution import schedule_of
    from acon.errors import ConfigError

    cfg = compose([*_budget(tiny_imagenet, tmp_path), "recipe.resolution.eval_res=32"])
    with pytest.raises(ConfigError, match=r"recipe.resolution.eval_res=32 must be above .* max_res=32"):
        schedule_of(cfg.recipe)
    cfg = compose([*_budget(tiny_imagenet, tmp_path), "recipe.resolution.min_res=64"])
    with pytest.raises(ConfigError, match="min_res=64 and max_res=32"):
        schedule_of(cfg.recipe)


def test_warmup_in_epochs_needs_a_length_in_epochs():
    from omegaconf import OmegaConf

    from acon.errors import ConfigError
    from acon.optim import warmup_steps

    r = compose(["recipe=budget_16"]).recipe
    assert warmup_steps(r, 160) == 20  # 2 of 16 epochs
    OmegaConf.update(r, "epochs", None)
    OmegaConf.update(r, "iterations", 1000)
    with pytest.raises(ConfigError, match=r"recipe.warmup_epochs=2.0 needs recipe.epochs"):
        warmup_steps(r, 1000)


def test_epoch_resolution_logs_each_change(caplog):
    er = EpochResolution(ResolutionSchedule(160, 192, 11, 13), SharedSize(0))
    with caplog.at_level("INFO", logger="acon.data.resolution"):
        assert [er.set_epoch(e) for e in (10, 11, 12, 13)] == [160, 160, 192, 192]
    assert [r.getMessage() for r in caplog.records] == [
        "training input size 160x160 px from epoch 11",
        "training input size 192x192 px from epoch 13",
    ]
    assert er.shared.value == 192


def test_the_banner_lists_each_epochs_size():
    from acon.data.resolution import describe

    assert describe(ResolutionSchedule(160, 192, 23, 27), 32) == "160 px epochs 1-25, 192 px epochs 26-32"
    assert describe(ResolutionSchedule(16, 32, 0, 2, 8), 3) == "16 px epoch 1, 24 px epoch 2, 32 px epoch 3"
    assert describe(ResolutionSchedule(160, 192, 11, 13), None).startswith("160 px to epoch 12, 192 px from")


@pytest.mark.slow
def test_two_rank_budget_run_on_fast_workers_resumes_mid_ramp(tiny_imagenet, tmp_path):
    """torchrun with 2 ranks, 2 persistent loader workers each: stopped in the ramp, resumed, same result."""
    from conftest import run_cli

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    shrink = [o for o in _budget(tiny_imagenet, tmp_path) if not o.startswith(("model=", "activation="))]
    common = [
        "experiment=budget/resnet18",
        *shrink,
        "model=shufflenetv2_x0_5_small",
        "trainer=default",
        "trainer.device=cpu",
        "data.pipeline=fast",
        "data.num_workers=2",
        "deterministic=false",
    ]
    whole = [*torchrun, "train.py", *common, f"out_dir={tmp_path / 'whole'}"]
    run_cli(whole, timeout=600)
    cut = [*torchrun, "train.py", *common, f"out_dir={tmp_path / 'cut'}"]
    first = run_cli([*cut, "trainer.max_steps=4"], timeout=600)
    second = run_cli(cut, timeout=600)
    log = (tmp_path / "cut" / "r" / "train.log").read_text()
    assert (
        "progressive resizing (set in the workers stage): 16 px epoch 1, 24 px epoch 2, 32 px epoch 3" in log
    )
    assert "training input size 24x24 px from epoch 2" in first.stdout + first.stderr
    assert "training input size 16x16" not in second.stdout + second.stderr  # resumed at 24 px
    assert "training input size 24x24 px from epoch 2" in second.stdout + second.stderr
    a = json.loads((tmp_path / "whole" / "r" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "r" / "results.json").read_text())
    assert a["steps"] == b["steps"] == 9 and a["world_size"] == 2
