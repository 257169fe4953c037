"""``seeds --runs RUN [RUN ...] [--against RUN ...] [--evaluation NAME] [--bar LABEL=AUC ...] [--json]``.

One recipe trained at several training seeds, each run scored by the same saved evaluation (default
``test``): per label the mean, SD, min and max AUC over the runs, each run's AUCs with its training
seed, and with ``--bar`` (``any=0.95``, ``subtypes=0.90``) how many runs meet every bar. ``--against``
names a second group (another recipe or backbone, at its own seeds; its bars ``--against-bar``, else
``--bar``): per label the difference of the two groups' mean AUCs with a 95% t interval over the runs,
paired by training seed when both groups ran the same seeds (hemorrhage_core.seed_spread). ``--json`` prints ``{"evaluation", "n_images", "a":
{"runs", "spread"}, "b": ..., "difference": ...}``. Exit 0, or 2 when a run or evaluation is missing,
a group mixes backbones or stages, or the runs were scored on different images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from training.exits import EXIT_OK, CommandError
from training.numbers import fmt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", nargs="+", required=True, metavar="RUN", help="run directories of one recipe")
    parser.add_argument("--against", nargs="+", metavar="RUN", help="run directories of a recipe to compare with")
    parser.add_argument("--evaluation", default="test", metavar="NAME",
                        help="saved evaluation every run has (default test)")
    parser.add_argument("--bar", action="append", default=[], metavar="LABEL=AUC",
                        help="a minimum AUC (repeatable; 'subtypes=0.90' sets all five)")
    parser.add_argument("--against-bar", action="append", default=[], metavar="LABEL=AUC",
                        help="the --against group's bars, where they differ from --bar (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _group(run_dirs: list[str], evaluation: str) -> tuple[list[dict[str, Any]], list]:
    """Each run's name, backbone, stage and training seed, and its evaluation's predictions."""
    from hemorrhage_core.evaluations import EvaluationError, load_evaluation
    from hemorrhage_core.runs import read_run

    names, frames = [], []
    for run_dir in run_dirs:
        record = read_run(run_dir)
        try:
            frames.append(load_evaluation(record.path, evaluation).predictions)
        except EvaluationError as exc:
            raise EvaluationError(f"run {record.id}: {exc}") from None
        seed = (record.info.get("config") or {}).get("seed")
        names.append({"run": record.id, "backbone": record.info.get("backbone"), "stage": record.stage,
                      "seed": seed if isinstance(seed, int) else None})
    kinds = {(n["backbone"], n["stage"]) for n in names}
    if len(kinds) > 1:
        found = ", ".join(f"{b} stage {s}" for b, s in sorted(kinds, key=str))
        raise CommandError(f"one group's runs must be one backbone and stage, these are {found}: "
                           "put the other recipe under --against")
    return names, frames


def seeds(runs: list[str], *, against: list[str] | None = None, evaluation: str = "test",
          bars: list[str] | None = None, against_bars: list[str] | None = None) -> dict[str, Any]:
    """The spread of ``runs`` over training seeds, and with ``against`` the difference of the groups."""
    from hemorrhage_core.seed_spread import parse_bars, run_aucs, seed_difference, spread

    everything = [*runs, *(against or [])]
    if len({Path(p).resolve() for p in everything}) < len(everything):
        raise CommandError("a run is named twice")
    chosen = {"a": parse_bars(bars or [])}
    chosen["b"] = parse_bars(against_bars) if against_bars else chosen["a"]
    if against_bars and not against:
        raise CommandError("--against-bar needs --against")
    names_a, frames_a = _group(runs, evaluation)
    groups = [(names_a, frames_a)] + ([_group(against, evaluation)] if against else [])
    # One call over every frame checks that both groups were scored on the same images.
    aucs = run_aucs([frame for _, frames in groups for frame in frames])
    result: dict[str, Any] = {"evaluation": evaluation, "n_images": len(frames_a[0])}
    start = 0
    for key, (names, frames) in zip("ab", groups, strict=False):
        block = aucs[start:start + len(frames)]
        result[key] = {"runs": names, "spread": spread(block, [n["seed"] for n in names], chosen[key])}
        start += len(frames)
    if against:
        n_a = len(runs)
        result["difference"] = seed_difference(aucs[:n_a], [n["seed"] for n in names_a],
                                               aucs[n_a:], [n["seed"] for n in result["b"]["runs"]])
    return result


def _print_group(name: str, group: dict[str, Any], stream) -> None:
    from hemorrhage_core.labels import LABELS, SHORT_NAMES

    runs, summary = group["runs"], group["spread"]
    seeds = ", ".join("?" if r["seed"] is None else str(r["seed"]) for r in runs)
    print(f"\n{name}: {len(runs)} run{'' if len(runs) == 1 else 's'} of {runs[0]['backbone']} stage {runs[0]['stage']} (training seeds {seeds})",
          file=stream)
    print(f"{'label':<18}{'mean':>7}{'sd':>7}{'min':>7}{'max':>7}{'bar':>7}{'below':>7}", file=stream)
    for label, row in summary["labels"].items():
        below = "-" if row["below"] is None else str(row["below"])
        print(f"{label:<18}{fmt(row['mean']):>7}{fmt(row['sd']):>7}{fmt(row['min']):>7}{fmt(row['max']):>7}"
              f"{fmt(row['bar'], 2):>7}{below:>7}", file=stream)
    print(f"{'seed':>6}  " + " ".join(f"{SHORT_NAMES[label]:>7}" for label in LABELS) + "  run", file=stream)
    for run, row in zip(runs, summary["runs"], strict=True):
        seed = "?" if run["seed"] is None else str(run["seed"])
        values = " ".join(f"{fmt(row['auc'][label]):>7}" for label in LABELS)
        missed = "" if row["meets_bars"] is None else ("  meets the bars" if row["meets_bars"]
                                                       else f"  below on {', '.join(row['missed'])}")
        print(f"{seed:>6}  {values}  {run['run']}{missed}", file=stream)
    if summary["meet_bars"] is not None:
        print(f"{summary['meet_bars']} of {summary['n_runs']} runs meet every bar.", file=stream)


def _print_tables(result: dict[str, Any], stream) -> None:
    print(f"evaluation {result['evaluation']!r}, {result['n_images']} images, AUC per label", file=stream)
    _print_group("A", result["a"], stream)
    if "b" not in result:
        return
    _print_group("B", result["b"], stream)
    difference = result["difference"]
    print(f"\nA - B, mean over the runs ({difference['test']}, {difference['confidence']:.0%} t interval)",
          file=stream)
    print(f"{'label':<18}{'A - B':>8}{'95% CI':>18}{'p':>9}", file=stream)
    for label, row in difference["labels"].items():
        ci = f"[{fmt(row['ci'][0])}, {fmt(row['ci'][1])}]"
        print(f"{label:<18}{fmt(row['diff']):>8}{ci:>18}{fmt(row['p_value'], 4):>9}", file=stream)


def run(args: argparse.Namespace) -> int:
    result = seeds(args.runs, against=args.against, evaluation=args.evaluation, bars=args.bar,
                   against_bars=args.against_bar)
    if args.json:
        print(json.dumps(result, indent=2, allow_nan=False))
    else:
        _print_tables(result, sys.stdout)
    return EXIT_OK
