"""Print the README model table (params, FLOPs, ACON placement) from models/golden.py.

python scripts/model_table.py            # markdown from the golden data the tests assert
python scripts/model_table.py --verify   # also recount every entry (meta device, ~30 s)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import get_entry, list_models  # noqa: E402
from models.golden import (  # noqa: E402
    ACTIVATIONS,
    EXACT,
    LIGHT_ACTIVATIONS,
    LIGHT_EXACT,
    PAPER,
    SE_EXACT,
    TFNET_TABLE,
    TFNET_TABLE_DIFFERS,
    WELL_KNOWN,
)

PLACEMENT = {
    "shufflenetv2": "every activation: stem, both in the main branch, projection branch, last 1x1 conv",
    "basic": "both activations of every block (after conv1 and after the addition); stem ReLU",
    "bottleneck": "after the 3x3 conv of every block; 1x1, post-addition and stem stay ReLU",
    "tfnet": "both activations of every block (stride-2 ones downsample) and the last 1x1 conv; stem ReLU",
    "mobilenetv2": "stem, expansion 1x1, depthwise 3x3, last 1x1 conv (every ReLU6 site); projection linear",
    "mobilenetv1": "after every BatchNorm (stem, each depthwise and pointwise conv)",
}


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f}G" if n >= 1e9 else f"{n / 1e6:.3f}M"


def _placement(name: str) -> str:
    entry = get_entry(name)
    if entry.family != "resnet":
        return PLACEMENT[entry.family]
    return PLACEMENT["bottleneck" if entry.config["block"].expansion == 4 else "basic"]


def exact_table() -> str:
    """Markdown: exact params / MACs of the default (official) variant, per activation."""
    rows = [
        "| model | MACs (224x224) | params ReLU | Swish | ACON-C | Meta-ACON (r) | ACON placement |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in EXACT:
        c = EXACT[name]
        params = " | ".join(_fmt(c[a].params) for a in ACTIVATIONS[:3])
        meta = f"{_fmt(c['meta_acon'].params)} ({get_entry(name).meta_acon_r})"
        rows.append(f"| {name} | {_fmt(c['relu'].macs)} | {params} | {meta} | {_placement(name)} |")
    return "\n".join(rows)


def light_table() -> str:
    """Markdown: TFNet and the MobileNets, exact params / MACs per activation."""
    rows = ["| model | activation | MACs (224x224) | params | ACON placement |", "|---|---|---|---|---|"]
    for name, counts in LIGHT_EXACT.items():
        for i, act in enumerate(LIGHT_ACTIVATIONS[get_entry(name).family]):
            c, where = counts[act], _placement(name) if i == 0 else "″"
            rows.append(f"| {name} | {act} | {_fmt(c.macs)} | {_fmt(c.params)} | {where} |")
    return "\n".join(rows)


def tfnet_published_table() -> str:
    """Markdown: the TFNet README table's FLOPs / params next to ours in the BN-folded convention."""
    rows = ["| model | FLOPs published / ours | params published / ours |", "|---|---|---|"]
    for name, row in TFNET_TABLE.items():
        c = LIGHT_EXACT[name][LIGHT_ACTIVATIONS[get_entry(name).family][0]]
        mark = {
            k: " (differs)" if k in TFNET_TABLE_DIFFERS.get(name, ()) else "" for k in ("flops", "params")
        }
        rows.append(
            f"| {name} | {row['flops'].value} / {_fmt(c.paper_flops)}{mark['flops']} | "
            f"{row['params'].value} / {_fmt(c.paper_params)}{mark['params']} |"
        )
    return "\n".join(rows)


def se_table() -> str:
    """Markdown: ReLU models with and without squeeze-excite (``se=True``)."""
    rows = ["| model | MACs | params | MACs + SE | params + SE |", "|---|---|---|---|---|"]
    for name, (params, macs) in SE_EXACT.items():
        c = EXACT[name]["relu"]
        rows.append(f"| {name} | {_fmt(c.macs)} | {_fmt(c.params)} | {_fmt(macs)} | {_fmt(params)} |")
    return "\n".join(rows)


def paper_table() -> str:
    """Markdown: published numbers next to ours in the published convention."""
    rows = [
        "| model | FLOPs published / ours | params published / ours | Meta-ACON params published / ours |",
        "|---|---|---|---|",
    ]
    for name in list_models():
        row = PAPER.get(name) or WELL_KNOWN.get(name)
        if row is None:
            continue
        c = EXACT[name]
        src = "" if name in PAPER else " (ReLU baseline)"
        meta = "-"
        if "params_meta_acon" in row:
            meta = f"{row['params_meta_acon'].value} / {_fmt(c['meta_acon'].paper_params)}"
        rows.append(
            f"| {name}{src} | {row['flops'].value} / {_fmt(c['relu'].paper_flops)} | "
            f"{row['params'].value} / {_fmt(c['relu'].paper_params)} | {meta} |"
        )
    return "\n".join(rows)


def verify() -> None:
    """Recount every golden entry from the definitions; raise on the first difference."""
    import torch

    from models import count_flops, count_params, create_model

    for name in list_models():
        golden = EXACT.get(name) or LIGHT_EXACT[name]
        for act, counts in golden.items():
            with torch.device("meta"):
                m = create_model(name, act)
            got = (count_params(m), count_flops(m))
            if got != (counts.params, counts.macs):
                raise SystemExit(f"{name}/{act}: counted {got}, golden {(counts.params, counts.macs)}")


def main(argv: list[str] | None = None) -> int:
    """Print both tables (markdown) to stdout."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verify", action="store_true", help="recount every entry before printing")
    args = ap.parse_args(argv)
    if args.verify:
        verify()
    print(exact_table())
    print()
    print(
        "Published numbers (Ma et al. 2021; ReLU baselines from the Megvii README and He et al. 2016) "
        "against ours in their convention: params without BatchNorm affine parameters and conv biases, "
        "MACs of the official variant (ResNet v1)."
    )
    print()
    print(paper_table())
    print()
    print(light_table())
    print()
    print(
        "The TFNet README table against ours (params without BatchNorm affine parameters and the biases of "
        "convs a BatchNorm follows; MACs at 224x224; TFNet FLOPs as printed are rounded up):"
    )
    print()
    print(tfnet_published_table())
    print()
    print("Squeeze-excite (se=true; ResNet: SE-ResNet, r=16; ShuffleNetV2: ShuffleNetV2+, r=4), ReLU:")
    print()
    print(se_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
