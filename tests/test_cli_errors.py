"""Bad command lines end in one ``error:`` line naming key, value and what is allowed; exit status 2.

Most cases run the entry points' own pre-run check in process (the same function ``train.py`` and
``eval.py`` call before Hydra starts the run); a representative set runs the real commands.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import compose, run_cli, tiny_overrides

from acon.cli import check_command
from acon.validate import ConfigError, check_eval_config, check_train_command, check_train_config

TRAIN_CASES = [
    (["recipe.lr=abc"], "recipe.lr=abc is not allowed: must be a number > 0"),
    (["recipe.lr=0"], "recipe.lr=0.0 is not allowed: must be a number > 0"),
    (["recipe.lr=-0.1"], "recipe.lr=-0.1 is not allowed: must be a number > 0"),
    (["recipe.lr=null"], "recipe.lr=null is not allowed: must be a number > 0"),
    (["recipe.batch_size=-5"], "recipe.batch_size=-5 is not allowed: must be an integer > 0"),
    (["recipe.batch_size=0"], "recipe.batch_size=0 is not allowed: must be an integer > 0"),
    (["recipe.batch_size=4.5"], "recipe.batch_size=4.5 is not allowed: must be an integer > 0"),
    (["seed=abc"], "seed=abc is not allowed: must be an integer >= 0"),
    (["data.num_workers=-3"], "data.num_workers=-3 is not allowed: must be an integer >= 0"),
    (["data.img_size=-1"], "data.img_size=-1 is not allowed: must be an integer > 0"),
    (["data.num_classes=0"], "data.num_classes=0 is not allowed: must be an integer > 0"),
    (["recipe.epochs=0"], "recipe.epochs=0 is not allowed: must be an integer > 0"),
    (["recipe.iterations=-1"], "recipe.iterations=-1 is not allowed: must be an integer > 0"),
    (["recipe.label_smoothing=1.0"], "recipe.label_smoothing=1.0 is not allowed: must be a number in [0, 1)"),
    (["recipe.momentum=1.5"], "recipe.momentum=1.5 is not allowed: must be a number in [0, 1)"),
    (["recipe.ema_decay=1"], "recipe.ema_decay=1.0 is not allowed: must be a number in (0, 1)"),
    (
        ["recipe.schedule=exponential"],
        "recipe.schedule='exponential' is not one of: linear, cosine, poly, step",
    ),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is not one of: fp32, bf16, fp16"),
    (["trainer.device=tpu"], "trainer.device='tpu' is not one of: auto, cpu, cuda"),
    (["trainer.nan_policy=ignore"], "trainer.nan_policy='ignore' is not one of: stop, skip"),
    (["trainer.progress=maybe"], "trainer.progress=maybe is not allowed: must be true or false"),
    (["trainer.fuse_bn_act=maybe"], "trainer.fuse_bn_act='maybe' is not one of: auto, true, false"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is not allowed: must be an integer > 0"),
    (["trainer.log_every=0"], "trainer.log_every=0 is not allowed: must be an integer > 0"),
    (["trainer.dist_timeout_s=0"], "trainer.dist_timeout_s=0.0 is not allowed: must be a number > 0"),
    (["data.bad_image_policy=ignore"], "data.bad_image_policy='ignore' is not one of: raise, skip"),
    (["data.max_bad_images=-1"], "data.max_bad_images=-1 is not allowed: must be an integer >= 0"),
    (["data.pipeline=turbo"], "data.pipeline='turbo' is not one of: reference, fast, gpu, shards"),
    (["data.preprocess=bgr"], "data.preprocess='bgr' is not one of: rgb_normalized, bgr_255"),
    (["data.train_transform.color_jitter=-0.5"], "color_jitter=-0.5 is not allowed: must be a number >= 0"),
    (["model.arch=nope"], "model.arch='nope' is not one of: shufflenetv2_x0_5, "),
    (["activation.layer.impl=fast"], "activation.layer.impl='fast' is not one of: auto, reference, fused"),
    (["model=nope"], "model='nope' is not one of: mobilenetv1_x0_25, mobilenetv2_x0_17"),
    (["recipe.iterations=null", "recipe.epochs=null"], "recipe.iterations and recipe.epochs are both null"),
    (
        ["data=synthetic", "data.pipeline=fast"],
        "data=synthetic (random tensors) works only with data.pipeline=reference",
    ),
    (
        ["resume=/no/such/last.pt"],
        "resume='/no/such/last.pt' is not auto, none or an existing checkpoint file",
    ),
    (["-m", "seed=0,abc"], "seed=abc is not allowed: must be an integer >= 0"),
    (["-m", "recipe.lr=0.1,-2"], "recipe.lr=-2.0 is not allowed: must be a number > 0"),
]


# The issue's own cases, one of each kind of rule, a combination and a sweep run by default; the rest
# under -m slow (each composes the configs, ~0.3 s).
DEFAULT = {
    "recipe.lr=abc",
    "recipe.lr=null",
    "recipe.batch_size=-5",
    "recipe.batch_size=0",
    "seed=abc",
    "data.num_workers=-3",
    "data.img_size=-1",
    "recipe.label_smoothing=1.0",
    "recipe.schedule=exponential",
    "trainer.progress=maybe",
    "trainer.fuse_bn_act=maybe",
    "model.arch=nope",
    "recipe.iterations=null recipe.epochs=null",
    "resume=/no/such/last.pt",
    "-m seed=0,abc",
}
PARAMS = [
    pytest.param(a, e, id=" ".join(a), marks=() if " ".join(a) in DEFAULT else pytest.mark.slow)
    for a, e in TRAIN_CASES
]


@pytest.mark.parametrize("args, expected", PARAMS)
def test_bad_train_command_is_one_line_naming_key_value_and_allowed(args, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        check_command([*args, f"out_dir={tmp_path}"], "train", check_train_command)
    msg = str(info.value)
    assert expected in msg and "\n" not in msg, msg
    assert not any(tmp_path.iterdir())


def test_good_commands_pass_the_check(tmp_path):
    for args in (
        [],
        ["-m", "seed=0,1", "activation=relu,acon_c"],
        ["experiment=proxy_digits"],
        ["data=synthetic"],
    ):
        check_command([*args, f"out_dir={tmp_path}"], "train", check_train_command)
    # Hydra's own flags are left to Hydra; a new keyword in a free-form node is allowed with +
    check_command(["--cfg", "job"], "train", check_train_command)
    check_command(["+model.kwargs.se=true", f"out_dir={tmp_path}"], "train", check_train_command)


UNKNOWN_KEY_CASES = [
    (["actvation=relu"], "unknown key 'actvation' in actvation=relu: did you mean activation?"),
    (["+actvation=relu"], "unknown key 'actvation' in +actvation=relu: did you mean activation?"),
    (["++actvation=relu"], "unknown key 'actvation' in ++actvation=relu: did you mean activation?"),
    (["trainer.thred=2"], "unknown key 'trainer.thred' in trainer.thred=2: did you mean trainer.threads?"),
    (["+trainer.thred=2"], "unknown key 'trainer.thred' in +trainer.thred=2: did you mean trainer.threads?"),
    (["trainr.threads=2"], "unknown key 'trainr' in trainr.threads=2: did you mean trainer?"),
    (
        ["experiment=proxy_digits", "recipe.lrr=0.1"],
        "unknown key 'recipe.lrr' in recipe.lrr=0.1: did you mean",
    ),
    (["-m", "seed=0,1", "actvation=relu,swish"], "unknown key 'actvation' in actvation=relu"),
    (["zzz=1"], "unknown key 'zzz' in zzz=1: the keys at the top level are: activation, backbone, data,"),
    (["model.kwargs.se=true"], "add it with +model.kwargs.se=true"),
    (["runs/x/best.pt"], "'runs/x/best.pt' is not key=value: train.py takes group=option and key=value"),
]


@pytest.mark.parametrize("args, expected", UNKNOWN_KEY_CASES, ids=[" ".join(a) for a, _ in UNKNOWN_KEY_CASES])
def test_unknown_key_names_the_closest_valid_keys(args, expected, tmp_path):
    with pytest.raises(ConfigError) as info:
        check_command([*args, f"out_dir={tmp_path}"], "train", check_train_command)
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_eval_unknown_key_and_positional_checkpoint(tmp_path):
    cases = [
        (["runs/x/best.pt"], "'runs/x/best.pt' is not key=value: write checkpoint=runs/x/best.pt"),
        (["chekpoint=x"], "unknown key 'chekpoint' in chekpoint=x: did you mean checkpoint"),
        ([f"checkpoint={tmp_path}", "data.imgsize=3"], "did you mean data.img_size?"),
    ]
    assert_eval_refused(cases)


def test_cuda_trainer_without_cuda_is_refused_before_the_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["trainer=gpu"], ["experiment=resnet18_relu"], ["trainer.device=cuda"]):
        with pytest.raises(ConfigError, match=r"trainer.device=cuda .* no CUDA device .* trainer.device=cpu"):
            check_command([*args, f"out_dir={tmp_path}"], "train", check_train_command)
    # submitted to SLURM, the jobs run on GPU nodes: the login node needs no GPU, only sbatch and srun
    monkeypatch.setenv("PATH", str(tmp_path))
    slurm_gpu = ["-m", "hydra/launcher=slurm", "trainer=gpu", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="sbatch and srun are not on PATH"):
        check_command(slurm_gpu, "train", check_train_command)
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "sbatch").chmod(0o755)
    with pytest.raises(ConfigError, match="srun is not on PATH"):
        check_command(slurm_gpu, "train", check_train_command)
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    check_command(slurm_gpu, "train", check_train_command)


def test_external_model_input_size_is_checked_before_training(tmp_path):
    bad = ["model=timm", "model.timm_name=vit_tiny_patch16_224", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError) as info:
        check_command(bad, "train", check_train_command)
    msg = str(info.value)
    assert "model.timm_name=vit_tiny_patch16_224 does not take data.img_size=16 px inputs" in msg, msg
    assert "224x224" in msg
    check_command([*bad, "data.img_size=224"], "train", check_train_command)
    check_command(
        ["model=timm", "model.timm_name=resnet18", f"out_dir={tmp_path}"], "train", check_train_command
    )


def test_eval_commands(tmp_path):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"not checked here")
    cases = [
        ([], "checkpoint is not set: pass checkpoint=PATH"),
        ([f"checkpoint={tmp_path / 'nope.pt'}"], f"checkpoint='{tmp_path / 'nope.pt'}' does not exist"),
        ([f"checkpoint={ckpt}", "batch_size=0"], "batch_size=0 is not allowed: must be an integer > 0"),
        ([f"checkpoint={ckpt}", "batch_size=x"], "batch_size=x is not allowed: must be an integer > 0"),
        ([f"checkpoint={ckpt}", "official.model=nope", "official.activation=relu"], "'nope' is not one of"),
        ([f"checkpoint={ckpt}", "trainer.precision=fp8"], "trainer.precision='fp8' is not one of"),
        ([f"checkpoint={ckpt}", "use_ema=perhaps"], "use_ema=perhaps is not allowed: must be true or false"),
    ]
    assert_eval_refused(cases)


def test_config_errors_come_before_resume_checks(tiny_imagenet, tmp_path):
    """A run dir holding an earlier run's last.pt: the bad value is reported, not the resume."""
    base = tiny_overrides(tiny_imagenet, tmp_path, steps=1) + ["run_name=r"]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "last.pt").write_bytes(b"an earlier run")  # a resume check would fail on this
    with pytest.raises(ConfigError, match=r"recipe.lr=-1.0 is not allowed: must be a number > 0"):
        check_train_config(compose([*base, "recipe.lr=-1"]), 1)


