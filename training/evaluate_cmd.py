"""``evaluate --run RUN_DIR --data DIR [--split all|test] [--save NAME] [--calibrate] [--by-size] [--by-site]
[--json]``.

A run's model on every usable image of a data set (``--split test``: only the patients the run held
out as its test set). Labels and file paths come from the data set's index; the probabilities from the
one Predictor, calibrated when the run has a calibration (``--calibrate`` fits one on the run's
validation predictions first). ``--json`` prints one object with the keys ``n_images, skipped, auc
{label: value|null}, weighted_log_loss, accuracy`` plus, each a ``{label: value}`` map,
``average_precision, brier, ece`` (15 equal-width bins), ``threshold`` (chosen on validation by Youden's
J), ``sensitivity, specificity, ppv, npv`` (at that threshold), ``n_patients``, ``n_studies``, ``study``
(the same maps with one row per series, the maximum over its slices), ``calibration`` (applied or not;
Brier, ECE and log loss before and after), ``zsmoothed``, ``flagged``, ``auc_given_any``,
``subtype_pairs`` (``{A: {B: AUC}}``, ``hemorrhage_core.evaluations.subtype_pair_auc``), ``along_z``
(whether ``any`` rises on each series' bleed slices, ``hemorrhage_core.evaluations.along_z``) and the run's
``run``/``backbone``/``stage``; with ``--by-size`` (synthetic sets) also ``by_size``: per label a list
of three groups of its positives by blood area, each ``{n, area_mm2: [min, max], auc, auc_given_any}``
(``hemorrhage_core.evaluations.auc_by_size``); with ``--by-site`` (synthetic sets) also ``by_site``: per
subtype a list of its positives grouped by where the blood lies, each ``{site, n, auc, auc_given_any}``
(``hemorrhage_core.evaluations.auc_by_site``). ``--save NAME`` also writes RUN/evaluations/NAME/ (predictions.csv,
metrics.json) atomically. The work is ``training.evaluation.evaluate``. Exit 0 on success, 2 when the
run or the data set cannot be used (``training.exits``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from training.exits import EXIT_OK, CommandError
from training.numbers import fmt

SPLITS = ("all", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory whose model is evaluated")
    parser.add_argument("--data", required=True, metavar="DIR", help="data set in the RSNA layout (labels + images)")
    parser.add_argument(
        "--split", choices=SPLITS, default="all",
        help="all usable images (default), or only the patients the run held out as its test set",
    )
    parser.add_argument("--save", metavar="NAME", help="save the evaluation as RUN_DIR/evaluations/NAME/")
    parser.add_argument(
        "--calibrate", action="store_true",
        help="fit per-label temperature scaling on the run's validation predictions (if it has none) and apply it",
    )
    parser.add_argument(
        "--by-size", action="store_true",
        help="synthetic sets only: also score each label with its positive slices in three groups by blood "
             "area (re-rendered from synth.json)",
    )
    parser.add_argument(
        "--by-site", action="store_true",
        help="synthetic sets only: also score each subtype with its positive slices grouped by where the blood "
             "lies (region around the head; subarachnoid: convexity, Sylvian or interhemispheric fissure)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs (default auto: the CUDA GPU when there is one)")
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help="processes that read the DICOM headers when the data set's index is (re)built (default: auto)",
    )


def _print_report(result: dict[str, Any], stream) -> None:
    from hemorrhage_core.labels import LABELS

    print(f"run {result['run']} ({result['backbone']}, stage {result['stage']}): {result['n_images']} images, "
          f"{result['n_patients']} patients, {result['n_studies']} series, {len(result['skipped'])} skipped",
          file=stream)
    for level, block in (("slice", result), ("study (max over each series)", result["study"])):
        print(f"\n{level} level; threshold chosen on validation (Youden's J)", file=stream)
        print(f"{'label':<18}{'pos':>6}{'AUC':>8}{'AP':>8}{'Brier':>8}{'ECE':>8}{'thresh':>8}{'sens':>8}"
              f"{'spec':>8}{'PPV':>8}{'NPV':>8}", file=stream)
        for label in LABELS:
            cells = [fmt(block[key][label], 3) for key in
                     ("auc", "average_precision", "brier", "ece", "threshold", "sensitivity", "specificity", "ppv", "npv")]
            print(f"{label:<18}{block['positives'][label]:>6}" + "".join(f"{c:>8}" for c in cells), file=stream)
        print(f"weighted log loss {fmt(block['weighted_log_loss'], 4)}", file=stream)
    print(f"\nz-smoothed: weighted log loss {fmt(result['zsmoothed']['weighted_log_loss'], 4)}, "
          f"AUC any {fmt(result['zsmoothed']['auc']['any'], 4)}", file=stream)
    print(f"accuracy {fmt(result['accuracy'], 4)} ({result['accuracy_kind']})", file=stream)
    _print_pairs(result["subtype_pairs"], stream)
    line = along_z_line(result["along_z"])
    if line:
        print(f"\n{line}", file=stream)
    line = along_z_subtypes_line(result.get("along_z_subtypes") or {})
    if line:
        print(line, file=stream)
    cal = result.get("calibration") or {}
    if cal.get("applied"):
        before, after = cal["before"], cal["after"]
        print(f"calibrated (temperature per label, fitted on validation): weighted log loss "
              f"{fmt(before['weighted_log_loss'], 4)} -> {fmt(after['weighted_log_loss'], 4)}", file=stream)
    if result.get("by_size"):
        _print_groups("by blood area: each label's positives in three equal groups (mm²)", result["by_size"],
                      lambda g: f"{g['area_mm2'][0]:.0f}-{g['area_mm2'][1]:.0f}", stream)
    if result.get("by_site"):
        _print_groups("by site: each subtype's positives by where the blood lies (n)", result["by_site"],
                      lambda g: g["site"], stream)
    if result["skipped"]:
        shown = ", ".join(result["skipped"][:10])
        more = f" and {len(result['skipped']) - 10} more" if len(result["skipped"]) > 10 else ""
        print(f"skipped: {shown}{more}", file=stream)


def along_z_line(z: dict[str, Any]) -> str | None:
    """The along-z summary (``evaluations.along_z``) in one line; None when no series holds slices both
    with and without blood."""
    if not z["n_series"]:
        return None
    return (f"along z ({z['label']}): {z['rising']} of {z['n_series']} series with and without blood rise on "
            f"their bleed slices, {z['separated']} separate them; mean within-series AUC {fmt(z['auc_mean'])}, "
            f"mean gap {fmt(z['gap_mean'])} (bleed slices' mean {z['label']} minus the others')")


def along_z_subtypes_line(by_label: dict[str, dict[str, Any]]) -> str | None:
    """Each subtype's along-z summary (``evaluations.along_z`` of its own output and slices) in one line;
    None when no series holds slices both with and without any subtype."""
    cells = [f"{label} {z['rising']} of {z['n_series']} (AUC {fmt(z['auc_mean'], 3)})"
             for label, z in by_label.items() if z["n_series"]]
    if not cells:
        return None
    return "along z by subtype, series whose own type's slices score higher (mean within-series AUC): " + \
        ", ".join(cells)


def _print_pairs(pairs: dict[str, dict[str, float | None]], stream) -> None:
    from hemorrhage_core.labels import SUBTYPES

    print("\nsubtype output (row) on its own slices against the slices of another type (column) without it; "
          "under 0.5: taken for that type", file=stream)
    print(f"{'':<18}" + "".join(f"{b[:8]:>10}" for b in SUBTYPES), file=stream)
    for a in SUBTYPES:
        print(f"{a:<18}" + "".join(f"{'-' if b == a else fmt(pairs[a][b], 3):>10}" for b in SUBTYPES), file=stream)


def _print_groups(title: str, by_label: dict[str, Any], name: Callable[[dict[str, Any]], str], stream) -> None:
    """One line per label of its positives' groups (``by_size`` or ``by_site``): each group's ``name``,
    count and AUC against every negative / against the negatives that bleed."""
    print(f"\n{title}, AUC against every negative slice / against the negatives that bleed", file=stream)
    for label, groups in by_label.items():
        if not groups:
            print(f"{label:<18}-", file=stream)
            continue
        cells = [f"{name(g)} (n {g['n']}) {fmt(g['auc'], 3)} / {fmt(g['auc_given_any'], 3)}" for g in groups]
        print(f"{label:<18}" + "   ".join(cells), file=stream)


def run(args: argparse.Namespace) -> int:
    from training.evaluation import evaluate

    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1")
    result = evaluate(args.run, args.data, batch_size=args.batch_size, workers=args.workers,
                      split=args.split, calibrate=args.calibrate, save=args.save, device=args.device,
                      by_size=args.by_size, by_site=args.by_site)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print_report(result, sys.stdout)
    return EXIT_OK
