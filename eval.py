"""Evaluate checkpoints: `python eval.py checkpoint=PATH [data.root=...]` (see configs/eval.yaml).

Checkpoints are loaded weights-only: a file that would run code when unpickled is refused (exit 2).
"""

import os

# Before torch loads OpenMP: a thread that waits for work sleeps instead of spinning against other
# processes on the cores (a value already in the environment wins; see acon/cpu_budget.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import acon.config_schema  # noqa: E402, F401  (registers the typed schemas before Hydra composes)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; works under torchrun (every image counted exactly once)."""
    from acon.checkpoint import CheckpointError
    from acon.cli import one_line_errors
    from acon.data.folder import BadImageError
    from acon.evaluation import run_eval
    from acon.validate import check_eval_config

    with one_line_errors(CheckpointError, FileNotFoundError, KeyError, ValueError, BadImageError):
        check_eval_config(cfg)
        run_eval(cfg)


if __name__ == "__main__":
    from acon.cli import preflight
    from acon.validate import check_eval_config

    preflight("eval", check_eval_config)
    main()
