"""Blood areas and lesion sites of a synthetic set read back from its synth.json, AUC by blood area and
by site, and ``evaluate --by-size --by-site`` end to end on a written set and a real (untrained, tiny) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.evaluations import auc_by_site, auc_by_size
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic import write_dataset
from hemorrhage_core.synthetic.lesions import (
    Epidural,
    Intraparenchymal,
    Intraventricular,
    Subarachnoid,
    Subdural,
)
from hemorrhage_core.synthetic.truth import SEVERAL, blood_areas, lesion_site, lesion_sites
from training import cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, patients=6, slices_per_patient=5, size=96, seed=4, workers=1, progress=False)
    return root


def _labels(root: Path) -> pd.DataFrame:
    table = pd.read_csv(root / "stage_2_train.csv")
    parts = table["ID"].str.rsplit("_", n=1, expand=True)
    return table.assign(image_id=parts[0], label=parts[1]).pivot(index="image_id", columns="label", values="Label")


def test_areas_are_positive_exactly_where_the_set_is_labelled(synthetic):
    areas = blood_areas(synthetic).set_index("image_id")
    labels = _labels(synthetic).loc[areas.index]
    assert len(areas) == 30 and labels[list(SUBTYPES)].to_numpy().sum() > 0
    for label in LABELS:
        assert ((areas[label] > 0) == (labels[label] == 1)).all(), label
    # The union counts overlapping blood once: at least the largest subtype, at most their sum.
    assert (areas["any"] >= areas[list(SUBTYPES)].max(axis=1) - 1e-9).all()
    assert (areas["any"] <= areas[list(SUBTYPES)].sum(axis=1) + 1e-9).all()
    # Whole pixels of (250 mm / 96 px)².
    pixel_mm2 = (250.0 / 96) ** 2
    counts = areas[list(LABELS)].to_numpy() / pixel_mm2
    np.testing.assert_allclose(counts, np.rint(counts), atol=1e-6)


def test_a_subset_is_the_same_rows_in_the_order_asked(synthetic):
    every = blood_areas(synthetic).set_index("image_id")
    asked = list(every.index[::-7])
    some = blood_areas(synthetic, asked)
    assert some["image_id"].tolist() == asked
    pd.testing.assert_frame_equal(some.set_index("image_id"), every.loc[asked])


@pytest.mark.parametrize("read", [blood_areas, lesion_sites], ids=["areas", "sites"])
def test_refusals(synthetic, tmp_path, read):
    with pytest.raises(HemorrhageError, match="synthetic sets"):
        read(tmp_path)
    with pytest.raises(HemorrhageError, match="not slices of this synthetic set"):
        read(synthetic, ["ID_000000000"])
    # A label that the generator would not draw today (epidural on a slice without one): the set was
    # written by another version.
    changed = tmp_path / "changed"
    shutil.copytree(synthetic, changed)
    table = pd.read_csv(changed / "stage_2_train.csv")
    row = table.index[table["ID"].str.endswith("_epidural") & (table["Label"] == 0)][0]
    table.loc[row, "Label"] = 1 - table.loc[row, "Label"]
    table.to_csv(changed / "stage_2_train.csv", index=False)
    image_id = table.loc[row, "ID"].rsplit("_", 1)[0]
    with pytest.raises(HemorrhageError, match="generator has changed"):
        read(changed, [image_id])


def test_lesion_sites_name_the_region_around_the_head_and_the_subarachnoid_site():
    z = {"h_center_mm": 0.0, "h_half_mm": 10.0, "blood_hu": 70.0}
    # theta: degrees from the anterior midline on the lesion's side
    assert [lesion_site(Epidural(**z, theta_deg=t)) for t in (20.0, 60.0, 90.0, 150.0)] == ["front", "front", "side", "back"]
    assert lesion_site(Subdural(**z, theta_deg=121.0)) == "back"
    assert lesion_site(Subarachnoid(**z, site="convexity", theta_deg=100.0)) == "convexity, side"
    assert lesion_site(Subarachnoid(**z, site="interhemispheric", theta_deg=30.0)) == "interhemispheric, front"
    assert lesion_site(Subarachnoid(**z, site="interhemispheric", theta_deg=150.0)) == "interhemispheric, back"
    assert lesion_site(Subarachnoid(**z, site="sylvian", theta_deg=30.0)) == "sylvian"
    # a clot by the angle of its centre (x to the patient's left, y backwards): ahead, beside, behind
    assert [lesion_site(Intraparenchymal(**z, x_mm=x, y_mm=y)) for x, y in ((5.0, -30.0), (-22.0, -3.0), (11.0, 11.0))] \
        == ["front", "side", "back"]
    assert [lesion_site(Intraventricular(**z, cast=c)) for c in (True, False)] == ["cast", "fluid level"]


def test_sites_are_named_exactly_where_the_set_is_labelled(synthetic):
    sites = lesion_sites(synthetic).set_index("image_id")
    labels = _labels(synthetic).loc[sites.index]
    assert len(sites) == 30
    known = {"front", "side", "back", "cast", "fluid level", "sylvian", SEVERAL,
             *(f"convexity, {r}" for r in ("front", "side", "back")), "interhemispheric, front", "interhemispheric, back"}
    for label in SUBTYPES:
        assert ((sites[label] != "") == (labels[label] == 1)).all(), label
        assert set(sites[label]) <= known | {""}, label
    asked = list(sites.index[::-7])  # a subset, in the order asked
    assert lesion_sites(synthetic, asked)["image_id"].tolist() == asked


def test_auc_by_site_against_hand_counts():
    frame, _ = _frame([
        ("e1", {"epidural": 1}, 0.9), ("e2", {"epidural": 1}, 0.8), ("e3", {"epidural": 1}, 0.3),
        ("s1", {"subdural": 1}, 0.4), ("n1", {}, 0.2), ("n2", {}, 0.5),
    ])
    sites = pd.DataFrame([{"image_id": i, **{s: "" for s in SUBTYPES}} for i in frame["image_id"]])
    sites.loc[:2, "epidural"] = ["side", "side", "back"]
    sites.loc[3, "subdural"] = "front"
    by_site = auc_by_site(frame, sites)
    # sites by count, largest first; pairs won against every negative (0.4, 0.2, 0.5) and the bleeding one (0.4)
    assert [(g["site"], g["n"]) for g in by_site["epidural"]] == [("side", 2), ("back", 1)]
    assert [g["auc"] for g in by_site["epidural"]] == [pytest.approx(1.0), pytest.approx(1 / 3)]
    assert [g["auc_given_any"] for g in by_site["epidural"]] == [pytest.approx(1.0), pytest.approx(0.0)]
    # subdural's output is 0.5 everywhere: ties, against the epidural slices too
    assert by_site["subdural"] == [{"site": "front", "n": 1, "auc": pytest.approx(0.5), "auc_given_any": pytest.approx(0.5)}]
    assert by_site["intraparenchymal"] is None and "any" not in by_site


def _frame(rows: list[tuple[str, dict[str, int], float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, areas) for slices given as (id, positive subtypes -> area, epidural probability)."""
    preds, areas = [], []
    for image_id, blood, p in rows:
        truth = {f"true_{s}": int(s in blood) for s in SUBTYPES}
        truth["true_any"] = int(bool(blood))
        probs = {f"prob_{label}": 0.5 for label in LABELS} | {"prob_epidural": p}
        preds.append({"image_id": image_id, **truth, **probs})
        areas.append({"image_id": image_id, **{s: float(blood.get(s, 0)) for s in SUBTYPES},
                      "any": float(sum(blood.values()))})
    return pd.DataFrame(preds), pd.DataFrame(areas)


