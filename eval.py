"""Evaluate checkpoints: `python eval.py checkpoint=PATH [data.root=...]` (see configs/eval.yaml).

Checkpoints are loaded weights-only: a file that would run code when unpickled is refused (exit 2).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; works under torchrun (every image counted exactly once)."""
    from acon.checkpoint import CheckpointError
    from acon.data.folder import BadImageError
    from acon.evaluation import run_eval
    from acon.validate import ConfigError

    try:
        run_eval(cfg)
    except (CheckpointError, ConfigError, FileNotFoundError, KeyError, ValueError, BadImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from acon.validate import ConfigError, check_cli_groups

    try:
        check_cli_groups(sys.argv[1:], CONFIGS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
