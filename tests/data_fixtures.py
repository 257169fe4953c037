"""Builders of small data sets for the tests of hemorrhage_core.data (no network, CPU only)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from hemorrhage_core.data.header_index import INDEX_COLUMNS, stage1_classes
from hemorrhage_core.labels import LABELS, SUBTYPES

# Patient-level prevalence of each subtype in fake_index: epidural rare, as in RSNA.
FAKE_PREVALENCE = {
    "epidural": 0.04,
    "intraparenchymal": 0.15,
    "intraventricular": 0.12,
    "subarachnoid": 0.15,
    "subdural": 0.2,
}


def fake_index(n_patients: int = 200, *, seed: int = 0, slices: tuple[int, int] = (3, 12)) -> pd.DataFrame:
    """An index table (INDEX_COLUMNS) with no files behind it: for split and subset tests.

    Each patient has a random number of slices; a positive patient has the subtype on a run of
    adjacent slices, like a real bleed.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        n = int(rng.integers(slices[0], slices[1] + 1))
        flags = np.zeros((n, len(SUBTYPES)), dtype=np.int8)
        for k, name in enumerate(SUBTYPES):
            if rng.random() < FAKE_PREVALENCE[name]:
                start = int(rng.integers(0, n))
                flags[start : start + int(rng.integers(1, n + 1)), k] = 1
        for s in range(n):
            rows.append(
                {
                    "image_id": f"ID_{p:05x}{s:04x}",
                    "path": f"stage_2_train/ID_{p:05x}{s:04x}.dcm",
                    "patient_id": f"PAT{p:05d}",
                    "study_uid": f"1.2.3.{p}",
                    "series_uid": f"1.2.3.{p}.1",
                    "z": float(s * 5),
                    "slice_rank": s,
                    "modality": "CT",
                    "rows": 512,
                    "columns": 512,
                    **{name: int(flags[s, k]) for k, name in enumerate(SUBTYPES)},
                    "any": int(flags[s].any()),
                }
            )
    table = pd.DataFrame(rows)
    for name in LABELS:
        table[name] = table[name].astype(np.int8)
    table["stage1_class"] = stage1_classes(table[list(SUBTYPES)].to_numpy())
    return table[list(INDEX_COLUMNS)]


def long_labels(labels: dict[str, list[int]]) -> pd.DataFrame:
    """``{image_id: six labels}`` -> the RSNA long format (``ID_<hex>_<label>``, ``Label``)."""
    return pd.DataFrame(
        [(f"{image_id}_{name}", int(v)) for image_id, six in labels.items() for name, v in zip(LABELS, six, strict=True)],
        columns=["ID", "Label"],
    )


def truncate_file(path: str | os.PathLike, keep_fraction: float = 0.6) -> None:
    """Cut a file short (e.g. in the middle of its pixel data), as RSNA's ID_6431af929.dcm is."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# Label rows cycled over the slices of write_rsna_set: every stage-1 class, plus a two-subtype slice.
LABEL_CYCLE: tuple[tuple[int, ...], ...] = (
    (0, 0, 0, 0, 0, 0),
    (1, 0, 0, 0, 0, 1),
    (0, 1, 0, 0, 0, 1),
    (0, 0, 1, 0, 0, 1),
    (0, 0, 0, 1, 0, 1),
    (0, 0, 0, 0, 1, 1),
    (0, 1, 0, 1, 0, 1),
)


def image_id_for(seed: int, patient: int, slice_number: int) -> str:
    """An RSNA-style id: ``ID_`` + 9 hex digits, fixed by (seed, patient, slice)."""
    import hashlib

    return "ID_" + hashlib.sha256(f"{seed}/{patient}/{slice_number}".encode()).hexdigest()[:9]


def write_rsna_set(
    root: str | os.PathLike,
    *,
    n_patients: int = 4,
    slices_per_patient: int = 4,
    size: int = 32,
    seed: int = 0,
) -> pd.DataFrame:
    """Write a tiny RSNA-layout set (``stage_2_train/ID_*.dcm`` + ``stage_2_train.csv``) of random CT.

    Returns the reference labels: one row per image, indexed by image id, the six labels as int8.
    Slices carry random HU from air to bone so that every window gets non-trivial values.
    """
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    root = Path(root)
    images = root / "stage_2_train"
    rng = np.random.default_rng(seed)
    labels: dict[str, list[int]] = {}
    k = 0
    for p in range(n_patients):
        study, series = new_uid(f"{seed}/study/{p}"), new_uid(f"{seed}/series/{p}")
        for s in range(slices_per_patient):
            image_id = image_id_for(seed, p, s)
            stored = rng.integers(0, 2600, size=(size, size)).astype(np.int16)  # HU -1024 .. 1575
            write_ct_slice(
                images / f"{image_id}.dcm",
                stored,
                patient_id=f"PAT{seed:02d}{p:04d}",
                study_uid=study,
                series_uid=series,
                sop_uid=new_uid(f"{seed}/sop/{image_id}"),
                z=5.0 * (slices_per_patient - s),  # reverse order: slice_rank must sort by z
                instance_number=s + 1,
            )
            labels[image_id] = list(LABEL_CYCLE[k % len(LABEL_CYCLE)])
            k += 1
    long_labels(labels).to_csv(root / "stage_2_train.csv", index=False)
    frame = pd.DataFrame.from_dict(labels, orient="index", columns=list(LABELS)).astype(np.int8).sort_index()
    frame.index.name = "image_id"
    return frame
