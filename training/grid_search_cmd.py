"""``grid-search``: scikit-learn's GridSearchCV over the trainer, patients grouped by GroupKFold.

The grid file (YAML) holds ``grid`` (TrainConfig field -> list of values), optionally ``scoring``
(auc_mean | weighted_log_loss), ``folds`` and ``base`` (TrainConfig fields for every fit). Results go
to a grid run: run.json (kind "grid", with grid, scoring, folds, best_params, best_score) and
grid_results.csv (``cv_results_``). The last line of stdout is the grid run's path. Exit 0 finished,
1 when no candidate produced a finite score, 2 unusable input, 130 interrupted (``training.exits``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.config_args import add_config_arguments

    parser.add_argument("--grid", required=True, metavar="FILE.yaml", help="parameter grid (see training/configs/grid-example.yaml)")
    parser.add_argument("--folds", type=int, metavar="K", help=f"GroupKFold splits by patient (default: the file's, else {DEFAULT_FOLDS})")
    parser.add_argument("--scoring", choices=("auc_mean", "weighted_log_loss"), help="default: the file's, else auc_mean")
    parser.add_argument("--init-from", metavar="RUN_DIR", help="stage-1 run that stage-2 fits start from")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    add_config_arguments(parser)


def load_grid(path: str) -> dict[str, Any]:
    """Read and check a grid file: {"grid": {field: [values]}, "scoring", "folds", "base": {...}}."""
    from training.config import ConfigError, read_yaml_mapping
    from training.estimator import TUNABLE

    spec = read_yaml_mapping(path)
    unknown = set(spec) - {"grid", "scoring", "folds", "base", "description"}
    if unknown:
        raise ConfigError(f"grid file {path}: unknown keys {sorted(unknown)}; use grid, scoring, folds, base")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"grid file {path} needs a non-empty 'grid' mapping of field -> list of values")
    for name, values in grid.items():
        if name not in TUNABLE:
            raise ConfigError(f"grid file {path}: {name!r} cannot be searched; searchable: {', '.join(TUNABLE)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid file {path}: {name} needs a non-empty list of values")
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"grid file {path}: 'base' must be a mapping of TrainConfig fields")
    return {"grid": grid, "scoring": spec.get("scoring"), "folds": spec.get("folds"), "base": base}


def check_grouped(cv, X, groups) -> list[dict[str, int]]:
    """Per split: patient and image counts; refuses a split that puts a patient on both sides."""
    import numpy as np

    summary = []
    for k, (fit_idx, test_idx) in enumerate(cv.split(X, groups=groups)):
        shared = set(np.asarray(groups)[fit_idx]) & set(np.asarray(groups)[test_idx])
        if shared:
            raise RuntimeError(f"split {k} puts {len(shared)} patients on both sides")
        summary.append({
            "split": k, "n_fit_images": int(len(fit_idx)), "n_test_images": int(len(test_idx)),
            "n_fit_patients": int(len(set(np.asarray(groups)[fit_idx]))),
            "n_test_patients": int(len(set(np.asarray(groups)[test_idx]))),
        })
    return summary


def grid_search(config, grid_spec: dict[str, Any], *, folds: int, scoring: str):
    """Run GridSearchCV; return (grid run directory, fitted GridSearchCV)."""
    import numpy as np
    from sklearn.model_selection import GridSearchCV, GroupKFold

    from hemorrhage_core.labels import LABELS
    from hemorrhage_core.runs import RunWriter
    from training import trainer
    from training.config import ConfigError
    from training.distributed import DistEnv
    from training.estimator import HemorrhageEstimator, make_scorer

    env = DistEnv()
    config = trainer.adopt_parent(config)
    index = trainer.load_index(config, env)
    cache = trainer.build_cache(config, index.table, env)  # once, for every fit and score
    # A held-out test set (test_fraction) stays out of the search too: it chooses nothing.
    table, _ = trainer.holdout_test(config, index.table)
    table = trainer.patient_subset(config, table)
    skipped = sorted(set(index.report.missing_ids) | set(index.report.unreadable))
    if cache is not None:
        skipped = sorted(set(skipped) | (set(cache.failed) & set(table["image_id"])))
        table = cache.usable(table)
    # Images with several subtypes stay in the folds: each fit's stage-1 dataset leaves them out of
    # training or shares their target (stage1_multi, which a grid may vary), and the folds score all
    # six labels on every image, as the trainer's validation does.
    X = table.reset_index(drop=True)
    groups = X["patient_id"].astype(str).to_numpy()
    if len(set(groups)) < folds:
        raise ConfigError(f"{folds} folds need at least {folds} patients, the data has {len(set(groups))}")
    cv = GroupKFold(n_splits=folds)
    split_summary = check_grouped(cv, X, groups)

    writer = RunWriter.create(
        config.runs_dir, backbone=config.backbone, stage=config.stage, config=config.to_dict(), kind="grid",
        parent_run=Path(config.init_from).name if config.init_from else None,
        data={"dir": str(config.data), "fingerprint": trainer.data_fingerprint(X), "n_images": len(X),
              "n_train": len(X), "n_val": None, "n_patients_train": int(len(set(groups))),
              "n_patients_val": None, "skipped": skipped},
        split={"seed": config.seed, "val_fraction": None, "val_patients": []},
        epochs_planned=config.epochs, device="cpu", world_size=1,
        extra={"grid": grid_spec["grid"], "scoring": scoring, "folds": folds, "fold_sizes": split_summary,
               "best_params": None, "best_score": None},
    )
    started = time.perf_counter()
    with writer:
        n_candidates = int(np.prod([len(v) for v in grid_spec["grid"].values()]))
        writer.log(f"grid search: {n_candidates} candidates x {folds} patient-grouped folds, scoring {scoring}, "
                   f"{len(X)} images of {len(set(groups))} patients")
        search = GridSearchCV(
            HemorrhageEstimator(config), grid_spec["grid"], scoring=make_scorer(scoring), cv=cv,
            refit=False, n_jobs=1, error_score=np.nan, verbose=0,
        )
        search.fit(X, X[list(LABELS)].to_numpy(), groups=groups)
        writer.write_grid_results(search.cv_results_)
        scores = np.asarray(search.cv_results_["mean_test_score"], dtype=float)
        if not np.isfinite(scores).any():
            writer.finish("failed", "no candidate produced a finite score")
            return writer.path, search
        best = int(np.nanargmax(scores))
        best_params = search.cv_results_["params"][best]
        best_score = float(scores[best])
        if scoring == "weighted_log_loss":
            best_score = -best_score  # scorers maximise; report the loss itself
        writer.update(best_params=best_params, best_score=best_score)
        writer.log(f"best {best_params} {scoring} {best_score:.4f} after {time.perf_counter() - started:.1f}s")
        writer.finish("finished")
    return writer.path, search


def run(args: argparse.Namespace) -> int:
    from training.config import ConfigError, TrainConfig
    from training.config_args import config_from_args
    from training.exits import run_exit_code

    spec = load_grid(args.grid)
    base = TrainConfig.from_dict(spec["base"])
    config = config_from_args(args, base=base)
    if args.init_from:
        config = config.replace(init_from=args.init_from)
    if not config.data:
        raise ConfigError("--data is required")
    folds = args.folds or spec["folds"] or DEFAULT_FOLDS
    scoring = args.scoring or spec["scoring"] or "auc_mean"
    if int(folds) < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}")
    run_dir, _ = grid_search(config, spec, folds=int(folds), scoring=scoring)
    print(run_dir, flush=True)
    return run_exit_code(run_dir)
