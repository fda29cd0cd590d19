"""Shared fixtures: tiny ImageNet-layout folders of real image files, and composed Hydra configs."""

from __future__ import annotations

import gc
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import acon.config_schema  # noqa: E402, F401  (registers the typed schemas with Hydra)


def write_image_folder(
    root: Path, classes: int = 3, per_class: tuple[int, int] = (8, 3), size=(40, 30), seed: int = 0
) -> Path:
    """root/{train,val}/<class>/*.JPEG of real, class-dependent JPEG images (learnable colours)."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size[1], size[0], 3), np.float32)
                base[..., c % 3] = 180
                img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{split}_{c}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """A 3-class ImageFolder: 8 train and 3 val JPEGs per class (val size 9, odd on purpose)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_imagenet"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on shared cores OpenMP spin-waiting makes 2 threads far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A ``gpu`` test fails when a fast path fell back (a failed self-check) in its process, in it or
    before it (a path that fell back stays so): on a GPU the Triton kernels and nvJPEG must serve, not
    the eager formulas and CPU decoding behind them."""
    result = yield
    if item.get_closest_marker("gpu") is not None:
        from acon import fallbacks

        fallbacks.assert_none(item.nodeid)
    return result


def load_script(name: str):
    """The module of ``scripts/<name>.py``, loaded from its file (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose(overrides: list[str], config_name: str = "train"):
    """Compose the real configs with ``overrides`` (no Hydra run dir is created)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def tiny_overrides(root: Path, out: Path, steps: int | None = None) -> list[str]:
    """Shrink any experiment to a few CPU steps on ``root`` (3 classes, 32 px, batch 4)."""
    ov = [
        "data=folder",
        f"data.root={root}",
        "data.num_classes=3",
        "data.img_size=32",
        "data.val_transform.resize=36",
        "data.num_workers=0",
        "recipe.batch_size=4",
        "recipe.base_batch_size=4",
        "recipe.iterations=null",
        "recipe.epochs=1",
        "trainer.progress=false",
        "trainer.eval_batch_size=4",
        "trainer.device=cpu",
        f"out_dir={out}",
    ]
    if steps:
        ov.append(f"trainer.max_steps={steps}")
    return ov


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group or a daemon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict | None = None, timeout: int = 300, check: bool = True):
    """Run a command from the repo root, returning the CompletedProcess (stdout+stderr captured)."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{args} exited {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def no_cycle_collector():
    """Python's cycle collector off for the test (after one collection): what a test then finds dead was
    freed by reference counting alone, so no reference cycle held it."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def counted(monkeypatch):
    """Count calls into the C++ ACON kernels, so a silent fallback to another path fails the test."""
    from acon.fused import native

    calls = {"forward": 0, "backward": 0}
    for name in calls:  # every path into the kernels goes through run_forward / run_backward
        fn = getattr(native, f"run_{name}")

        def wrapper(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(native, f"run_{name}", wrapper)
    return calls
