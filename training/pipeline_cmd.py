"""``pipeline``: the original report's two-phase recipe, four runs in a row, then a held-out test.

First a patient-disjoint test set is held out of DATA (``--test-fraction``, default 0.2, stratified on
``any`` at patient level, drawn with ``test_seed``: the command line's, the preset's, else phase 1's
training seed), or ``--test-data DIR`` is taken instead; neither phase trains, validates or selects on
it. Phase 1 trains VGG16 on a patient subset (stage 1, then stage 2 from it); phase 2 trains
Inception_v3 on all the rest (stage 1, then stage 2). Then all four runs are evaluated on exactly the
same test images and each saves that as its evaluation ``test``, so the final models compare slice by
slice (``python -m training compare``). ``RUNS_DIR/pipeline.json`` names the four runs (``{"phase1":
{"stage1": RUN, "stage2": RUN}, "phase2": {...}, "test": {"source", "n_patients", "n_images"}}``, run
ids, null until started) and is rewritten atomically as each run starts, so a dashboard can follow.
Presets are YAML files in ``training/configs/`` (``quick`` for a 2-core CPU, ``full`` for GPUs at the
original report's batch of 10, ``full-h100`` the same recipe at batch 128). Under torchrun every rank
runs the four trainings together (DDP) and rank 0 alone writes the records and evaluates the test set;
the README's multi-GPU section has the commands, which tests/test_ddp.py runs. The last line of stdout
is the path of pipeline.json. Exit 0 when all four runs finished, 1 when one failed, 2 on unusable
input, 130 when interrupted (``training.exits``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.exits import EXIT_FAILED, EXIT_OK, CommandError, run_exit_code
from training.numbers import fmt

if TYPE_CHECKING:
    from training.config import PipelinePreset, TrainConfig

log = logging.getLogger(__name__)

PIPELINE_JSON = "pipeline.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder (RSNA layout)")
    parser.add_argument("--preset", default="quick", metavar="quick|full|full-h100|FILE.yaml",
                        help="recipe preset (default quick)")
    parser.add_argument("--runs-dir", metavar="DIR", help="where the runs and pipeline.json go (default: the preset's, else runs/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a TrainConfig field in all four runs (value parsed as YAML; repeatable)",
    )
    parser.add_argument(
        "--test-fraction", type=float, default=0.2, metavar="F",
        help="share of DATA's patients held out as the test set before anything else (default 0.2; 0 = none)",
    )
    parser.add_argument(
        "--test-data", metavar="DIR",
        help="a separate data set (RSNA layout) to test on instead of holding patients out of DATA",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def empty_record() -> dict[str, dict[str, Any]]:
    return {"phase1": {"stage1": None, "stage2": None}, "phase2": {"stage1": None, "stage2": None}, "test": None}


def write_record(path: Path, record: dict[str, Any]) -> None:
    from hemorrhage_core.runs import atomic_write_text, dumps_json

    atomic_write_text(path, dumps_json(record))


def recipe_configs(preset: PipelinePreset, fixed: dict[str, Any]) -> dict[str, dict[str, TrainConfig]]:
    """``{phase: {stage: TrainConfig}}`` of the four runs, ``fixed`` (the command line's) over the preset.

    Every run holds out the same test patients: one ``test_seed`` for all four, the command line's,
    else the one the preset gives phase 1's first run, else that run's training seed.
    """
    from training.config import PHASES, STAGES

    fixed = dict(fixed)
    if "test_seed" not in fixed:
        first = preset.config("phase1", "stage1", fixed)
        fixed["test_seed"] = first.test_seed if preset.sets("phase1", "stage1", "test_seed") else first.seed
    return {phase: {stage: preset.config(phase, stage, fixed) for stage in STAGES} for phase in PHASES}


def run_pipeline(
    data: str,
    preset_name: str,
    *,
    runs_dir: str | None = None,
    overrides: dict | None = None,
    test_fraction: float = 0.2,
    test_data: str | None = None,
) -> Path:
    """Run the four trainings, then evaluate them on the test set; return the path of pipeline.json.
    Stops at the first failed run."""
    from training.config import PHASES, ConfigError, PipelinePreset
    from training.distributed import broadcast, detect
    from training.trainer import fit

    if test_data is not None and not Path(test_data).is_dir():
        raise ConfigError(f"--test-data {test_data}: no such folder")
    if test_data is not None and Path(test_data).resolve() == Path(data).resolve():
        raise ConfigError("--test-data must be another data set than --data (its patients would be trained on)")
    fixed = dict(overrides or {})
    fixed["data"] = data
    if runs_dir is not None:
        fixed["runs_dir"] = runs_dir
    fixed["test_fraction"] = 0.0 if test_data is not None else test_fraction
    configs = recipe_configs(PipelinePreset.load(preset_name), fixed)
    root = Path(configs["phase1"]["stage1"].runs_dir)
    main = detect().is_main
    record_path = root / PIPELINE_JSON
    record = empty_record()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        write_record(record_path, record)
    started = time.perf_counter()
    for phase in PHASES:
        stage1_dir = None
        for stage in ("stage1", "stage2"):
            config = configs[phase][stage]
            if stage == "stage2":
                config = config.replace(init_from=str(stage1_dir))

            def started_run(run_dir: Path, phase=phase, stage=stage) -> None:
                record[phase][stage] = run_dir.name
                write_record(record_path, record)

            # A stage-2 config takes its backbone from the stage-1 run it starts from.
            backbone = configs[phase]["stage1"].backbone
            log.info("pipeline %s %s: %s stage %d", phase, stage, backbone, config.stage)
            run_dir = fit(config, on_start=started_run if main else None)
            code = broadcast(run_exit_code(run_dir) if main else None, detect())
            if code != EXIT_OK:
                raise PipelineStopped(f"{phase} {stage} run {run_dir.name} did not finish", run_dir, code)
            stage1_dir = run_dir
    if main:
        log.info("pipeline trained its four runs in %.1f s", time.perf_counter() - started)
        record["test"] = evaluate_on_test(root, record, configs["phase1"]["stage1"], test_data)
        write_record(record_path, record)
        log.info("pipeline finished in %.1f s", time.perf_counter() - started)
    return record_path


def evaluate_on_test(root: Path, record: dict[str, Any], config, test_data: str | None) -> dict[str, Any]:
    """Evaluate the four runs on the same test images, each saved as its evaluation ``test``;
    returns pipeline.json's ``test`` entry (no identifiers)."""
    from hemorrhage_core.data import build_index
    from hemorrhage_core.evaluations import TEST
    from training.config import PHASES
    from training.evaluation import evaluate
    from training.trainer import holdout_test

    if test_data is not None:
        index = build_index(test_data, progress=False)
        rows, source, data_dir, split = index.table, "test_data", test_data, "all"
    else:
        index = build_index(config.data, progress=False)
        rows, source, data_dir, split = holdout_test(config, index.table)[1], "holdout", config.data, "test"
    entry: dict[str, Any] = {
        "source": source, "n_patients": int(rows["patient_id"].nunique()), "n_images": len(rows),
        "evaluation": TEST,
    }
    if test_data is not None:
        entry["dir"] = str(test_data)
    else:
        entry.update(fraction=config.test_fraction, seed=config.test_seed)
    for phase in PHASES:
        for stage in ("stage1", "stage2"):
            run_dir = root / record[phase][stage]
            result = evaluate(str(run_dir), data_dir, index=index, rows=rows, split=split, save=TEST,
                              batch_size=config.effective_eval_batch_size)
            log.info("pipeline %s %s test: AUC any %s on %d images", phase, stage,
                     fmt(result["auc"]["any"]), result["n_images"])
    return entry


class PipelineStopped(CommandError):
    """A run of the pipeline did not finish: the pipeline stops there, exiting with the run's code
    (1 failed, 130 interrupted)."""

    def __init__(self, message: str, run_dir: Path, code: int = EXIT_FAILED) -> None:
        super().__init__(message, code=code)
        self.run_dir = run_dir


def run(args: argparse.Namespace) -> int:
    from training.config_args import parse_sets
    from training.distributed import detect

    overrides = parse_sets(args.set)
    if args.no_progress:
        overrides["progress"] = False
    record_path = run_pipeline(args.data, args.preset, runs_dir=args.runs_dir, overrides=overrides,
                               test_fraction=args.test_fraction, test_data=args.test_data)
    if detect().is_main:
        print(record_path, flush=True)
    return EXIT_OK
