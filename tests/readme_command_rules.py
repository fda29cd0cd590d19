"""The rule table of tests/test_readme_commands.py: how each fenced command of README.md and docs/*.md is
checked (``RULES``: the first pattern that matches a command decides its kind), how a runnable command is
shrunk, and which command writes the runs a later ``eval.py`` reads."""

from __future__ import annotations

import re

# (pattern searched in the command, kind, reason). The first match decides.
RULES: list[tuple[str, str, str]] = [
    (r"pip install -r requirements\.txt", "ci", ".ci/run installs the requirements before anything else"),
    (r"^python -m pytest -q$", "ci", ".ci/run runs the default test suite"),
    (r"^tensorboard ", "skip", "starts a web server that does not exit; the runs write the tb/ it reads"),
    (r"hydra/launcher=slurm", "skip", "submits to SLURM (sbatch); tests/test_slurm_launcher.py covers it"),
    (r"^torchrun ", "skip", "several GPUs or nodes; tests/test_distributed.py runs gloo ranks on CPU"),
    (r"^scripts/gpu_check\.sh --cpu$", "run", "the GPU check's CPU-side parts"),
    (r"^scripts/gpu_check\.sh$", "skip", "needs a CUDA GPU (at most 8 min on one)"),
    (
        r"^python -m pytest -q -m gpu ",
        "skip",
        "the -m gpu tests need a CUDA GPU (scripts/gpu_check.sh runs them)",
    ),
    (
        r"^scripts/proxy_sweep\.sh",
        "skip",
        "8 full runs (~5 min); its steps are the README's proxy block, run here",
    ),
    (
        r"scripts/prepare_imagenet\.py /data/kaggle/",
        "run",
        "sorts a Kaggle-layout val folder built in a temp dir",
    ),
    (
        r"scripts/(bench_\w+|prepare_fast_imagenet|convert_official_checkpoint|run_timm_tests)\.py",
        "help",
        "a benchmark or a tool for ImageNet or the authors' files: minutes of work or absent data",
    ),
    (r"trainer=gpu|data\.pipeline=(gpu|shards_gpu)", "skip", "needs a CUDA GPU"),
    (r"\.pth\.tar|meta_x1_5\.pt", "skip", "the authors' released checkpoint (a download)"),
    (r"/data/|\$\w+_ROOT", "skip", "needs the data set (ImageNet, VOC, Cityscapes or COCO) on disk"),
    (r"<\w+>", "skip", "names a run dir of a sweep by placeholder"),
    (
        r"runs/(short|my_sweep)\b",
        "skip",
        "needs an earlier run of the user's own; tests/test_resume_modes.py and "
        "tests/test_eval_workflows.py run these modes",
    ),
    (
        r"runs/(resnet|shufflenetv2|tfnet|se|mobilenet|coco_det|seg_cityscapes)\b",
        "skip",
        "needs the runs of an ImageNet (or COCO, Cityscapes) sweep",
    ),
    (r"^python (train|eval)\.py", "run", "a CPU run on the embedded data"),
    (
        r"^python scripts/(make_table|plot_curves|plot_beta|model_table)\.py",
        "run",
        "tables and figures of the runs made before it in the same block",
    ),
]
KINDS = ("run", "help", "skip", "ci")
SHRINK = ["trainer.max_steps=2", "trainer.progress=false", "trainer.threads=1"]
# When a later command of the block reads the run (eval.py on best.pt, tables, figures): one whole epoch,
# so the run completes and writes best.pt.
SHRINK_TO_EPOCH = ["recipe.epochs=1", "recipe.iterations=null", "trainer.progress=false", "trainer.threads=1"]
PLACEHOLDER = re.compile(r"<\w+>|\$\{?(\w+)\}?")

# Runs an eval.py command of a block reads when no command before it in the block wrote them.
PRODUCERS = {
    "runs/digits-shufflenetv2_x0_5_small-acon_c-s0/best.pt": ("python", "train.py"),
    "runs/det_shapes-shufflenetv2_x0_5-acon_c-s0/best.pt": ("python", "train.py", "task=detection"),
}
