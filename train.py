"""Train a model: `python train.py [group=option ...] [key=value ...]` (see configs/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final top-1 error (for sweepers)."""
    from acon.checkpoint import CheckpointError
    from acon.trainer import train
    from acon.validate import ConfigError

    try:
        results = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return results["top1_err"] if results else None


if __name__ == "__main__":
    main()
