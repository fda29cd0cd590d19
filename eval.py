"""Evaluate checkpoints: `python eval.py checkpoint=PATH [data.root=...]` (see configs/eval.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; works under torchrun (every image counted exactly once)."""
    from acon.checkpoint import CheckpointError
    from acon.evaluation import run_eval

    try:
        run_eval(cfg)
    except (CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
