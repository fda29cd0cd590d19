"""Write Pascal VOC 2012's train_aug split (VOC + SBD masks, DeepLabV3's 10,582 images) in VOC layout.

    python scripts/prepare_voc_aug.py --voc /data/VOCdevkit/VOC2012 --sbd /data/benchmark_RELEASE/dataset

Then train with data=voc data.root=/data/VOCdevkit/VOC2012 data.train_split=train_aug
data.train_mask_dir=SegmentationClassAug (the experiment=segmentation/deeplabv3_voc_* files set both).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.data.voc_aug import AUG_MASK_DIR, prepare_voc_aug  # noqa: E402
from acon.errors import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse the folders, write the masks and the list, say where they went."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc", required=True, help="the VOC2012 folder (JPEGImages/, SegmentationClass/, ...)")
    p.add_argument("--sbd", required=True, help="SBD's benchmark_RELEASE/dataset folder (cls/, train.txt)")
    args = p.parse_args(argv)
    try:
        listing, count = prepare_voc_aug(args.voc, args.sbd)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} masks to {Path(args.voc) / AUG_MASK_DIR} and the list {listing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
