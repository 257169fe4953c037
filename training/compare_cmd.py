"""``compare --a RUN_A --b RUN_B [--evaluation NAME] [--json]``: a paired comparison of two runs.

Both runs' saved evaluation NAME (default ``test``, the pipeline's held-out test set; ``validation``
for the runs' own validation predictions, which only pair when the runs validated on the same
patients) are joined on the images they share. Per label: AUC of A and B, the difference A minus B
with a 95% patient-bootstrap interval, DeLong's p-value for correlated ROC curves and Holm's
adjustment over the six labels; the same at study level (one row per series, the maximum over its
slices). ``--json`` prints ``{"paired": true, "n_images", "n_patients", "labels": {...}, "study":
{...}}``. Exit 0, or 2 when an evaluation is missing or the two share no image.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from training.exits import EXIT_OK, CommandError
from training.numbers import fmt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", required=True, metavar="RUN_A", help="first run directory")
    parser.add_argument("--b", required=True, metavar="RUN_B", help="second run directory")
    parser.add_argument(
        "--evaluation", default="test", metavar="NAME",
        help="saved evaluation both runs have (default test; 'validation' for their validation predictions)",
    )
    parser.add_argument("--resamples", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def compare(run_a: str, run_b: str, *, evaluation: str = "test", resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The paired comparison of two runs' evaluations (see hemorrhage_core.comparison)."""
    from hemorrhage_core.comparison import paired_comparison
    from hemorrhage_core.evaluations import EvaluationError, load_evaluation
    from hemorrhage_core.runs import read_run

    names = {}
    data = []
    for key, run_dir in (("a", run_a), ("b", run_b)):
        record = read_run(run_dir)
        names[key] = {"run": record.id, "backbone": record.info.get("backbone"), "stage": record.stage}
        try:
            data.append(load_evaluation(record.path, evaluation))
        except EvaluationError as exc:
            raise EvaluationError(f"run {record.id}: {exc}") from None
    result = paired_comparison(data[0].predictions, data[1].predictions, n_resamples=resamples, seed=seed)
    return {**result, "evaluation": evaluation, "a": names["a"], "b": names["b"]}


def _print_table(result: dict[str, Any], stream) -> None:
    from hemorrhage_core.comparison import summary_sentences

    a, b = result["a"], result["b"]
    print(f"A = {a['run']} ({a['backbone']}), B = {b['run']} ({b['backbone']}), evaluation {result['evaluation']!r}",
          file=stream)
    for level, rows in (("slice", result["labels"]), ("study", result["study"]["labels"])):
        print(f"\n{level} level", file=stream)
        print(f"{'label':<18}{'pos':>6}{'AUC A':>8}{'AUC B':>8}{'A - B':>8}{'95% CI':>18}{'p':>9}{'p Holm':>9}",
              file=stream)
        for label, row in rows.items():
            ci = f"[{fmt(row['ci'][0])}, {fmt(row['ci'][1])}]"
            print(f"{label:<18}{row['positives']:>6}{fmt(row['auc_a']):>8}{fmt(row['auc_b']):>8}"
                  f"{fmt(row['diff']):>8}{ci:>18}{fmt(row['p_value'], 4):>9}{fmt(row['p_holm'], 4):>9}",
                  file=stream)
        # "A (backbone)": two runs of one backbone (a recipe against another) stay told apart.
        names = (f"A ({a['backbone']})", f"B ({b['backbone']})")
        for sentence in summary_sentences(result, *names, level=level):
            print(sentence, file=stream)


def run(args: argparse.Namespace) -> int:
    if args.resamples < 1:
        raise CommandError("--resamples must be at least 1")
    result = compare(args.a, args.b, evaluation=args.evaluation, resamples=args.resamples, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print_table(result, sys.stdout)
    return EXIT_OK
