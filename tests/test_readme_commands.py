"""Every fenced command of README.md and docs/*.md resolves, and the ones a CPU can run do run.

Each ```bash block is split into commands (continuation lines joined, comments dropped, ``&&`` split).
Every command is classified by the first rule of ``RULES`` (tests/readme_command_rules.py) whose pattern
it matches; a command that no
rule matches fails the test, so a new command in the docs needs a decision here:

* ``run``: runs on this CPU, shrunk (``trainer.max_steps=2``, a temp ``out_dir``; paths under ``runs/``,
  ``tables/``, ``figures/`` and ``/data/kaggle`` moved into a temp dir), in order with the other commands
  of its block, so an ``eval.py`` finds the checkpoint the ``train.py`` before it wrote;
* ``help``: the point is a script that needs data, a GPU or minutes of measuring; ``--help`` runs;
* ``skip``: needs a GPU, ImageNet, SLURM, the network or a finished ImageNet sweep; checked statically;
* ``ci``: ``.ci/run`` runs it as written.

The default suite checks every command statically: the program and scripts exist, every ``--flag`` is
one the script defines, and every ``train.py``/``eval.py``/doctor command line composes with the real
configs (sweeps expanded, every group option named exists, every value has its schema's type and range).
The runs are ``slow``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import DOCS, ROOT, Command, all_commands, classify, fenced_blocks
from readme_command_rules import KINDS, PLACEHOLDER, PRODUCERS, RULES, SHRINK, SHRINK_TO_EPOCH

COMMANDS = all_commands()


def _id(cmd: Command) -> str:
    return f"{cmd.doc}:{cmd.line}"


# ---------------------------------------------------------------- static checks (default suite)


def test_the_docs_have_commands_and_every_command_is_classified():
    assert len(COMMANDS) >= 40, "the README and docs/ lost their commands"
    assert {kind for _, kind, _ in RULES} <= set(KINDS)
    kinds = {}
    for cmd in COMMANDS:
        kinds.setdefault(classify(cmd)[0], []).append(cmd)
    assert len(kinds.get("run", [])) >= 10, "fewer than 10 commands run on CPU: a rule became too broad"
    readme = [c for c in COMMANDS if c.doc == "README.md"]
    assert any(c.text == "python -m pip install -r requirements.txt" for c in readme)
    assert any(c.text == "python train.py" for c in readme)
    assert any(c.text == "python -m pytest -q" for c in readme)


def test_every_rule_is_used():
    used = {classify(c)[2] for c in COMMANDS}
    stale = [p for p, _, _ in RULES if p not in used]
    assert not stale, f"rules that match no command any more (remove them): {stale}"


def test_ci_runs_the_readme_quick_start_and_test_commands():
    """The two quick-start commands .ci/run depends on are in the README exactly as written."""
    readme = (ROOT / "README.md").read_text()
    assert "```bash\npython -m pip install -r requirements.txt && python train.py\n```" in readme
    assert "```bash\npython -m pytest -q\n```" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert (
        "pip install -q -r requirements.txt" in ci and "python train.py" in ci and "python -m pytest -q" in ci
    )


def _program(cmd: Command) -> tuple[str | None, list[str]]:
    """(the script or module a command runs, its arguments)."""
    argv = list(cmd.argv)
    if argv[0] == "torchrun":
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        return argv[script], argv[script + 1 :]
    if argv[0] == "python" and argv[1] == "-m":
        return f"-m {argv[2]}", argv[3:]
    if argv[0] == "python":
        return argv[1], argv[2:]
    if argv[0].endswith(".sh"):
        return argv[0], argv[1:]
    if argv[0] == "tensorboard":
        return None, argv[1:]
    raise AssertionError(f"{cmd}: unknown program {argv[0]!r}")


def _dummy(arg: str) -> str:
    """The argument with its placeholders (``<run>``, ``$VAR``) replaced by plain words."""
    return PLACEHOLDER.sub(lambda m: f"/{m.group(1)}" if m.group(1) else "RUN", arg)


def _compose_jobs(config_name: str, args: list[str]) -> int:
    """Compose every job of a train.py/eval.py command line; check its schema; the number of jobs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import acon.config_schema  # noqa: F401
    from acon.cli import command_jobs
    from acon.validate import check_schema

    args = [_dummy(a) for a in args if a not in ("--cfg", "job")]
    assert not [a for a in args if a.startswith("-") and a not in ("-m", "--multirun")], args
    jobs = command_jobs(args)
    hydra_args = [a for a in args if a.lstrip("+~").startswith("hydra")]
    todo = [
        job + hydra_args for job in covering_jobs(jobs) if (config_name, *job, *hydra_args) not in _COMPOSED
    ]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            for overrides in todo:
                cfg = compose(
                    config_name=config_name, overrides=overrides, return_hydra_config=bool(hydra_args)
                )
                check_schema(cfg)
                _COMPOSED.add((config_name, *overrides))
    finally:
        GlobalHydra.instance().clear()
    return len(jobs)


