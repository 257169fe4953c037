"""Argparse front door. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code); modules import lazily so
``--help`` stays fast and a command's heavy imports cost nothing to the others. Every command runs
under ``training.exits.run_reporting_errors``: one exit-code table, one way to report an error.
Commands never import each other; what two share lives in a module of its own."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from training.exits import run_reporting_errors

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("training.synth_cmd", "write a synthetic head-CT data set in the RSNA layout"),
    "inspect": ("training.inspect_cmd", "check whether DICOM files are usable CT slices"),
    "index": ("training.index_cmd", "build (or refresh) the label + header index of a data set"),
    "cache": ("training.cache_cmd", "build the preprocessed slice cache ahead of training (resumable)"),
    "train": ("training.train_cmd", "train one model (stage 1 or 2), or resume a run"),
    "pipeline": ("training.pipeline_cmd", "run the two-phase recipe (VGG16 subset, then Inception_v3)"),
    "evaluate": ("training.evaluate_cmd", "evaluate a run's model on a data set"),
    "predict": ("training.predict_cmd", "predict hemorrhage probabilities for DICOM files"),
    "compare": ("training.compare_cmd", "paired comparison of two runs on the images both were evaluated on"),
    "seeds": ("training.seeds_cmd", "one recipe's AUCs over training seeds, and two recipes compared beyond them"),
    "report": ("training.report_cmd", "write a self-contained HTML report of a runs folder"),
    "grid-search": ("training.grid_search_cmd", "patient-grouped cross-validated hyper-parameter search"),
    "pacs": ("training.pacs_cmd", "find, predict and watch studies on a DICOMweb server (PACS); store results as DICOM SR"),
}


EXIT_CODES_HELP = """exit codes (every command):
  0    done
  1    the work failed on usable input (a run failed, disk full, I/O error, a bug)
  2    something given cannot be used (argument, config, data, run, path), or some inputs were refused
  130  interrupted (Ctrl-C or SIGTERM)"""


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Intracranial hemorrhage detection on head CT: research tool, not for clinical use.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if available_only and exc.name == module_name:
                continue  # command not built yet in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(run_reporting_errors(lambda: args._run(args)) or 0)
