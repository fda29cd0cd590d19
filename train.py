"""Train a model: `python train.py [group=option ...] [key=value ...]` (see configs/train.yaml).

Exit status: 0 done, 2 bad config/data/checkpoint (one ``error:`` line), 3 non-finite loss under
``trainer.nan_policy=stop``, 75 preempted (SIGTERM/SIGUSR1) after saving a checkpoint, 130 interrupted
(SIGINT, Ctrl-C) after saving a checkpoint; rerun the same command to resume.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final top-1 error (for sweepers)."""
    from acon.checkpoint import CheckpointError
    from acon.data.folder import BadImageError
    from acon.preempt import INTERRUPT_EXIT_CODE
    from acon.trainer import train
    from acon.validate import ConfigError

    try:
        results = train(cfg)
    except (ConfigError, CheckpointError, FileNotFoundError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second Ctrl-C while saving
        print("acon: interrupted; nothing saved since the last checkpoint", file=sys.stderr, flush=True)
        sys.exit(INTERRUPT_EXIT_CODE)
    return results["top1_err"] if results else None


def check_groups() -> None:
    """Unknown group options (``model=nope``) fail with one line listing the choices, before Hydra runs."""
    from acon.validate import ConfigError, check_cli_groups

    try:
        check_cli_groups(sys.argv[1:], CONFIGS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_groups()
    main()
