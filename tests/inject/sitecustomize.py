"""Loaded at interpreter start when tests put this folder on PYTHONPATH: installs write refusals and
hanging reads."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hanging_reads  # noqa: E402
import refusing_writes  # noqa: E402

refusing_writes.install_from_env()
hanging_reads.install_from_env()
