"""What the phantoms know and a real archive does not: the blood area of every slice and where its blood
lies, by subtype.

The areas are re-rendered from the set's synth.json (seed, patients, slices per patient, size and the
generator's configuration), so a set written before this module existed has them too. The re-rendered
labels must equal the set's label CSV: where they differ, the generator has changed since the set was
written and the areas would describe other slices, so they are refused. The sites are read from the
phantoms' parameters without rendering; a positive label without a lesion of its type there is refused
the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.labels_table import read_labels
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic.dataset import LABELS_CSV, SUMMARY_JSON, plan_series
from hemorrhage_core.synthetic.lesions import (
    Epidural,
    Intraparenchymal,
    Intraventricular,
    Lesion,
    Subarachnoid,
)
from hemorrhage_core.synthetic.phantom import PatientPhantom, PhantomConfig, render_slice, sample_patient

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


@dataclass(frozen=True)
class _SetPlan:
    """What synth.json says about a written set, and where each of its slices comes from."""

    seed: int
    per_patient: int
    size: int
    config: PhantomConfig
    where: dict[str, tuple[int, int]]  # image id -> (patient index, slice index)

    def slices(self, image_ids: list[str]) -> Iterator[tuple[PatientPhantom, int, str]]:
        """(phantom, slice index, image id) of the asked slices, patient by patient (each phantom drawn
        once), each patient's slices in order."""
        by_patient: dict[int, list[tuple[int, str]]] = {}
        for iid in image_ids:
            p, s = self.where[iid]
            by_patient.setdefault(p, []).append((s, iid))
        for p, slices in sorted(by_patient.items()):
            patient = sample_patient(self.seed, p, self.per_patient, self.config)
            for s, iid in sorted(slices):
                yield patient, s, iid


def _read_set(folder: Path, image_ids: Iterable[str] | None, what: str) -> tuple[_SetPlan, list[str], pd.DataFrame]:
    """The set's plan from its synth.json, the ids asked for (default: every slice) and its labels;
    refuses a folder without synth.json (``what`` is known only for synthetic sets) and ids that are not
    its slices."""
    try:
        record = json.loads((folder / SUMMARY_JSON).read_text(encoding="utf-8"))
        params = record["parameters"]
        seed, patients = int(params["seed"]), int(params["patients"])
        per_patient, size = int(params["slices_per_patient"]), int(params["size"])
    except FileNotFoundError:
        raise HemorrhageError(f"{folder} has no {SUMMARY_JSON}: {what} are known only for synthetic sets") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HemorrhageError(f"{folder / SUMMARY_JSON} cannot be read ({type(exc).__name__}: {exc})") from None
    config = config_from_dict(record.get("config") or {})
    where = {iid: (plan.index, s) for plan in plan_series(seed, patients, per_patient, config)
             for s, iid in enumerate(plan.image_ids)}
    wanted = list(where) if image_ids is None else [str(i) for i in image_ids]
    unknown = [i for i in wanted if i not in where]
    if unknown:
        raise HemorrhageError(f"{len(unknown)} images are not slices of this synthetic set (for example {unknown[:3]})")
    return _SetPlan(seed, per_patient, size, config, where), wanted, read_labels(folder / LABELS_CSV).frame


def _changed_generator(what: str) -> HemorrhageError:
    return HemorrhageError(
        f"{what}: the phantom generator has changed since this set was written; write the set again "
        "(training synth) to know its blood areas and sites"
    )


def blood_areas(data_dir: str | PathLike, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Blood area in mm² per slice: columns ``image_id``, the five subtypes and ``any`` (their union).

    ``image_ids`` limits the work to those slices (default: every slice of the set); an id that is not
    part of the set is refused. Raises HemorrhageError for a folder without synth.json (not a
    synthetic set) and for re-rendered labels that differ from the set's.
    """
    plan, wanted, labels = _read_set(Path(data_dir), image_ids, "blood areas")
    rows: dict[str, dict[str, object]] = {}
    for patient, s, iid in plan.slices(wanted):
        rendered = render_slice(patient, s, size=plan.size, config=plan.config)
        given = labels.loc[iid, list(LABELS)].tolist() if iid in labels.index else None
        if [rendered.labels[k] for k in LABELS] != given:
            raise _changed_generator(f"re-rendering {iid} gives other labels than {LABELS_CSV}")
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


# Where around the head, by the angle from the anterior midline (the lesions' own ``theta_deg``).
REGIONS = ((60.0, "front"), (120.0, "side"), (180.0, "back"))
SEVERAL = "several"  # a slice whose lesions of one type lie at different sites


def _region(degrees_from_front: float) -> str:
    return next(name for limit, name in REGIONS if abs(degrees_from_front) <= limit)


def lesion_site(lesion: Lesion) -> str:
    """Where a phantom lesion lies, in words: epidural, subdural and intraparenchymal blood by the region
    around the head (front, side, back: the angle from the anterior midline in thirds of a half turn);
    subarachnoid blood by its site (convexity with its region, Sylvian fissure, interhemispheric fissure
    front or back); intraventricular blood as a fluid level or a cast."""
    if isinstance(lesion, Subarachnoid):
        if lesion.site == "convexity":
            return f"convexity, {_region(lesion.theta_deg)}"
        if lesion.site == "interhemispheric":
            return f"interhemispheric, {'front' if lesion.theta_deg < 90.0 else 'back'}"
        return lesion.site
    if isinstance(lesion, Intraparenchymal):
        return _region(math.degrees(math.atan2(abs(lesion.x_mm), -lesion.y_mm)))
    if isinstance(lesion, Intraventricular):
        return "cast" if lesion.cast else "fluid level"
    if isinstance(lesion, Epidural):  # and Subdural, its subclass
        return _region(lesion.theta_deg)
    raise TypeError(f"no site for {type(lesion).__name__}")


def lesion_sites(data_dir: str | PathLike, image_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Where each slice's blood lies, by subtype: columns ``image_id`` and the five subtypes, each the site
    (``lesion_site``) of that type's lesions cut by the slice, ``SEVERAL`` when they lie at different
    sites, "" when the slice's label for the type is 0. Read from the phantoms' parameters (nothing
    rendered, so quick). Refusals as ``blood_areas``; a positive label without a lesion of its type cut
    by the slice means the generator has changed since the set was written."""
    plan, wanted, labels = _read_set(Path(data_dir), image_ids, "lesion sites")
    rows: dict[str, dict[str, str]] = {}
    for patient, s, iid in plan.slices(wanted):
        cut = [lesion for lesion in patient.lesions if lesion.z_factor(patient.slice_h_mm[s]) > 0]
        row = {"image_id": iid}
        for name in SUBTYPES:
            positive = iid in labels.index and int(labels.loc[iid, name]) == 1
            sites = {lesion_site(lesion) for lesion in cut if lesion.subtype == name}
            if positive and not sites:
                raise _changed_generator(f"{LABELS_CSV} labels {iid} {name}, but no {name} lesion of its phantom "
                                         "reaches the slice")
            row[name] = (sites.pop() if len(sites) == 1 else SEVERAL) if positive else ""
        rows[iid] = row
    return pd.DataFrame([rows[iid] for iid in wanted], columns=["image_id", *SUBTYPES])
