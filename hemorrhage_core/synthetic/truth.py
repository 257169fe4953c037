"""What the phantoms know and a real archive does not: the blood area of every slice, by subtype.

The areas are re-rendered from the set's synth.json (seed, patients, slices per patient, size and the
generator's configuration), so a set written before this module existed has them too. The re-rendered
labels must equal the set's label CSV: where they differ, the generator has changed since the set was
written and the areas would describe other slices, so they are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.labels_table import read_labels
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic.dataset import LABELS_CSV, SUMMARY_JSON, plan_series
from hemorrhage_core.synthetic.phantom import PhantomConfig, render_slice, sample_patient

ANY = "any"  # the union of the subtypes' blood (overlapping lesions counted once)


def config_from_dict(values: dict) -> PhantomConfig:
    """A PhantomConfig from synth.json's ``config`` (JSON lists back to the tuples it holds)."""
    fields = dict(values)
    for name in ("lesion_count_weights", "span_slices"):
        if name in fields:
            fields[name] = tuple(fields[name])
    if "type_weights" in fields:
        fields["type_weights"] = tuple((str(t), float(w)) for t, w in fields["type_weights"])
    try:
        return PhantomConfig(**fields)
    except TypeError as exc:
        raise HemorrhageError(f"{SUMMARY_JSON}: a generator configuration this version cannot read ({exc})") from None


def blood_areas(data_dir: str | PathLike, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Blood area in mm² per slice: columns ``image_id``, the five subtypes and ``any`` (their union).

    ``image_ids`` limits the work to those slices (default: every slice of the set); an id that is not
    part of the set is refused. Raises HemorrhageError for a folder without synth.json (not a
    synthetic set) and for re-rendered labels that differ from the set's.
    """
    folder = Path(data_dir)
    try:
        record = json.loads((folder / SUMMARY_JSON).read_text(encoding="utf-8"))
        params = record["parameters"]
        seed, patients = int(params["seed"]), int(params["patients"])
        per_patient, size = int(params["slices_per_patient"]), int(params["size"])
    except FileNotFoundError:
        raise HemorrhageError(f"{folder} has no {SUMMARY_JSON}: blood areas are known only for synthetic sets") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HemorrhageError(f"{folder / SUMMARY_JSON} cannot be read ({type(exc).__name__}: {exc})") from None
    config = config_from_dict(record.get("config") or {})
    where = {iid: (plan.index, s) for plan in plan_series(seed, patients, per_patient, config)
             for s, iid in enumerate(plan.image_ids)}
    wanted = list(where) if image_ids is None else [str(i) for i in image_ids]
    unknown = [i for i in wanted if i not in where]
    if unknown:
        raise HemorrhageError(f"{len(unknown)} images are not slices of this synthetic set (for example {unknown[:3]})")
    labels = read_labels(folder / LABELS_CSV).frame
    by_patient: dict[int, list[tuple[int, str]]] = {}
    for iid in wanted:
        p, s = where[iid]
        by_patient.setdefault(p, []).append((s, iid))
    rows: dict[str, dict[str, object]] = {}
    for p, slices in sorted(by_patient.items()):
        patient = sample_patient(seed, p, per_patient, config)
        for s, iid in sorted(slices):
            rendered = render_slice(patient, s, size=size, config=config)
            given = labels.loc[iid, list(LABELS)].tolist() if iid in labels.index else None
            if [rendered.labels[k] for k in LABELS] != given:
                raise HemorrhageError(
                    f"re-rendering {iid} gives other labels than {LABELS_CSV}: the phantom generator has changed "
                    "since this set was written; write the set again (training synth) to know its blood areas"
                )
            pixel_mm2 = rendered.pixel_mm**2
            union = np.zeros_like(rendered.blood[SUBTYPES[0]])
            row: dict[str, object] = {"image_id": iid}
            for name in SUBTYPES:
                row[name] = float(np.count_nonzero(rendered.blood[name])) * pixel_mm2
                union |= rendered.blood[name]
            row[ANY] = float(np.count_nonzero(union)) * pixel_mm2
            rows[iid] = row
    # Rendered patient by patient (each phantom drawn once), returned in the order asked.
    return pd.DataFrame([rows[iid] for iid in wanted], columns=["image_id", *SUBTYPES, ANY])