SUBPROCESS_CASES = [  # the first four by default (each start imports torch: ~4 s of CPU), all under -m slow
    ("train.py", ["recipe.lr=abc"], "error: recipe.lr=abc is not allowed: must be a number > 0"),
    ("train.py", ["recipe.batch_size=0"], "error: recipe.batch_size=0 is not allowed"),
    ("train.py", ["-m", "trainer.precision=fp32,fp8"], "error: trainer.precision='fp8' is not one of"),
    ("eval.py", [], "error: checkpoint is not set"),
    ("train.py", ["seed=abc"], "error: seed=abc is not allowed: must be an integer"),
    ("train.py", ["data.num_workers=-3"], "error: data.num_workers=-3 is not allowed"),
    ("train.py", ["data.img_size=-1"], "error: data.img_size=-1 is not allowed"),
    ("train.py", ["recipe.batch_size=-5"], "error: recipe.batch_size=-5 is not allowed"),
]


@pytest.mark.parametrize(
    "cases",
    [
        pytest.param(SUBPROCESS_CASES[:4], id="default"),
        pytest.param(SUBPROCESS_CASES[4:], id="more", marks=pytest.mark.slow),
    ],
)
def test_bad_command_lines_as_real_commands(cases, tmp_path):
    """The real commands: one line on stderr, exit 2, no traceback, nothing written (run in parallel)."""
    earlier = tmp_path / "out" / "digits-shufflenetv2_x0_5_small-acon_c-s0"
    earlier.mkdir(parents=True)
    (earlier / "last.pt").write_bytes(b"an earlier run in the same folder")

    def run(case):
        script, args, _ = case
        env = {"ACON_EVAL_DIR": str(tmp_path / "eval")}
        return run_cli(
            [sys.executable, script, *args, f"out_dir={tmp_path / 'out'}"][
                : None if script == "train.py" else -1
            ],
            env=env,
            check=False,
            timeout=240,
        )

    with ThreadPoolExecutor(3) as pool:
        procs = list(pool.map(run, cases))
    for (script, args, expected), proc in zip(cases, procs, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), (
            script,
            args,
            proc.stderr,
        )
        assert "Traceback" not in proc.stderr + proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == sorted([earlier.name, "last.pt"])


