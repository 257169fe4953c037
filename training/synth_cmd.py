"""``synth --out DIR [--patients N] [--slices-per-patient K] [--size 512] [--seed S]``: write a synthetic
head-CT data set in the RSNA 2019 layout (``DIR/stage_2_train/ID_<hex>.dcm``, ``DIR/stage_2_train.csv``,
``DIR/synth.json``). Deterministic per seed; ``--seed 1`` is a different population of patients.
``--type-weight epidural=0.21`` (repeatable) changes a type's relative weight in the population
(default weights in ``PhantomConfig.type_weights``; saved in synth.json's ``config``).
``--lesion-counts 0.1,0.3,0.3,0.3`` sets the relative weights of 1, 2, ... lesions per patient who
bleeds (default ``PhantomConfig.lesion_count_weights``; saved there too).
``--contact-sheet PNG`` also renders a contact sheet of the population (every type, healthy slices,
bone and subdural windows). Exit 0 on success, 2 when the arguments or the folder are refused, 1 when
writing fails (disk full).
"""

from __future__ import annotations

import argparse
import json
import time

from training.exits import EXIT_OK, CommandError, os_error_code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the data set into")
    parser.add_argument("--patients", type=int, default=60, metavar="N", help="patients (default 60)")
    parser.add_argument(
        "--slices-per-patient",
        type=int,
        default=10,
        metavar="K",
        help="consecutive axial slices per patient (default 10)",
    )
    parser.add_argument(
        "--size", type=int, default=512, metavar="PX", help="rows = columns of each slice (default 512)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="population seed: another seed, other patients"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="W",
        help="processes rendering patients (default min(cores, 4))",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete stale ID_*.dcm files of another set in DIR"
    )
    parser.add_argument(
        "--type-weight", action="append", default=[], metavar="TYPE=W",
        help="relative weight of a hemorrhage type among the lesions drawn (repeatable; defaults: "
        "epidural 0.07, intraparenchymal 0.22, intraventricular 0.2, subarachnoid 0.24, subdural 0.27)",
    )
    parser.add_argument(
        "--lesion-counts", metavar="W1,W2,...", default=None,
        help="relative weights of 1, 2, ... lesions per patient who bleeds (default: "
        "0.2,0.35,0.25,0.2, i.e. 1 to 4 lesions)",
    )
    parser.add_argument("--contact-sheet", metavar="PNG", default=None, help="also write a contact sheet PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _table(summary: dict, seconds: float) -> str:
    from hemorrhage_core.labels import LABELS

    n = summary["n_images"]
    lines = [
        f"wrote {n} slices of {summary['n_patients']} patients ({summary['n_healthy_patients']} healthy) "
        f"at {summary['size']} px to {summary['out_dir']} in {seconds:.1f} s",
        f"{'label':<18}{'slices':>8}{'share':>8}",
    ]
    lines += [f"{name:<18}{summary['counts'][name]:>8}{summary['counts'][name] / n:>8.1%}" for name in LABELS]
    lines.append(f"{'2+ types':<18}{summary['n_multi']:>8}{summary['n_multi'] / n:>8.1%}")
    lines.append(
        f"RSNA quirks: {summary['n_quirk_12bit']} files 12-bit two's complement, "
        f"{summary['n_quirk_multivalued']} with multi-valued window tags, {summary['n_uint12']} unsigned 12-bit"
    )
    return "\n".join(lines)


def phantom_config(pairs: list[str], lesion_counts: str | None = None):
    """The generator's population with ``--type-weight``'s ``TYPE=W`` overrides and ``--lesion-counts``
    applied."""
    from hemorrhage_core.errors import HemorrhageError
    from hemorrhage_core.synthetic.phantom import PhantomConfig

    overrides: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            overrides[name.strip()] = float(value)
        except ValueError:
            raise CommandError(f"--type-weight takes TYPE=WEIGHT (e.g. epidural=0.21), got {pair!r}") from None
    try:
        config = PhantomConfig().with_type_weights(overrides)
    except HemorrhageError as exc:
        raise CommandError(f"--type-weight: {exc}") from None
    if lesion_counts is None:
        return config
    try:
        counts = [float(part) for part in lesion_counts.split(",")]
    except ValueError:
        raise CommandError(f"--lesion-counts takes comma-separated weights (e.g. 0.1,0.3,0.3,0.3), got "
                           f"{lesion_counts!r}") from None
    try:
        return config.with_lesion_count_weights(counts)
    except HemorrhageError as exc:
        raise CommandError(f"--lesion-counts: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from hemorrhage_core.synthetic import write_dataset

    config = phantom_config(args.type_weight, args.lesion_counts)
    start = time.perf_counter()
    try:
        summary = write_dataset(
            args.out,
            patients=args.patients,
            slices_per_patient=args.slices_per_patient,
            size=args.size,
            seed=args.seed,
            workers=args.workers,
            config=config,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
        seconds = time.perf_counter() - start
        sheet = None
        if args.contact_sheet:
            from hemorrhage_core.synthetic.contact_sheet import write_contact_sheet

            sheet = write_contact_sheet(
                args.contact_sheet,
                seed=args.seed,
                patients=args.patients,
                slices_per_patient=args.slices_per_patient,
                size=args.size,
                config=config,
            )
    except OSError as exc:  # a file where the folder should be, or the disk filled up while writing
        where = exc.filename or args.out
        raise CommandError(f"cannot write {where}: {exc.strerror or exc}", os_error_code(exc)) from exc
    record = summary.to_dict()
    if args.json:
        print(
            json.dumps(
                {**record, "seconds": round(seconds, 2), "contact_sheet": str(sheet) if sheet else None}
            )
        )
    else:
        print(_table(record, seconds))
        if sheet:
            print(f"contact sheet: {sheet}")
    return EXIT_OK
