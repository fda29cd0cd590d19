"""Synthetic images for throughput benchmarks: deterministic per index, no I/O."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class SyntheticDataset(Dataset):
    """``num_samples`` random (3, img_size, img_size) tensors with random labels, fixed per index."""

    def __init__(self, num_samples: int = 1024, num_classes: int = 1000, img_size: int = 224) -> None:
        self.num_samples, self.num_classes, self.img_size = num_samples, num_classes, img_size
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(index)
        img = torch.randn(3, self.img_size, self.img_size, generator=g)
        return img, int(torch.randint(self.num_classes, (1,), generator=g))
