"""``pipeline``: four runs in the recipe's order, and pipeline.json naming each as it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_fixtures import write_tiny_set

from training import trainer
from training.pipeline_cmd import PIPELINE_JSON, run_pipeline

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
    assert set(record) == {"phase1", "phase2"} and all(set(record[p]) == {"stage1", "stage2"} for p in record)
    # As each run started, the runs after it were still null.
    assert [sum(v is not None for ph in snap.values() for v in ph.values()) for snap in seen_at_start] == [1, 2, 3, 4]

    infos = {(p, s): json.loads((runs / record[p][s] / "run.json").read_text()) for p in record for s in record[p]}
    assert all(info["status"] == "finished" for info in infos.values())
    assert infos["phase1", "stage1"]["backbone"] == infos["phase1", "stage2"]["backbone"] == "vgg16_bn"
    assert infos["phase2", "stage1"]["backbone"] == infos["phase2", "stage2"]["backbone"] == "inception_v3"
    for phase in ("phase1", "phase2"):
        assert infos[phase, "stage2"]["parent_run"] == record[phase]["stage1"]
        assert infos[phase, "stage2"]["stage"] == 2
    # Phase 1 trains on a patient subset, phase 2 on all the data.
    assert infos["phase1", "stage1"]["data"]["n_images"] < infos["phase2", "stage1"]["data"]["n_images"]