def test_traps_are_one_line_as_real_commands(tiny_imagenet, tmp_path):
    """Unknown keys, a lone checkpoint path, no CUDA, no SLURM, a ViT at 16 px, a dataset smaller than one
    batch: the last stderr line is the error, exit 2, no traceback (run in parallel)."""
    no_cuda = {"CUDA_VISIBLE_DEVICES": ""}
    cases = [
        (
            ["train.py", "actvation=relu"],
            {},
            "error: unknown key 'actvation' in actvation=relu: did you mean",
        ),
        (
            ["train.py", "+actvation=relu"],
            {},
            "error: unknown key 'actvation' in +actvation=relu: did you mean",
        ),
        (["eval.py", "runs/x/best.pt"], {}, "error: 'runs/x/best.pt' is not key=value: write checkpoint="),
        (["train.py", "trainer=gpu"], no_cuda, "error: trainer.device=cuda (trainer=gpu"),
        (
            ["train.py", "-m", "hydra/launcher=slurm", "seed=0"],
            {"PATH": str(tmp_path)},
            "error: hydra/launcher=slurm",
        ),
        (["train.py", "model=timm", "model.timm_name=vit_tiny_patch16_224"], {}, "error: model.timm_name="),
        (
            [
                "train.py",
                "data=folder",
                f"data.root={tiny_imagenet}",
                "data.num_classes=3",
                "data.num_workers=0",
            ],
            no_cuda,
            "error: the training set has 24 samples, fewer than one global batch of 64 (recipe.batch_size)",
        ),
    ]

    def run(case):
        args, env, _ = case
        extra = [f"out_dir={tmp_path / 'out'}"] if args[0] == "train.py" else []
        env = {"ACON_EVAL_DIR": str(tmp_path / "eval"), **env}
        return run_cli([sys.executable, *args, *extra], env=env, check=False, timeout=300)

    with ThreadPoolExecutor(3) as pool:
        procs = list(pool.map(run, cases))
    for (args, _, expected), proc in zip(cases, procs, strict=True):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines and lines[-1].startswith(expected), (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr + proc.stdout, (args, proc.stderr[-2000:])


@pytest.mark.slow
def test_full_error_shows_the_traceback():
    proc = run_cli([sys.executable, "train.py", "recipe.lr=abc"], env={"HYDRA_FULL_ERROR": "1"}, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "recipe.lr" in proc.stderr


def assert_eval_refused(cases: list[tuple[list[str], str]]) -> None:
    """Each eval.py command line is refused before Hydra runs, with a message containing its text."""
    for args, expected in cases:
        with pytest.raises(ConfigError) as info:
            check_command(args, "eval", check_eval_config)
        assert expected in str(info.value), (args, str(info.value))
