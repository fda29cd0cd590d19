"""Bad configs fail with one clear line, before any data is scanned or any checkpoint is written."""

from __future__ import annotations

import sys
import time

import pytest
from conftest import CONFIGS, compose, run_cli, tiny_overrides

from acon.checkpoint import CheckpointError
from acon.validate import ConfigError, check_cli_groups


@pytest.fixture()
def no_data_scan(monkeypatch):
    """Make any dataset construction fail loudly: the checks under test must come before it."""
    from acon.tasks.classification import ClassificationTask

    def boom(*_a, **_k):
        raise AssertionError("datasets were built before the config was rejected")

    monkeypatch.setattr(ClassificationTask, "build_loaders", boom)


def _train(overrides):
    from acon.trainer import train

    return train(compose(overrides))


@pytest.mark.parametrize(
    "arg, choices",
    [
        ("model=nope", ["resnet50", "shufflenetv2_x0_5_small"]),
        ("activation=nope", ["acon_c", "meta_acon", "relu"]),
        ("data=nope", ["folder", "imagenet"]),
        ("model=resnet18,nope", ["resnet18"]),
    ],
)
def test_unknown_group_option_lists_choices(arg, choices):
    with pytest.raises(ConfigError) as info:
        check_cli_groups([arg, "trainer.device=cpu"], CONFIGS)
    msg = str(info.value)
    assert "\n" not in msg and "'nope' is not one of:" in msg and all(c in msg for c in choices)


def test_known_group_options_and_plain_keys_pass():
    check_cli_groups(["model=resnet18,resnet50", "experiment=null", "trainer.nope=1", "seed=3"], CONFIGS)


def test_cli_unknown_model_is_one_line_and_fast(tmp_path):
    t0 = time.perf_counter()
    proc = run_cli([sys.executable, "train.py", "model=nope", f"out_dir={tmp_path}"], check=False, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model='nope' is not one of: "), lines
    choices = lines[0].split("is not one of: ", 1)[1].split(", ")
    assert {"resnet101", "resnet50", "shufflenetv2_x0_5", "tfnet_x0_5", "timm", "torchvision"} <= set(choices)
    assert choices == sorted(choices), choices
    assert time.perf_counter() - t0 < 30 and not any(tmp_path.iterdir())


def test_cli_unknown_key_is_refused(tmp_path):
    proc = run_cli([sys.executable, "train.py", "trainer.nope=1", f"out_dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "trainer.nope" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_arch_name_lists_choices(tiny_imagenet, tmp_path, no_data_scan):
    with pytest.raises(ConfigError, match=r"model.arch='nope' is not one of: .*resnet50"):
        _train(tiny_overrides(tiny_imagenet, tmp_path, steps=1) + ["model.arch=nope"])


def test_batch_not_divisible_by_world_size(tiny_imagenet, tmp_path, monkeypatch, no_data_scan):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"recipe.batch_size=4 .* world size 3"):
        _train(tiny_overrides(tiny_imagenet, tmp_path, steps=1))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("root", ["missing", "no_val"])
def test_wrong_data_root(tiny_imagenet, tmp_path, root, no_data_scan):
    path = tmp_path / root
    if root == "no_val":
        (path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"data.root='{path}'"):
        _train(tiny_overrides(path, tmp_path / "out", steps=1))
    with pytest.raises(ConfigError, match="data.root is not set"):
        _train([o for o in tiny_overrides(path, tmp_path / "out", steps=1) if "data.root" not in o])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # long; run with -m slow
def test_cli_missing_data_root_exit_2(tmp_path):
    proc = run_cli(
        [sys.executable, "train.py", *tiny_overrides(tmp_path / "nowhere", tmp_path / "out", steps=1)],
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2 and f"error: data.root='{tmp_path / 'nowhere'}' does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and not list((tmp_path / "out").rglob("*.pt"))


def test_resume_from_other_architecture_lists_keys(tiny_imagenet, tmp_path, monkeypatch):
    base = tiny_overrides(tiny_imagenet, tmp_path, steps=1) + ["activation=relu", "run_name=r"]
    _train(base + ["model=resnet18_small"])
    ckpt = tmp_path / "r" / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    from acon.tasks.classification import ClassificationTask

    monkeypatch.setattr(
        ClassificationTask, "build_loaders", lambda *a, **k: pytest.fail("datasets were built")
    )
    for resume in ("auto", str(ckpt)):  # the run dir's last.pt, and an explicit path from another run
        run_name = "r" if resume == "auto" else "other"
        with pytest.raises(CheckpointError) as info:
            _train(base + ["model=shufflenetv2_x0_5_small", f"resume={resume}", f"run_name={run_name}"])
        msg = str(info.value)
        assert (
            str(ckpt) in msg
            and "missing keys: classifier.0.bias" in msg
            and "unexpected keys: bn1.bias" in msg
        ), msg
    assert ckpt.stat().st_mtime_ns == stamp and not (tmp_path / "other").exists()


# run a command's script in-process and say, when it exits (errors leave through os._exit), whether torch
# was ever imported
_PROBE = """import os, runpy, sys
def report(status=0, leave=os._exit):
    print("torch loaded" if "torch" in sys.modules else "torch not loaded", flush=True)
    leave(status)
os._exit = report
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    report(stop.code if isinstance(stop.code, int) else 1)
"""


@pytest.mark.parametrize(
    "args, first_words",
    [
        (["train.py", "actvation=relu"], "error: unknown key 'actvation' in actvation=relu"),
        (["train.py", "recipe.batch_size=-5"], "error: recipe.batch_size=-5 is not allowed"),
        (["train.py", "model=resnet18", "data.img_size=0"], "error: data.img_size=0 is not allowed"),
        (["train.py", "model=nope"], "error: model='nope' is not one of: "),
        (["eval.py", "runs/x/best.pt"], "error: 'runs/x/best.pt' is not key=value"),
    ],
)
def test_mistyped_keys_and_values_are_reported_before_torch_loads(tmp_path, args, first_words):
    """A mistyped key, option or value is one line within a second of the command, not after the four
    seconds torch, torchvision and timm take to import (before: ``acon``'s package imported them all)."""
    out = [f"out_dir={tmp_path}"] if args[0] == "train.py" else []
    proc = run_cli([sys.executable, "-c", _PROBE, *args, *out], check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(first_words), proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "torch not loaded"
    assert not any(tmp_path.iterdir())
