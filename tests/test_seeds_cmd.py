"""``seeds``: a recipe's AUC spread over training seeds, bars, and two recipes compared beyond it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score
from test_compare_cmd import call, make_run
from test_evaluations import predictions

from hemorrhage_core import evaluations as ev
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.seed_spread import SeedSpreadError, parse_bars, seed_difference


def _with_seed(run, seed: int):
    info = json.loads((run / "run.json").read_text())
    info["config"] = {"seed": seed}
    (run / "run.json").write_text(json.dumps(info))
    return run


def _noisy(frame, rng, noise: float):
    out = frame.copy()
    out[ev.PROB_COLUMNS] = np.clip(frame[ev.PROB_COLUMNS].to_numpy() + rng.normal(0, noise, (len(frame), 6)), 0, 1)
    return out


@pytest.fixture
def groups(tmp_path):
    """Three runs of one recipe and three of a weaker one, at training seeds 0-2, on the same images."""
    base = predictions(n_patients=40, seed=0, signal=2.5)
    rng = np.random.default_rng(3)
    a = [_noisy(base, rng, 0.10) for _ in range(3)]
    b = [_noisy(base, rng, 0.40) for _ in range(3)]
    runs_a = [_with_seed(make_run(tmp_path, f"a{s}", f, backbone="inception_v3"), s) for s, f in enumerate(a)]
    runs_b = [_with_seed(make_run(tmp_path, f"b{s}", f), s) for s, f in enumerate(b)]
    return runs_a, runs_b, a, b


def _aucs(frames):
    return np.array([[roc_auc_score(f[f"true_{label}"], f[f"prob_{label}"]) for label in LABELS] for f in frames])


def test_spread_and_bars_match_a_direct_computation(groups, capsys):
    runs_a, _, frames_a, _ = groups
    code, out, err = call(capsys, "seeds", "--runs", *map(str, runs_a), "--bar", "any=0.5", "--bar", "subtypes=0.99",
                          "--json")
    assert code == 0, err
    result = json.loads(out)
    expected = _aucs(frames_a)
    assert result["n_images"] == len(frames_a[0])
    assert [r["seed"] for r in result["a"]["runs"]] == [0, 1, 2]
    for j, label in enumerate(LABELS):
        row = result["a"]["spread"]["labels"][label]
        assert row["mean"] == pytest.approx(expected[:, j].mean())
        assert row["sd"] == pytest.approx(expected[:, j].std(ddof=1))
        assert (row["min"], row["max"]) == (pytest.approx(expected[:, j].min()), pytest.approx(expected[:, j].max()))
        assert row["below"] == int((expected[:, j] < (0.5 if label == "any" else 0.99)).sum())
    # No run reaches 0.99 on every subtype: none meets every bar, and each names what it missed.
    assert result["a"]["spread"]["meet_bars"] == 0
    assert all(set(r["missed"]) <= set(SUBTYPES) and r["missed"] for r in result["a"]["spread"]["runs"])
    code, out, _ = call(capsys, "seeds", "--runs", *map(str, runs_a), "--bar", "subtypes=0.5")
    assert code == 0 and "3 of 3 runs meet every bar." in out and "training seeds 0, 1, 2" in out


def test_groups_at_the_same_seeds_are_paired_by_seed_else_compared_by_welch(groups, capsys):
    runs_a, runs_b, frames_a, frames_b = groups
    a, b = _aucs(frames_a), _aucs(frames_b)
    # B listed in another order: the pairs still follow the training seeds.
    code, out, err = call(capsys, "seeds", "--runs", *map(str, runs_a), "--against", *map(str, runs_b[::-1]), "--json")
    assert code == 0, err
    difference = json.loads(out)["difference"]
    assert difference["test"] == "paired by training seed"
    for j, label in enumerate(LABELS):
        reference = stats.ttest_rel(a[:, j], b[:, j])
        row = difference["labels"][label]
        assert row["diff"] == pytest.approx(a[:, j].mean() - b[:, j].mean())
        assert row["p_value"] == pytest.approx(reference.pvalue)
        assert row["ci"] == pytest.approx(list(reference.confidence_interval(0.95)))
    # Each group is held to its own bars where --against-bar gives them.
    code, out, _ = call(capsys, "seeds", "--runs", *map(str, runs_a), "--bar", "subtypes=0.5", "--against",
                        *map(str, runs_b), "--against-bar", "subtypes=0.999", "--json")
    result = json.loads(out)
    assert (result["a"]["spread"]["meet_bars"], result["b"]["spread"]["meet_bars"]) == (3, 0)
    assert result["b"]["spread"]["labels"]["epidural"]["bar"] == 0.999
    code, _, err = call(capsys, "seeds", "--runs", *map(str, runs_a), "--against-bar", "any=0.9")
    assert code == 2 and "--against-bar needs --against" in err
    # Other seeds on one side: Welch's test over the runs.
    welch = seed_difference(a, [0, 1, 2], b, [5, 6, 7])
    assert welch["test"] == "Welch"
    for j, label in enumerate(LABELS):
        reference = stats.ttest_ind(a[:, j], b[:, j], equal_var=False)
        assert welch["labels"][label]["p_value"] == pytest.approx(reference.pvalue)
        assert welch["labels"][label]["ci"] == pytest.approx(list(reference.confidence_interval(0.95)))
    with pytest.raises(SeedSpreadError, match="two runs on each side"):
        seed_difference(a[:1], [0], b, [0, 1, 2])


def test_refuses_runs_it_cannot_summarise_together(groups, tmp_path, capsys):
    runs_a, runs_b, frames_a, _ = groups
    other = _with_seed(make_run(tmp_path, "fewer", frames_a[0].iloc[:-6], backbone="inception_v3"), 5)
    code, _, err = call(capsys, "seeds", "--runs", str(runs_a[0]), str(other))
    assert code == 2 and "other images" in err
    relabelled = frames_a[0].copy()
    relabelled.loc[0, "true_any"] = 1 - relabelled.loc[0, "true_any"]
    wrong = _with_seed(make_run(tmp_path, "relabelled", relabelled, backbone="inception_v3"), 6)
    code, _, err = call(capsys, "seeds", "--runs", str(runs_a[0]), str(wrong))
    assert code == 2 and "labels the same images differently" in err
    code, _, err = call(capsys, "seeds", "--runs", str(runs_a[0]), str(runs_b[0]))
    assert code == 2 and "one backbone and stage" in err
    code, _, err = call(capsys, "seeds", "--runs", str(runs_a[0]), f"{runs_a[0]}/")
    assert code == 2 and "named twice" in err
    code, _, err = call(capsys, "seeds", "--runs", *map(str, runs_a), "--evaluation", "seed9")
    assert code == 2 and "seed9" in err


@pytest.mark.parametrize("spec", ["any", "any=1.5", "anything=0.9", "any=x"])
def test_a_bar_names_a_label_and_an_auc(spec):
    with pytest.raises(SeedSpreadError):
        parse_bars([spec])
    assert parse_bars(["subtypes=0.9", "any=0.95"]) == {**dict.fromkeys(SUBTYPES, 0.9), "any": 0.95}
