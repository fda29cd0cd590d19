"""Train a model: `python train.py [group=option ...] [key=value ...]` (see configs/train.yaml).

Exit status: 0 done, 2 bad config/data/checkpoint (one ``error:`` line), 3 non-finite loss under
``trainer.nan_policy=stop``, 75 preempted (SIGTERM/SIGUSR1) or a stalled input pipeline
(``trainer.data_timeout_s``) after saving a checkpoint (75 asks for a requeue), 130 interrupted
(SIGINT, Ctrl-C) after saving a checkpoint; rerun the same command to resume.
"""

import sys

import hydra
from omegaconf import DictConfig

import acon.config_schema  # noqa: F401  (registers the typed schemas before Hydra composes)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final primary metric, e.g. top-1 error (for sweepers)."""
    from acon.checkpoint import CheckpointError
    from acon.cli import fail, full_traceback, one_line_errors
    from acon.data.folder import BadImageError
    from acon.preempt import INTERRUPT_EXIT_CODE
    from acon.trainer import train

    with one_line_errors(CheckpointError, FileNotFoundError, BadImageError):
        try:
            results = train(cfg)
        except FloatingPointError as e:
            if full_traceback():
                raise
            fail(str(e), status=3)
        except KeyboardInterrupt:  # Ctrl-C before training started, or a second Ctrl-C while saving
            print("acon: interrupted; nothing saved since the last checkpoint", file=sys.stderr, flush=True)
            sys.exit(INTERRUPT_EXIT_CODE)
    return results[results["primary_metric"]] if results else None


if __name__ == "__main__":
    from acon.cli import preflight
    from acon.validate import check_train_command

    preflight("train", check_train_command)
    main()
