"""Convert an authors' released checkpoint (ShuffleNetV2 / ResNet, ReLU / ACON-C / Meta-ACON).

    python scripts/convert_official_checkpoint.py IN OUT --model shufflenetv2_x1_5 [--activation acon_c]

Writes ``{'model', 'activation', 'model_kwargs', 'input', 'state_dict'}`` to OUT; the state dict loads
into ``models.create_model(model, activation, **model_kwargs)``. The activation is inferred from the
checkpoint's keys when not given. The converted model expects the authors' input: BGR, 0-255, no
mean/std normalisation (``input``). ``python eval.py checkpoint=OUT`` evaluates OUT with that input.

A file that cannot be read, or whose keys belong to another architecture than ``--model`` (named when
it is one of ours), gives one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acon.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from models import convert_official_state_dict, list_models  # noqa: E402
from models.official import OFFICIAL_INPUT, infer_official_activation, official_num_classes  # noqa: E402


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
    ap.add_argument(
        "--num-classes", type=int, default=None, help="classifier outputs (default: read from the checkpoint)"
    )
    args = ap.parse_args(argv)
    try:
        checkpoint = load_checkpoint(args.src)
        activation = args.activation or infer_official_activation(checkpoint)
        model_kwargs = {"variant": args.variant} if args.variant else {}
        num_classes = args.num_classes or official_num_classes(checkpoint, args.model)
        if num_classes:
            model_kwargs["num_classes"] = num_classes
        state_dict = convert_official_state_dict(checkpoint, args.model, activation, **model_kwargs)
    except (CheckpointError, KeyError, TypeError, ValueError) as err:
        reason = err.args[0] if isinstance(err, KeyError) and err.args else err
        where = "" if isinstance(err, CheckpointError) else f"{args.src}: "
        print(f"error: {where}{reason}", file=sys.stderr)
        return 2
    out = {
        "model": args.model,
        "activation": activation,
        "model_kwargs": model_kwargs,
        "input": dict(OFFICIAL_INPUT),
        "state_dict": state_dict,
    }
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.dst)
    print(f"wrote {args.dst}: {args.model} ({activation}), {len(state_dict)} tensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
