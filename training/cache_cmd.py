"""``cache``: build the index and the preprocessed slice cache ahead of training, as training will read them.

The preprocessing (image size, windows, head crop) comes from the same TrainConfig fields training uses:
the defaults < ``--config FILE.yaml`` < ``--image-size`` < ``--set KEY=VALUE``, or, with ``--preset``, the
recipe's phases (one cache per distinct preprocessing; the full preset's two phases share one). A build
that was killed continues from its finished chunks. The cache goes where training looks for it:
``--cache-dir DIR`` is the same place as ``HEMORRHAGE_CT_CACHE=DIR`` (give training the same variable),
else ``DATA/.cache``. The last line of stdout is the (last) cache folder. Exit 0 done, 1 the build
failed (the disk filled up: rerun once there is room, and it continues), 2 unusable input or not enough
free space to start, 130 interrupted (a rerun continues).
"""

from __future__ import annotations

import argparse
import logging

from training.config_args import parse_sets
from training.exits import EXIT_OK

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder (RSNA layout)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="preprocessed slice size (default: the config's)")
    parser.add_argument("--preset", metavar="quick|full|FILE.yaml",
                        help="build what this pipeline preset trains on (each phase's preprocessing)")
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of TrainConfig fields")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a TrainConfig field (value parsed as YAML; repeatable), e.g. --set head_crop=false",
    )
    parser.add_argument("--workers", type=int, metavar="K", help="decoding processes (default: all CPUs)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="cache root, as HEMORRHAGE_CT_CACHE=DIR (default: that variable, else DATA/.cache)")
    parser.add_argument("--rebuild", action="store_true", help="build anew even if a fresh or unfinished cache exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def configs_from_args(args: argparse.Namespace) -> list:
    """The TrainConfig of each run the cache is for: one, or one per phase of ``--preset``."""
    from training.config import PHASES, ConfigError, PipelinePreset, TrainConfig

    overrides = {"data": args.data, **parse_sets(args.set)}
    if args.image_size is not None:
        overrides.setdefault("image_size", args.image_size)
    if args.no_progress:
        overrides["progress"] = False
    if args.preset and args.config:
        raise ConfigError("give --preset or --config, not both")
    if args.preset:
        preset = PipelinePreset.load(args.preset)
        return [preset.config(phase, "stage1", overrides) for phase in PHASES]
    base = TrainConfig.from_yaml(args.config) if args.config else None
    return [TrainConfig.from_dict(overrides, base=base)]


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.data.cache import slice_cache_dir
    from training.config import ConfigError
    from training.distributed import DistEnv
    from training.exits import CommandError
    from training.trainer import build_cache, load_index, slice_prep

    configs = configs_from_args(args)
    if not configs[0].cache:
        raise ConfigError("the config turns the cache off (cache: false): nothing to build")
    if args.workers is not None and args.workers < 1:
        raise CommandError(f"--workers must be at least 1, got {args.workers}")
    env = DistEnv()  # one process: under torchrun, training's rank 0 does this itself
    index = load_index(configs[0], env)
    cache_dir = slice_cache_dir(args.data, args.cache_dir) if args.cache_dir else None
    preps = list(dict.fromkeys(slice_prep(config) for config in configs))  # phases sharing one cache build it once
    caches = []
    for prep in preps:
        cache = build_cache(configs[0], index.table, env, prep,
                            workers=args.workers, cache_dir=cache_dir, rebuild=args.rebuild)
        caches.append(cache)
        size_gb = (cache.directory / "slices.npy").stat().st_size / 1e9
        log.info("slice cache %s: %d slices at %d px (%.1f GB), %d failed to decode",
                 prep.key(), len(cache), prep.image_size, size_gb, len(cache.failed))
    for cache in caches:
        print(cache.directory, flush=True)
    return EXIT_OK
