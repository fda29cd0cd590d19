"""Train a model: `python train.py [group=option ...] [key=value ...]` (see configs/train.yaml).

Exit status: 0 done, 2 bad config/data/checkpoint, or a run dir that another live run is writing (one
``error:`` line naming the dir and the holder's host, pid and start time), 3 non-finite loss under
``trainer.nan_policy=stop``, 4 a write the filesystem refused (disk full, quota, read-only, permission:
one ``error:`` line naming the file and the space needed vs free; last.pt is the previous complete
checkpoint), 75 preempted (SIGTERM/SIGUSR1) or a stalled input pipeline (``trainer.data_timeout_s``)
after saving a checkpoint (75 asks for a requeue), 130 interrupted (SIGINT, Ctrl-C) after saving a
checkpoint; rerun the same command to resume.
"""

import os

# Before torch loads OpenMP: a thread that waits for work sleeps instead of spinning against other
# processes on the cores (a value already in the environment wins; see acon/cpu_budget.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

import sys  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import acon.config_schema  # noqa: E402, F401  (registers the typed schemas before Hydra composes)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the final primary metric, e.g. top-1 error (for sweepers)."""
    from acon.checkpoint import CheckpointError
    from acon.cli import fail, full_traceback, one_line_errors
    from acon.data.folder import BadImageError
    from acon.preempt import INTERRUPT_EXIT_CODE
    from acon.rundir import REFUSALS, exit_status, stop_quietly_if_echo
    from acon.trainer import train

    with one_line_errors(CheckpointError, FileNotFoundError, BadImageError):
        try:
            results = train(cfg)
        except FloatingPointError as e:
            if full_traceback():
                raise
            fail(str(e), status=3)
        except REFUSALS as e:  # a run dir in use (2), a refused write (4)
            if full_traceback():
                raise
            stop_quietly_if_echo(e)
            fail(str(e), status=exit_status(e))
        except KeyboardInterrupt:  # Ctrl-C before training started, or a second Ctrl-C while saving
            print("acon: interrupted; nothing saved since the last checkpoint", file=sys.stderr, flush=True)
            sys.exit(INTERRUPT_EXIT_CODE)
    return results[results["primary_metric"]] if results else None


if __name__ == "__main__":
    from acon.cli import preflight
    from acon.runlock import RunDirBusy, check_before_hydra, hydra_argv

    preflight("train", check_before_hydra, errors=(RunDirBusy,))  # a busy run dir: before Hydra writes
    sys.argv = hydra_argv(sys.argv)
    main()
