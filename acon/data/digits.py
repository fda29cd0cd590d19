"""The embedded default dataset: scikit-learn's handwritten digits, written once as an ImageFolder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_CACHE = Path(os.environ.get("ACON_CACHE", Path.home() / ".cache" / "acon-suite"))


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    for i in indices:
        folder = root / f"{int(labels[i]):d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit_{i:04d}.png")


def prepare_digits(root: str | os.PathLike | None = None, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the 1,797 8×8 digits as PNGs under root/{train,val}/<digit>/ (stratified split); idempotent."""
    root = Path(root) if root else DEFAULT_CACHE / "digits"
    done = root / ".complete"
    if done.exists():
        return root
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = int(round(len(idx) * val_fraction))
        val_idx.extend(idx[:n_val])
        train_idx.extend(idx[n_val:])
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    _write_split(tmp / "train", digits.images, digits.target, np.array(sorted(train_idx)))
    _write_split(tmp / "val", digits.images, digits.target, np.array(sorted(val_idx)))
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return root