_COMPOSED: set[tuple[str, ...]] = set()  # command lines already composed and checked (the docs repeat some)


def covering_jobs(jobs: list[list[str]]) -> list[list[str]]:
    """The jobs of a sweep that together hold every swept ``key=value`` at least once (all, for no sweep)."""
    chosen, covered = [], set()
    for job in jobs:
        if set(job) - covered or not chosen:
            chosen.append(job)
            covered |= set(job)
    return chosen


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_command_resolves(cmd):
    """The program exists, its flags exist, and a train.py/eval.py/doctor command line composes."""
    classify(cmd)
    program, args = _program(cmd)
    if program is None:
        return
    if program.startswith("-m "):
        module = program[3:]
        assert module in ("pip", "pytest", "acon.doctor"), f"{cmd}: unknown module {module}"
        if module == "acon.doctor":
            from acon.doctor import compose, parse_args

            _, overrides = parse_args([_dummy(a) for a in args])
            compose(overrides)
        return
    script = ROOT / program
    assert script.is_file(), f"{cmd}: {program} does not exist"
    if program in ("train.py", "eval.py"):
        assert _compose_jobs(program.removesuffix(".py"), args) >= 1
        return
    source = script.read_text()
    for module in re.findall(r"^from acon\.(\w+) import", source, re.M):  # shared options (acon/bench.py)
        source += (
            (ROOT / "acon" / f"{module}.py").read_text() if (ROOT / "acon" / f"{module}.py").is_file() else ""
        )
    for flag in [a.split("=")[0] for a in args if a.startswith("--")]:
        declared = f'"{flag}"' in source or f"'{flag}'" in source  # argparse
        declared = (
            declared or re.search(rf"^\s*{re.escape(flag)}(=\*)?\)", source, re.M) is not None
        )  # sh case
        assert declared, f"{cmd}: {program} has no option {flag}"
    if program.endswith(".sh"):
        assert os.access(script, os.X_OK), f"{program} is not executable"


def test_compose_check_catches_a_wrong_option_and_a_wrong_value():
    """The static check itself: a misspelt group option and an out-of-range value fail it."""
    from hydra.errors import HydraException

    from acon.errors import ConfigError

    assert _compose_jobs("train", ["-m", "activation=relu,acon_c", "seed=0,1"]) == 4
    assert covering_jobs([["a=1", "s=0"], ["a=1", "s=1"], ["a=2", "s=0"], ["a=2", "s=1"]]) == [
        ["a=1", "s=0"],
        ["a=1", "s=1"],
        ["a=2", "s=0"],
    ]
    with pytest.raises(HydraException):  # the bad value is the sweep's last one: it is composed too
        _compose_jobs("train", ["-m", "activation=relu,acon_x", "seed=0,1,2"])
    with pytest.raises(HydraException):
        _compose_jobs("train", ["activation=acon_x"])
    with pytest.raises((ConfigError, HydraException, ValueError)):
        _compose_jobs("train", ["recipe.batch_size=0"])


# ---------------------------------------------------------------- runs (slow)


def _move_paths(arg: str, tmp: Path) -> str:
    """Paths the docs write or read relative to the repo (runs/, tables/, figures/, /data/kaggle) in tmp."""
    key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("-") else ("", "", arg)
    for prefix in ("runs/", "tables/", "figures/"):
        if value.startswith(prefix) or value == prefix.rstrip("/"):
            value = str(tmp / value)
    if value.startswith("/data/kaggle"):
        value = str(tmp) + value
    return f"{key}{sep}{value}"


def _runnable(cmd: Command, tmp: Path, whole_epoch: bool = False) -> list[str]:
    """The command line to run: shrunk, its paths in tmp, or ``--help`` for a ``help`` command."""
    kind = classify(cmd)[0]
    argv = list(cmd.argv)
    if kind == "help":
        program, _ = _program(cmd)
        return [sys.executable, program, "--help"]
    argv = [_move_paths(a, tmp) for a in argv]
    if argv[0] == "python":
        argv[0] = sys.executable
    if cmd.argv[:2] == ("python", "train.py") and "--cfg" not in argv:
        shrink = [*(SHRINK_TO_EPOCH if whole_epoch else SHRINK), f"out_dir={tmp / 'runs'}"]
        keys = {s.split("=")[0] for s in shrink}
        argv = [a for a in argv if a.split("=")[0] not in keys] + shrink
    if cmd.argv[:2] == ("python", "eval.py"):
        argv += ["trainer.threads=1"]
    return argv


