"""``python -m acon.doctor``: what a new machine can run, checked in a minute, before a long job.

Each check prints one line, ``ok``, ``warn`` or ``fail`` with what it found; the command exits 1 when a
check fails. It takes the training config's overrides (``data.root=... out_dir=... trainer=gpu``) or the
flags ``--data-root``, ``--out-dir``, ``--pipeline``::

    python -m acon.doctor data=imagenet data.root=/data/imagenet out_dir=/scratch/runs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("ok", "warn", "fail")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    status: str
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def ok(name: str, detail: str) -> Check:
    return Check("ok", name, detail)


def warn(name: str, detail: str) -> Check:
    return Check("warn", name, detail)


def fail(name: str, detail: str) -> Check:
    return Check("fail", name, detail)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Flags and the remaining ``key=value`` config overrides."""
    ap = argparse.ArgumentParser(prog="python -m acon.doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="training config overrides, e.g. data.root=/data/imagenet")
    ap.add_argument("--data-root", help="same as data.root=... (with data=imagenet unless data= is given)")
    ap.add_argument("--out-dir", help="same as out_dir=...")
    ap.add_argument("--pipeline", help="same as data.pipeline=...")
    ap.add_argument("--samples", type=int, default=8, help="image files decoded per split (default 8)")
    ap.add_argument("--no-ddp", action="store_true", help="skip the all-reduce checks")
    args = ap.parse_args(argv)
    ov = list(args.overrides)
    if args.data_root:
        if not any(o.startswith("data=") for o in ov):
            ov.append("data=imagenet")
        ov.append(f"data.root={args.data_root}")
    if args.out_dir:
        ov.append(f"out_dir={args.out_dir}")
    if args.pipeline:
        ov.append(f"data.pipeline={args.pipeline}")
    return args, ov


def compose(overrides: list[str]):
    """The training config for ``overrides``, composed as ``train.py`` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import acon.config_schema  # noqa: F401  (registers the typed schemas the yaml files start from)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def run_checks(groups: list[tuple[str, Callable[[], Iterable[Check]]]], out=None) -> list[Check]:
    """Run each named group, printing its lines as they come; a group that crashes is one ``fail`` line."""
    out, results = out or sys.stdout, []
    for name, group in groups:
        try:
            for check in group():
                print(check.line(), file=out, flush=True)
                results.append(check)
        except Exception as e:
            check = fail(name, f"{type(e).__name__}: {str(e).strip()[:500]}")
            print(check.line(), file=out, flush=True)
            results.append(check)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run every check; 1 if any failed, else 0."""
    from acon.doctor import data, system

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(overrides)
    except Exception as e:
        print(f"error: config overrides {overrides}: {e}", file=sys.stderr)
        return 2
    groups = [
        ("versions", system.check_versions),
        ("devices", system.check_devices),
        ("fused ACON-C", system.check_fused),
        ("data", lambda: data.check_data(cfg, args.samples)),
        ("open files", lambda: system.check_open_files(cfg)),
    ]
    if not args.no_ddp:
        groups += [("DDP gloo", system.check_gloo), ("DDP NCCL", system.check_nccl)]
    groups.append(("disk and resume", lambda: system.check_disk_and_resume(cfg)))
    results = run_checks(groups)
    counts = {s: sum(c.status == s for c in results) for s in STATUSES}
    verdict = "FAILED" if counts["fail"] else "ready"
    print(f"doctor: {verdict}: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} fail")
    return 1 if counts["fail"] else 0
