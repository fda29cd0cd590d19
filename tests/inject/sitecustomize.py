"""Loaded at interpreter start when tests put this folder on PYTHONPATH: installs write refusals."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import refusing_writes  # noqa: E402

refusing_writes.install_from_env()
