"""Convert an authors' released checkpoint (ShuffleNetV2 / ResNet, ReLU / ACON-C / Meta-ACON).

    python scripts/convert_official_checkpoint.py IN OUT --model shufflenetv2_x1_5 [--activation acon_c]

Writes ``{'model', 'activation', 'model_kwargs', 'input', 'state_dict'}`` to OUT; the state dict loads
into ``models.create_model(model, activation, **model_kwargs)``. The activation is inferred from the
checkpoint's keys when not given. The converted model expects the authors' input: BGR, 0-255, no
mean/std normalisation (``input``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import convert_official_state_dict, list_models  # noqa: E402
from models.official import OFFICIAL_INPUT, infer_official_activation  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="released checkpoint ({'state_dict': ...} with 'module.' keys)")
    ap.add_argument("dst", help="output file")
    ap.add_argument("--model", required=True, choices=list_models())
    ap.add_argument(
        "--activation", default=None, help="relu | swish | acon_c | meta_acon (default: inferred)"
    )
    ap.add_argument("--variant", default=None, help="official (default) | megvii | torchvision")
    args = ap.parse_args(argv)
    checkpoint = torch.load(args.src, map_location="cpu", weights_only=True)
    activation = args.activation or infer_official_activation(checkpoint)
    model_kwargs = {"variant": args.variant} if args.variant else {}
    try:
        state_dict = convert_official_state_dict(checkpoint, args.model, activation, **model_kwargs)
    except (KeyError, ValueError) as err:
        print(f"{args.src}: {err}", file=sys.stderr)
        return 1
    out = {
        "model": args.model,
        "activation": activation,
        "model_kwargs": model_kwargs,
        "input": dict(OFFICIAL_INPUT),
        "state_dict": state_dict,
    }
    torch.save(out, args.dst)
    print(f"wrote {args.dst}: {args.model} ({activation}), {len(state_dict)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