def test_auc_by_size_against_hand_counts():
    frame, areas = _frame([
        # six epidural positives, areas 10..60: the small pair scores low, the large pair high
        ("e1", {"epidural": 10}, 0.1), ("e2", {"epidural": 20}, 0.3),
        ("e3", {"epidural": 30}, 0.5), ("e4", {"epidural": 40}, 0.6),
        ("e5", {"epidural": 50}, 0.9), ("e6", {"epidural": 60}, 0.95),
        # negatives: two that bleed (another type), two without blood
        ("s1", {"subdural": 100}, 0.4), ("s2", {"subdural": 80}, 0.7),
        ("n1", {}, 0.2), ("n2", {}, 0.05),
    ])
    groups = auc_by_size(frame, areas, bins=3)["epidural"]
    assert [g["n"] for g in groups] == [2, 2, 2]
    assert [g["area_mm2"] for g in groups] == [[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]]
    # Pairs won out of 2 x 4 against every negative (0.4, 0.7, 0.2, 0.05) and 2 x 2 against the bleeding ones.
    assert [g["auc"] for g in groups] == [pytest.approx(3 / 8), pytest.approx(6 / 8), pytest.approx(1.0)]
    assert [g["auc_given_any"] for g in groups] == [pytest.approx(0.0), pytest.approx(2 / 4), pytest.approx(1.0)]
    by_size = auc_by_size(frame, areas, bins=3)
    assert by_size["intraparenchymal"] is None  # no positives
    assert by_size["subdural"] is None  # two positives cannot fill three groups
    assert all(g["auc_given_any"] is None for g in by_size["any"])  # no bleeding negatives for any
    with pytest.raises(ValueError, match="bins"):
        auc_by_size(frame, areas, bins=0)


