"""The data: layout of data.root (classes, counts, the flat validation folder), and sample decoding; for
detection and segmentation data the checks their task runs before training (the COCO index, the VOC or
Cityscapes pairs) and a decoded sample of each split."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from acon.doctor import Check, fail, ok, warn

IMAGENET_COUNTS = {"train": 1_281_167, "val": 50_000}
FIX_FLAT_VAL = (
    "python scripts/prepare_imagenet.py {val} LOC_val_solution.csv "
    "(or the devkit's ILSVRC2012_validation_ground_truth.txt with --synsets FILE)"
)


def _top_level_images(folder: Path) -> int:
    from acon.data.index import _is_image

    with os.scandir(folder) as it:
        return sum(1 for e in it if not e.is_dir() and _is_image(e.name))


def check_data(cfg, samples: int = 8) -> Iterator[Check]:
    """data.root's train/val layout, file counts (through the file index) and a few decoded files."""
    d = cfg.data
    if d.kind == "coco":
        yield from check_coco(d, samples)
        return
    if d.kind in ("voc", "cityscapes"):
        yield from check_segmentation_pairs(d, samples)
        return
    if d.kind != "folder":
        yield ok("data", f"data={d.name} ({d.kind}): nothing to read from disk beforehand")
        return
    if not d.root:
        yield warn(
            "data", f"data.root is not set for data={d.name}: data checks skipped (pass data.root=...)"
        )
        return
    root = Path(str(d.root)).expanduser()
    if not root.is_dir():
        yield fail("data", f"data.root={root} does not exist")
        return
    if str(d.get("pipeline", "reference")).startswith("shards"):
        n = len(list(root.glob(f"{d.train_split}-*"))) + len(list(root.glob(f"{d.train_split}/*")))
        yield (ok if n else fail)("data shards", f"{n} {d.train_split} shard files under {root}")
        return
    yield from _check_layout(d, root, samples)


def _check_layout(d, root: Path, samples: int) -> Iterator[Check]:
    from acon.data.folder import find_classes

    splits = {s: root / getattr(d, f"{s}_split") for s in ("train", "val")}
    missing = [str(p) for p in splits.values() if not p.is_dir()]
    if missing:
        yield fail(
            "data layout", f"missing {', '.join(missing)} (expected {root}/train/<class>/ and val/<class>/)"
        )
        return
    flat = _top_level_images(splits["val"])
    if flat:
        fix = FIX_FLAT_VAL.format(val=splits["val"])
        yield fail(
            "data val",
            f"{splits['val']} holds {flat:,} images directly, not in class folders; sort it: {fix}",
        )
        return
    classes = {s: find_classes(p) for s, p in splits.items()}
    if d.get("class_subset"):  # only the subset's folders: each must exist in train/ and val/
        from acon.data.subsets import select_classes
        from acon.errors import ConfigError

        try:
            classes = {s: select_classes(c, d.class_subset, splits[s]) for s, c in classes.items()}
        except ConfigError as e:
            yield fail("data classes", str(e))
            return
    n = int(d.num_classes)
    if len(classes["train"]) != n:
        yield fail(
            "data classes",
            f"{splits['train']} has {len(classes['train'])} class folders, data.num_classes={n}",
        )
        return
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))[:5]
        yield fail("data classes", f"train and val class folders differ (e.g. {only})")
        return
    yield ok("data classes", f"{n} class folders in train and val")
    for split, folder in splits.items():
        yield from _check_split(d, split, folder, classes["train"], samples)


def _check_split(d, split: str, folder: Path, classes: list[str], samples: int) -> Iterator[Check]:
    from acon.data.build import index_options
    from acon.data.index import load_index

    opts = index_options(d)
    index, source = load_index(folder, classes, opts["index_cache"], opts["index_cache_dir"])
    count = len(index.names)
    detail = f"{count:,} files in {len(classes)} classes ({'file index' if source == 'cache' else 'listed'})"
    if not count or (index.empty and split == "train"):
        yield fail(f"data {split}", f"{detail}; empty class folders: {index.empty[:5]}")
        return
    expected = IMAGENET_COUNTS.get(split) if len(classes) == 1000 else None
    if index.empty:
        yield warn(f"data {split}", f"{detail}; empty class folders: {index.empty[:5]}")
    elif expected and count != expected:
        yield warn(f"data {split}", f"{detail}; ImageNet-1k has {expected:,}")
    else:
        yield ok(f"data {split}", detail)
    yield _decode_sample(d, split, index.samples(folder), samples)


def _decode_sample(d, split: str, files, samples: int) -> Check:
    """Decode ``samples`` files spread over the split with the configured pipeline's decoder."""
    import torch

    from acon.data.folder import open_image

    picks = [files[i * len(files) // samples] for i in range(min(samples, len(files)))]
    gpu = str(d.get("pipeline", "reference")).endswith("gpu") and torch.cuda.is_available()
    name = f"data {split} decode"
    for path, _ in picks:
        try:
            with open_image(path) as img:
                img.convert("RGB").load()
        except Exception as e:
            return fail(name, f"{path}: cannot decode ({type(e).__name__}: {e})")
    if not gpu:
        return ok(name, f"{len(picks)} files decoded (PIL)")
    from acon import fallbacks
    from acon.data.decode_check import CheckedDecoder
    from acon.data.fast import read_bytes

    decoder = CheckedDecoder(torch.device("cuda"), check=True)
    decoder([read_bytes(p) for p, _ in picks])
    if decoder.on_cpu:
        reason = list(fallbacks.recorded().values())[-1]
        return warn(name, f"nvJPEG failed its check against the CPU ({reason}); runs decode on the CPU")
    return ok(name, f"{len(picks)} files decoded by nvJPEG, matching the CPU decode")


def check_coco(d, samples: int) -> Iterator[Check]:
    """Each split's COCO index as detection training builds it (annotations checked, image files listed),
    then ``samples`` decoded images of it."""
    from acon.detection.dataset import split_index

    if not d.root:
        yield fail("data", f"data.root is not set for data={d.name}: pass data.root=/path/to/coco")
        return
    for split, train in ((d.train_split, True), (d.val_split, False)):
        try:
            index = split_index(d, str(split), train)
        except Exception as e:  # the error line training would stop with
            yield fail(f"data {split}", str(e))
            return
        yield ok(f"data {split}", f"{index.ann_file}: {index.stats.summary()}")
        yield _decode_sample(d, str(split), [(r.path, None) for r in index.records], samples)


def check_segmentation_pairs(d, samples: int) -> Iterator[Check]:
    """Each split's (image, mask) pairs as segmentation training lists and checks them (both files exist,
    same size), then ``samples`` decoded images and masks."""
    from acon.data.segmentation import check_pairs, cityscapes_pairs, voc_pairs
    from acon.tasks.segmentation import seg_root, voc_mask_dir

    try:
        root = seg_root(d)
    except Exception as e:
        yield fail("data", str(e))
        return
    for split in (str(d.train_split), str(d.val_split)):
        try:
            if d.kind == "cityscapes":
                pairs = cityscapes_pairs(root, split)
            else:
                pairs = voc_pairs(root, split, voc_mask_dir(d, split))
            good, problems = check_pairs(pairs, split, str(d.bad_image_policy), d.get("max_bad_images"))
        except Exception as e:
            yield fail(f"data {split}", str(e))
            return
        skipped = f", {len(problems)} skipped (data.bad_image_policy=skip)" if problems else ""
        yield ok(f"data {split}", f"{len(good):,} image/mask pairs under {root}{skipped}")
        files = [(path, None) for pair in good for path in pair]
        yield _decode_sample(d, split, files, 2 * samples)
