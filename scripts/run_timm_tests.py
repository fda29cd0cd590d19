"""Run timm's own model test-suite on our ``acon_*`` models.

    python scripts/run_timm_tests.py /path/to/timm-checkout [-k acon] [-- extra pytest args]

The checkout (a git worktree or the release's sdist) must be of the timm release pinned in
requirements.txt. Its ``tests/test_models.py`` runs unmodified against the *installed* timm: pytest
starts from this repository (so ``models`` imports), loads ``models.timm_models`` as a plugin (``-p``)
so our models are registered before timm's test module lists models at import, and imports the test
file with ``--import-mode=importlib`` so the checkout's own ``timm/`` source never shadows the installed
package. Model selection is timm's own parametrisation filtered with ``-k`` on our names; nothing else
is excluded.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout_version(checkout: Path) -> str:
    """The ``__version__`` of the timm source in ``checkout``."""
    text = (checkout / "timm" / "version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    if not match:
        raise ValueError(f"{checkout}/timm/version.py: no __version__")
    return match.group(1)


def pytest_command(checkout: Path, select: str, extra: list[str]) -> list[str]:
    """The pytest command line that runs the checkout's test_models.py on our registered models."""
    return [
        sys.executable,
        "-m",
        "pytest",
        str(checkout / "tests" / "test_models.py"),
        "-c",
        str(checkout / "pyproject.toml"),
        "--rootdir",
        str(checkout),
        "--import-mode=importlib",
        "-p",
        "models.timm_models",
        "-k",
        select,
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns pytest's exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="timm source tree (git worktree or sdist) with tests/")
    ap.add_argument("-k", dest="select", default="acon", help="pytest -k expression (default: acon)")
    args, extra = ap.parse_known_args(argv)  # everything else (after --) goes to pytest
    import timm

    checkout = args.checkout.resolve()
    if not (checkout / "tests" / "test_models.py").is_file():
        print(f"error: {checkout}/tests/test_models.py not found: pass a timm source tree", file=sys.stderr)
        return 2
    version = checkout_version(checkout)
    if version != timm.__version__:
        print(
            f"error: {checkout} is timm {version}, the installed timm is {timm.__version__}", file=sys.stderr
        )
        return 2
    extra = [a for a in extra if a != "--"]
    cmd = pytest_command(checkout, args.select, extra)
    print(f"timm {timm.__version__} installed at {Path(timm.__file__).parent}; tests from {checkout}")
    print("running:", " ".join(cmd), flush=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