def _tiny_run(runs_dir: Path) -> Path:
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v3_small", stage=2, input_size=32, hidden=(16, 8))
    writer = RunWriter.create(runs_dir, backbone=spec.backbone, stage=2, config={"image_size": 48})
    save_checkpoint(writer.checkpoint_path("best"), build_model(spec, weights="none"), prep=SlicePrep(48), config={})
    writer.finish()
    return writer.path


def test_evaluate_by_size_scores_the_saved_predictions_by_their_areas(synthetic, tmp_path, capsys):
    from hemorrhage_core.evaluations import load_evaluation

    run = _tiny_run(tmp_path / "runs")
    code = cli.main(["evaluate", "--run", str(run), "--data", str(synthetic), "--by-size", "--by-site", "--json",
                     "--save", "sized", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    saved = load_evaluation(run, "sized").predictions
    expected = auc_by_size(saved, blood_areas(synthetic, saved["image_id"].tolist()))
    assert result["by_size"] == json.loads(json.dumps(expected))
    by_site = auc_by_site(saved, lesion_sites(synthetic, saved["image_id"].tolist()))
    assert result["by_site"] == json.loads(json.dumps(by_site))
    positives = _labels(synthetic).loc[saved["image_id"]]
    for label in LABELS:
        if result["by_size"][label] is not None:
            assert sum(g["n"] for g in result["by_size"][label]) == int(positives[label].sum())
    for label in SUBTYPES:
        groups = result["by_site"][label] or []
        assert sum(g["n"] for g in groups) == int(positives[label].sum())
    # The table form prints the groups; a set without synth.json is refused with exit code 2.
    assert cli.main(["evaluate", "--run", str(run), "--data", str(synthetic), "--by-size", "--by-site",
                     "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "by blood area" in out and "by site: each subtype's positives by where the blood lies" in out
    plain = tmp_path / "plain"
    shutil.copytree(synthetic, plain)
    (plain / "synth.json").unlink()
    assert cli.main(["evaluate", "--run", str(run), "--data", str(plain), "--by-size", "--workers", "1"]) == 2
    assert cli.main(["evaluate", "--run", str(run), "--data", str(plain), "--by-site", "--workers", "1"]) == 2
    assert "synthetic sets" in capsys.readouterr().err
