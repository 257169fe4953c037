"""``pipeline``: four runs in the recipe's order, and pipeline.json naming each as it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from train_fixtures import write_tiny_set

from hemorrhage_core.labels import LABELS
from training import trainer
from training.config import PipelinePreset
from training.pipeline_cmd import PIPELINE_JSON, recipe_configs, run_pipeline

TINY_PRESET = """
defaults: {image_size: 32, input_size: 32, epochs: 1, batch_size: 4, threads: 1, max_steps_per_epoch: 2,
           gallery_size: 2, val_fraction: 0.3, augment: false, progress: false, warmup_epochs: 0}
phase1:
  subset: 0.6
  stage1: {backbone: vgg16_bn}
  stage2: {lr: 5.0e-4}
phase2:
  stage1: {backbone: inception_v3, input_size: 75}
  stage2: {}
"""


@pytest.mark.slow
def test_pipeline_runs_the_recipe_and_names_each_run_as_it_starts(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_tiny_set(data)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    runs = tmp_path / "runs"
    seen_at_start: list[dict] = []
    real_fit = trainer.fit

    def watching_fit(config, *, on_start=None, resume=None):
        def started(run_dir: Path) -> None:
            on_start(run_dir)
            seen_at_start.append(json.loads((runs / PIPELINE_JSON).read_text()))
            assert run_dir.name in json.dumps(seen_at_start[-1])

        return real_fit(config, on_start=started, resume=resume)

    monkeypatch.setattr(trainer, "fit", watching_fit)
    record_path = run_pipeline(str(data), str(preset), runs_dir=str(runs))
    assert record_path == runs / PIPELINE_JSON
    record = json.loads(record_path.read_text())
    assert set(record) == {"phase1", "phase2", "test"}
    phases = ("phase1", "phase2")
    assert all(set(record[p]) == {"stage1", "stage2"} for p in phases)
    # As each run started, the runs after it were still null.
    assert [sum(v is not None for p in phases for v in snap[p].values()) for snap in seen_at_start] == [1, 2, 3, 4]
    assert all(snap["test"] is None for snap in seen_at_start)

    infos = {(p, s): json.loads((runs / record[p][s] / "run.json").read_text()) for p in phases for s in record[p]}
    assert all(info["status"] == "finished" for info in infos.values())
    assert infos["phase1", "stage1"]["backbone"] == infos["phase1", "stage2"]["backbone"] == "vgg16_bn"
    assert infos["phase2", "stage1"]["backbone"] == infos["phase2", "stage2"]["backbone"] == "inception_v3"
    for phase in ("phase1", "phase2"):
        assert infos[phase, "stage2"]["parent_run"] == record[phase]["stage1"]
        assert infos[phase, "stage2"]["stage"] == 2
    # Phase 1 trains on a patient subset, phase 2 on all the data.
    assert infos["phase1", "stage1"]["data"]["n_images"] < infos["phase2", "stage1"]["data"]["n_images"]


def _saved_test(run_dir: Path) -> tuple[pd.DataFrame, dict]:
    folder = run_dir / "evaluations" / "test"
    return pd.read_csv(folder / "predictions.csv"), json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_pipeline_holds_out_test_patients_and_evaluates_all_four_runs_on_them(tmp_path):
    data = tmp_path / "data"
    write_tiny_set(data, n_patients=12)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    runs = tmp_path / "runs"
    record = json.loads(run_pipeline(str(data), str(preset), runs_dir=str(runs), test_fraction=0.25).read_text())
    test = record["test"]
    assert test == {"source": "holdout", "n_patients": 3, "n_images": 12, "evaluation": "test",
                    "fraction": 0.25, "seed": 0}
    run_dirs = [runs / record[p][s] for p in ("phase1", "phase2") for s in ("stage1", "stage2")]
    held_out = None
    image_ids = None
    for run_dir in run_dirs:
        split = pd.read_csv(run_dir / "split.csv")
        roles = split.groupby("role")["patient"].apply(set).to_dict()
        # The test patients (from the saved, hashed ids) are neither trained nor validated on.
        assert roles["test"].isdisjoint(roles["train"]) and roles["test"].isdisjoint(roles["val"])
        held_out = roles["test"] if held_out is None else held_out
        assert roles["test"] == held_out  # every run holds out the same patients
        val_patients = set(pd.read_csv(run_dir / "predictions.csv")["patient"])
        assert val_patients <= roles["val"] and val_patients.isdisjoint(held_out)
        predictions, saved = _saved_test(run_dir)
        assert set(predictions["patient"]) == held_out
        ids = sorted(predictions["image_id"])
        image_ids = ids if image_ids is None else image_ids
        assert ids == image_ids  # the four runs are scored on exactly the same images
        # Saved metrics agree with a recomputation from the saved predictions.
        assert saved["n_images"] == len(predictions) == 12 and saved["n_studies"] == predictions["series"].nunique()
        for label in LABELS:
            truth, prob = predictions[f"true_{label}"], predictions[f"prob_{label}"]
            expected = roc_auc_score(truth, prob) if 0 < truth.sum() < len(truth) else None
            assert saved["auc"][label] == (pytest.approx(expected) if expected is not None else None)
            assert saved["brier"][label] == pytest.approx(float(((prob - truth) ** 2).mean()))
        thresholds = json.loads((run_dir / "thresholds.json").read_text())
        assert saved["threshold"] == thresholds["slice"]


def _seeds(preset_text: str, tmp_path: Path, **fixed) -> set[tuple[int, int]]:
    """(seed, test_seed) of the four runs the pipeline would start."""
    path = tmp_path / "preset.yaml"
    path.write_text(preset_text)
    configs = recipe_configs(PipelinePreset.load(str(path)), {"data": str(tmp_path), **fixed})
    return {(c.seed, c.test_seed) for stages in configs.values() for c in stages.values()}


def test_all_four_runs_hold_out_the_test_patients_of_the_seed_the_preset_or_command_line_names(tmp_path):
    # No test_seed anywhere: phase 1's first run's training seed draws the test patients (as before).
    assert _seeds(TINY_PRESET.replace("subset: 0.6", "subset: 0.6\n  seed: 3"), tmp_path) == {(3, 3), (0, 3)}
    # A preset that names its test seed keeps it, whatever the phases' training seeds (it was once
    # replaced by phase 1's seed, so a preset training at seed 2 drew other test patients than seed 0).
    named = TINY_PRESET.replace("defaults: {", "defaults: {test_seed: 0, ").replace("subset: 0.6", "subset: 0.6\n  seed: 2")
    assert _seeds(named, tmp_path) == {(2, 0), (0, 0)}
    # The command line wins over both.
    assert _seeds(named, tmp_path, test_seed=7, seed=4) == {(4, 7)}
