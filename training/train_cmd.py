"""``train``: train one model (stage 1 or 2) into a new run directory, or ``--resume`` one.

Settings come, weakest first, from the TrainConfig defaults, ``--config FILE.yaml`` (a mapping of
TrainConfig fields), the named flags, then ``--set KEY=VALUE`` (any field, value read as YAML). The last
line of stdout is the run directory's path. Exit 0 finished, 1 failed (e.g. a NaN loss), 2 unusable
input (bad config, data or checkpoint), 130 interrupted. A pipeline preset (``training/configs/full.yaml``:
``defaults``, ``phase1``, ``phase2``) is four runs, not one: ``--config`` refuses it and names the
``pipeline`` command that runs it.
"""

from __future__ import annotations

import argparse
import logging

# parse_sets is re-exported: older callers (bench_train, tests) import it from here.
from training.config_args import add_config_arguments, config_from_args, parse_sets  # noqa: F401
from training.exits import EXIT_OK, run_exit_code

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--init-from", metavar="RUN_DIR", help="stage-1 run whose best model stage 2 starts from")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this interrupted run from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def run(args: argparse.Namespace) -> int:
    from training.config import ConfigError
    from training.distributed import detect
    from training.trainer import fit, resume_config

    if args.resume:
        config = resume_config(args.resume)
        if args.no_progress:
            config = config.replace(progress=False)
    else:
        if args.config:
            refuse_pipeline_preset(args.config)
        config = config_from_args(args)
        if not config.data:
            raise ConfigError("--data is required (or give data: in --config)")
    run_dir = fit(config, resume=args.resume)
    if detect().is_main:
        print(run_dir, flush=True)
        return run_exit_code(run_dir)
    return EXIT_OK


def refuse_pipeline_preset(path: str) -> None:
    """ConfigError naming the ``pipeline`` command when ``path`` is a pipeline preset, not TrainConfig fields."""
    from pathlib import Path

    from training.config import CONFIG_DIR, PHASES, ConfigError, read_yaml_mapping

    sections = sorted(set(read_yaml_mapping(path)) & {"defaults", *PHASES})
    if sections:
        shipped = Path(path).resolve().parent == CONFIG_DIR
        preset = Path(path).stem if shipped else path
        raise ConfigError(
            f"--config {path} is a pipeline preset ({', '.join(sections)}: four runs), not one run's settings; "
            f"run it with `python -m training pipeline --data DIR --preset {preset}` (under torchrun too), "
            "or give train a YAML mapping of TrainConfig fields"
        )
