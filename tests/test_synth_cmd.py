"""``python -m training synth``: exit codes, the files it writes, and its refusals."""

from __future__ import annotations

import csv
import json

import pytest

from hemorrhage_core.labels import LABELS
from training.cli import main


def _args(out, *extra: str) -> list[str]:
    return [
        "synth",
        "--out",
        str(out),
        "--patients",
        "2",
        "--slices-per-patient",
        "3",
        "--size",
        "64",
        "--workers",
        "1",
        "--no-progress",
        *extra,
    ]


def test_synth_writes_the_rsna_layout(tmp_path, capsys):
    assert main(_args(tmp_path, "--json")) == 0
    printed = json.loads(capsys.readouterr().out)
    files = sorted((tmp_path / "stage_2_train").glob("ID_*.dcm"))
    assert len(files) == printed["n_images"] == 6 and printed["n_patients"] == 2
    with open(tmp_path / "stage_2_train.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["ID", "Label"] and len(rows) == 1 + 6 * 6
    assert {r[0].rsplit("_", 1)[0] for r in rows[1:]} == {f.stem for f in files}
    assert printed["counts"] == {
        n: sum(int(r[1]) for r in rows[1:] if r[0].endswith(f"_{n}")) for n in LABELS
    }
    record = json.loads((tmp_path / "synth.json").read_text())
    assert record["format_version"] == 1
    assert record["parameters"] == {"patients": 2, "slices_per_patient": 3, "size": 64, "seed": 0}
    assert record["summary"]["counts"] == printed["counts"]


def test_synth_prints_a_table_and_a_contact_sheet(tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    assert main(_args(tmp_path / "set", "--seed", "3", "--contact-sheet", str(sheet))) == 0
    out = capsys.readouterr().out
    assert "wrote 6 slices of 2 patients" in out and "contact sheet" in out
    assert all(name in out for name in LABELS)
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sheet.stat().st_size > 10_000


def test_synth_refuses_with_exit_2(tmp_path, capsys):
    assert main(_args(tmp_path)) == 0
    capsys.readouterr()
    # Another seed into the same folder would mix two data sets: refused, nothing deleted.
    assert main(_args(tmp_path, "--seed", "1")) == 2
    assert "not part of this data set" in capsys.readouterr().err
    assert len(list((tmp_path / "stage_2_train").glob("*.dcm"))) == 6
    assert main(_args(tmp_path, "--seed", "1", "--overwrite")) == 0
    assert len(list((tmp_path / "stage_2_train").glob("*.dcm"))) == 6
    assert main(["synth", "--out", str(tmp_path / "x"), "--size", "8", "--no-progress"]) == 2
    assert "size" in capsys.readouterr().err
    # A file where the folder should be: a clear refusal, not a traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    assert main(_args(blocker)) == 2
    assert "cannot write" in capsys.readouterr().err and blocker.read_text() == "keep me"


def test_synth_type_weight_changes_the_population_and_is_recorded(tmp_path, capsys):
    from hemorrhage_core.synthetic.phantom import PhantomConfig, sample_patient

    weights = ["--type-weight", "epidural=0.5", "--type-weight", "subdural=0"]
    assert main(_args(tmp_path, "--json", *weights)) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((tmp_path / "synth.json").read_text())
    assert dict(record["config"]["type_weights"]) == {
        "epidural": 0.5, "intraparenchymal": 0.22, "intraventricular": 0.2, "subarachnoid": 0.24, "subdural": 0.0,
    }
    assert printed["counts"]["subdural"] == 0
    # Over 60 patients: a type weighted 0 is never drawn, the raised one more often than by default.
    default = PhantomConfig()
    changed = default.with_type_weights({"epidural": 0.5, "subdural": 0.0})

    def drawn(config, subtype):
        return sum(les.subtype == subtype for i in range(60) for les in sample_patient(0, i, 10, config).lesions)

    assert drawn(changed, "subdural") == 0 < drawn(default, "subdural")
    assert drawn(changed, "epidural") > 2 * drawn(default, "epidural")
    assert default.with_type_weights({}) == default


def test_synth_type_weight_refusals(tmp_path, capsys):
    for bad, said in (("edh=0.2", "unknown hemorrhage type 'edh'"), ("epidural", "TYPE=WEIGHT"),
                      ("epidural=-1", "finite number >= 0"), ("epidural=nan", "finite number >= 0")):
        assert main(_args(tmp_path / "x", "--type-weight", bad)) == 2
        assert said in capsys.readouterr().err
    zero = [a for t in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
            for a in ("--type-weight", f"{t}=0")]
    assert main(_args(tmp_path / "x", *zero)) == 2
    assert "at least one hemorrhage type" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_synth_help_names_the_generators_default_type_weights(capsys):
    from hemorrhage_core.synthetic.phantom import PhantomConfig

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} {weight:g}" in text for name, weight in PhantomConfig().type_weights)


def test_synth_lesion_counts_change_the_population_and_are_recorded(tmp_path, capsys):
    from hemorrhage_core.synthetic.phantom import PhantomConfig, sample_patient

    assert main(_args(tmp_path, "--json", "--lesion-counts", "0,0,1")) == 0
    record = json.loads((tmp_path / "synth.json").read_text())
    assert record["config"]["lesion_count_weights"] == [0.0, 0.0, 1.0]
    # Every patient who bleeds gets exactly three lesions; the default draws 1 to 4.
    three = PhantomConfig().with_lesion_count_weights([0, 0, 1])
    counts = {len(sample_patient(0, i, 10, three).lesions) for i in range(40)}
    assert counts <= {0, 3} and 3 in counts
    default = {len(sample_patient(0, i, 10, PhantomConfig()).lesions) for i in range(40)}
    assert {1, 2} <= default
    # A type weighted 0 is still never drawn, however many lesions a patient gets.
    only_two = PhantomConfig().with_type_weights({"epidural": 0, "intraparenchymal": 0, "intraventricular": 0})
    many = only_two.with_lesion_count_weights([0, 0, 0, 1])
    assert {les.subtype for i in range(20) for les in sample_patient(0, i, 10, many).lesions} <= {
        "subarachnoid", "subdural"}


def test_synth_lesion_counts_refusals(tmp_path, capsys):
    for bad, said in (("0.1;0.3", "comma-separated"), ("a,b", "comma-separated"), ("", "comma-separated"),
                      ("0.5,-1", "finite numbers >= 0"), ("0.5,inf", "finite numbers >= 0"),
                      ("0,0", "at least one lesion count")):
        assert main(_args(tmp_path / "x", "--lesion-counts", bad)) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_help_names_the_generators_default_lesion_counts(capsys):
    from hemorrhage_core.synthetic.phantom import PhantomConfig

    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ",".join(f"{w:g}" for w in PhantomConfig().lesion_count_weights) in text