def _kaggle_layout(tmp: Path) -> None:
    """ILSVRC/Data/CLS-LOC/{train/<wnid>,val (flat)} and LOC_val_solution.csv, as Kaggle unpacks them."""
    from PIL import Image

    root = tmp / "data" / "kaggle"
    rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate(("n01440764", "n01443537")):
        (root / "ILSVRC/Data/CLS-LOC/train" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 16), (c * 200, 50, 90)).save(
                root / "ILSVRC/Data/CLS-LOC/train" / wnid / f"{wnid}_{i}.JPEG"
            )
    (root / "ILSVRC/Data/CLS-LOC/val").mkdir(parents=True)
    for i in range(1, 5):
        stem = f"ILSVRC2012_val_{i:08d}"
        Image.new("RGB", (20, 16), (i * 40, 50, 90)).save(root / "ILSVRC/Data/CLS-LOC/val" / f"{stem}.JPEG")
        rows.append(f"{stem},{('n01440764', 'n01443537')[i % 2]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")


def _missing_inputs(cmd: Command, tmp: Path) -> list[tuple[str, ...]]:
    """The producer commands of the ``runs/`` files this command reads that are not in tmp yet."""
    wanted = [a.partition("=")[2] for a in cmd.argv if a.startswith("checkpoint=runs/")]
    return [PRODUCERS[w] for w in wanted if not (tmp / w).exists()]


def _reads_runs(cmd: Command) -> bool:
    """eval.py, make_table.py and the plots read the runs a train.py before them wrote."""
    return bool(re.match(r"python (eval\.py|scripts/(make_table|plot_curves|plot_beta)\.py)", cmd.text))


def _path_args(cmd: Command) -> list[str]:
    """The values of a command's arguments (``checkpoint=runs/x`` gives ``runs/x``)."""
    return [a.partition("=")[2] if "=" in a else a for a in cmd.argv]


def _run_dir(cmd: Command) -> str:
    """``runs/<run_name>`` of a train.py command, or ``runs/<sweep_name>/`` of a sweep."""
    from conftest import compose

    args = [a for a in cmd.argv[2:] if not a.startswith("-") and a != "job"]
    cfg = compose([a.split(",")[0] if "=" in a else a for a in args])
    multirun = "-m" in cmd.argv or "--multirun" in cmd.argv
    return f"runs/{cfg.sweep_name}/" if multirun else f"runs/{cfg.run_name}/"


BLOCKS = sorted({(c.doc, c.block) for c in COMMANDS if classify(c)[0] in ("run", "help")})


@pytest.mark.slow
@pytest.mark.parametrize("doc,block", BLOCKS, ids=[f"{d}-block{b}" for d, b in BLOCKS])
def test_block_runs_on_cpu(doc, block, tmp_path):
    """The block's runnable commands, shrunk, in order: each exits 0."""
    cmds = [c for c in COMMANDS if (c.doc, c.block) == (doc, block)]
    if any("/data/kaggle" in c.text for c in cmds):
        _kaggle_layout(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for i, cmd in enumerate(cmds):
        if classify(cmd)[0] not in ("run", "help"):
            continue
        for producer in _missing_inputs(cmd, tmp_path):
            made = _runnable(Command(cmd.doc, cmd.line, cmd.block, producer), tmp_path, whole_epoch=True)
            subprocess.run(made, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=True)
        readers = [c for c in cmds[i + 1 :] if classify(c)[0] == "run" and _reads_runs(c)]
        if readers and cmd.argv[:2] == ("python", "train.py"):
            writes = _run_dir(cmd).rstrip("/")
            readers = [
                c for c in readers if any(a == writes or a.startswith(writes + "/") for a in _path_args(c))
            ]
        argv = _runnable(cmd, tmp_path, whole_epoch=bool(readers))
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (
            f"{cmd}\nran: {argv}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    if any("/data/kaggle" in c.text for c in cmds):
        val = tmp_path / "data/kaggle/ILSVRC/Data/CLS-LOC/val"
        assert sorted(p.name for p in val.iterdir()) == ["n01440764", "n01443537"], "val was not sorted"


@pytest.mark.slow
def test_python_snippets_run(tmp_path):
    """The ```python blocks run, except the one that loads the authors' checkpoint file."""
    snippets = [(p, s, t) for p in DOCS for s, t in fenced_blocks(p, "python")]
    ran = 0
    for path, start, text in snippets:
        if "pretrained=True" in text:  # the authors' released file, a download
            continue
        proc = subprocess.run(
            [sys.executable, "-c", text],
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{path.name}:{start}\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 3
