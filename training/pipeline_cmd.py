"""``pipeline``: the seed's two-phase recipe, four runs in a row.

Phase 1 trains VGG16 on a patient subset (stage 1, then stage 2 from it); phase 2 trains Inception_v3
on all the data (stage 1, then stage 2). ``RUNS_DIR/pipeline.json`` names the four runs
(``{"phase1": {"stage1": RUN, "stage2": RUN}, "phase2": {...}}``, run ids, null until started) and is
rewritten atomically as each run starts, so a dashboard can follow. Presets are YAML files in
``training/configs/`` (``quick`` for a 2-core CPU, ``full`` for GPUs). The last line of stdout is the
path of pipeline.json. Exit 0 when all four runs finished, 1 when one failed, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from training.exits import EXIT_OK, run_reporting_errors

log = logging.getLogger(__name__)

PIPELINE_JSON = "pipeline.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder (RSNA layout)")
    parser.add_argument("--preset", default="quick", metavar="quick|full|FILE.yaml", help="recipe preset (default quick)")
    parser.add_argument("--runs-dir", metavar="DIR", help="where the runs and pipeline.json go (default: the preset's, else runs/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a TrainConfig field in all four runs (value parsed as YAML; repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def empty_record() -> dict[str, dict[str, str | None]]:
    return {"phase1": {"stage1": None, "stage2": None}, "phase2": {"stage1": None, "stage2": None}}


def write_record(path: Path, record: dict[str, Any]) -> None:
    from hemorrhage_core.runs import atomic_write_text, dumps_json

    atomic_write_text(path, dumps_json(record))


def run_pipeline(data: str, preset_name: str, *, runs_dir: str | None = None, overrides: dict | None = None) -> Path:
    """Run the four trainings; return the path of pipeline.json. Stops at the first failed run."""
    from training.config import PHASES, PipelinePreset
    from training.distributed import broadcast, detect
    from training.train_cmd import exit_code_for
    from training.trainer import fit

    preset = PipelinePreset.load(preset_name)
    fixed = dict(overrides or {})
    fixed["data"] = data
    if runs_dir is not None:
        fixed["runs_dir"] = runs_dir
    configs = {phase: {stage: preset.config(phase, stage, fixed) for stage in ("stage1", "stage2")} for phase in PHASES}
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

            log.info("pipeline %s %s: %s stage %d", phase, stage, config.backbone, config.stage)
            run_dir = fit(config, on_start=started_run if main else None)
            code = broadcast(exit_code_for(run_dir) if main else None, detect())
            if code != EXIT_OK:
                raise PipelineStopped(f"{phase} {stage} run {run_dir.name} did not finish", run_dir)
            stage1_dir = run_dir
    if main:
        log.info("pipeline finished in %.1f s", time.perf_counter() - started)
    return record_path


class PipelineStopped(RuntimeError):
    def __init__(self, message: str, run_dir: Path) -> None:
        super().__init__(message)
        self.run_dir = run_dir


def run(args: argparse.Namespace) -> int:
    from training.distributed import detect
    from training.train_cmd import parse_sets

    def work():
        overrides = parse_sets(args.set)
        if args.no_progress:
            overrides["progress"] = False
        return run_pipeline(args.data, args.preset, runs_dir=args.runs_dir, overrides=overrides)

    record_path = run_reporting_errors(work, failed=(PipelineStopped,))
    if isinstance(record_path, int):
        return record_path
    if detect().is_main:
        print(record_path, flush=True)
    return EXIT_OK
