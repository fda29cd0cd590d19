"""scripts/plot_activations.py writes valid PNG figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import load_script
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_activations.py"
NAMES = ("acon_c_beta.png", "acon_c_panels.png")


def _check_pngs(out: Path, min_w: int, min_h: int) -> list[tuple[int, int]]:
    sizes = []
    for name in NAMES:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            assert img.width >= min_w and img.height >= min_h, (name, img.size)
            assert len(set(img.convert("L").getdata())) > 10, f"{name} looks blank"
            sizes.append(img.size)
    return sizes


def test_script_cli_writes_pngs(tmp_path):
    out = tmp_path / "figs"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    sizes = _check_pngs(out, 400, 300)
    assert sizes[1][0] > 2 * sizes[1][1], "the panel figure has three panels side by side"


def test_main_argv_and_dpi(tmp_path):
    module = load_script("plot_activations")
    paths = module.main(["--out", str(tmp_path), "--dpi", "50"])
    assert [p.name for p in paths] == list(NAMES)
    (w, h), _ = _check_pngs(tmp_path, 200, 150)
    assert w == 300 and h == 210  # 6 x 4.2 inches at 50 dpi
