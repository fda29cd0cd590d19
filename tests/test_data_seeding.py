"""Per-sample seeding: ``torch.default_generator.manual_seed`` gives the same samples as ``torch.manual_seed``."""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from acon.data.pipelines import build_loader, build_train_pipeline
from acon.data.samplers import ResumableTrainSampler, SeededDataset

SIZE = 32


class ManualSeedDataset(Dataset):
    """The previous per-sample seeding: ``torch.manual_seed`` (every device's generator) per sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        if torch.utils.data.get_worker_info() is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        torch.manual_seed(seed)
        return self.dataset[index]


def _batches(loader) -> list[list[torch.Tensor]]:
    out = []
    for images, targets, _ in loader:
        parts = [images.images, images.params] if hasattr(images, "params") else [images]
        out.append([*parts, targets])
    return out


def _loader(pipe, workers: int, wrapper=SeededDataset, epoch: int = 0, done: int = 0) -> DataLoader:
    loader = build_loader(pipe, global_batch=4, num_workers=workers, seed=3, pin_memory=False)
    loader.sampler.set_position(epoch, done)
    if wrapper is SeededDataset:
        return loader
    return DataLoader(
        wrapper(pipe.dataset),
        batch_size=4,
        sampler=loader.sampler,
        num_workers=workers,
        collate_fn=pipe.collate_fn,
        drop_last=True,
    )


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) for ba, bb in zip(a, b, strict=True) for x, y in zip(ba, bb, strict=True)
    )


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_samples_bit_identical_to_torch_manual_seed_across_worker_counts(tiny_imagenet, name):
    pipe = build_train_pipeline(name, tiny_imagenet / "train", img_size=SIZE, device="cpu")
    before = _batches(_loader(pipe, 0, ManualSeedDataset, epoch=1))
    assert len(before) == 6 and _same(before, _batches(_loader(pipe, 2, ManualSeedDataset, epoch=1)))
    for workers in (0, 1, 2):
        assert _same(_batches(_loader(pipe, workers, epoch=1)), before), workers
    # resuming mid-epoch yields exactly the rest of the epoch
    assert _same(_batches(_loader(pipe, 2, epoch=1, done=2)), before[2:])
    # and another epoch draws other crops
    assert not _same(_batches(_loader(pipe, 0, epoch=2)), before)


def test_main_process_loading_leaves_the_training_rng_alone(tiny_imagenet):
    pipe = build_train_pipeline("fast", tiny_imagenet / "train", img_size=SIZE, device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _batches(_loader(pipe, 0))
    assert torch.equal(torch.rand(3), expected)


def test_sampler_seeds_depend_on_seed_and_epoch_only():
    a = list(ResumableTrainSampler(24, 4, seed=1))
    b = ResumableTrainSampler(24, 4, seed=1)
    b.set_position(0, 2)
    assert list(b) == a[8:]
    b.set_position(1, 0)
    assert sorted(i for i, _ in b) == sorted(i for i, _ in a) and list(b) != a
