"""Write a synthetic data set in the RSNA 2019 layout: DICOM slices, the long-format label CSV, synth.json.

Patients are independent, so they are rendered in parallel; every random draw comes from the data set
seed and the patient index, so the bytes written do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic.anatomy import FOV_MM
from hemorrhage_core.synthetic.phantom import PhantomConfig, patient_key, render_slice, sample_patient

FORMAT_VERSION = 1
IMAGES_DIR = "stage_2_train"
LABELS_CSV = "stage_2_train.csv"
SUMMARY_JSON = "synth.json"

# How a series stores its pixels. "quirk12" is RSNA's bug: 12-bit two's complement values in an
# unsigned 12-bit field with an intercept above -100, which the reader must fix.
ENCODINGS = ("int16", "uint12", "quirk12")

_FAMILY_NAMES = ("Doe", "Roe", "Moe", "Poe", "Loe", "Zoe", "Coe", "Hoe")
_GIVEN_NAMES = ("Alex", "Sam", "Robin", "Kim", "Jo", "Max", "Noa", "Lee")
_INSTITUTIONS = ("Synthetic General Hospital", "Phantom University Clinic", "Nowhere Trauma Centre")


@dataclass(frozen=True)
class SeriesPlan:
    """What the main process decides for one patient before any pixel is rendered."""

    index: int
    patient_id: str
    image_ids: tuple[str, ...]
    encoding: str
    multivalued_window: bool


@dataclass
class SynthSummary:
    """What a ``write_dataset`` call produced."""

    n_images: int
    n_patients: int
    counts: dict[str, int]  # positive slices per label, LABELS order
    n_multi: int  # slices with two or more subtypes
    n_quirk_12bit: int  # files written with RSNA's 12-bit two's complement quirk
    n_quirk_multivalued: int  # files with multi-valued WindowCenter / WindowWidth
    out_dir: str
    n_healthy_patients: int = 0
    n_uint12: int = 0
    seed: int = 0
    size: int = 512
    prevalence: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def image_id(seed: int, patient: int, slice_index: int, salt: int = 0) -> str:
    """RSNA-style image id ``ID_<9 hex>`` derived from the seed, patient and slice (unique in practice)."""
    digest = hashlib.sha256(
        f"hemorrhage-phantom-image/{seed}/{patient}/{slice_index}/{salt}".encode()
    ).hexdigest()
    return f"ID_{digest[:9]}"


def patient_id(seed: int, patient: int) -> str:
    """RSNA-style patient id ``ID_<8 hex>``; different seeds give different patients."""
    return f"ID_{patient_key(seed, patient)[:8]}"


def plan_series(
    seed: int, patients: int, slices_per_patient: int, config: PhantomConfig | None = None
) -> list[SeriesPlan]:
    """Ids and file encodings of every series: deterministic, with hash collisions resolved."""
    config = config or PhantomConfig()
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E12]))
    # Quirky series are a fixed share of the patients (at least one when the share is non-zero),
    # drawn by the seed, so even a small set exercises the reader's fixes.
    order = rng.permutation(patients)
    n_quirk = _share(config.quirk_12bit_share, patients)
    n_uint12 = _share(config.uint12_share, patients - n_quirk)
    encodings = ["int16"] * patients
    for i in order[:n_quirk]:
        encodings[i] = "quirk12"
    for i in order[n_quirk : n_quirk + n_uint12]:
        encodings[i] = "uint12"
    multi = set(rng.permutation(patients)[: _share(config.multivalued_window_share, patients)].tolist())

    seen: set[str] = set()
    plans = []
    for p in range(patients):
        ids = []
        for s in range(slices_per_patient):
            salt = 0
            while (iid := image_id(seed, p, s, salt)) in seen:
                salt += 1  # a 36-bit id collides about once in 10^5 images of a huge set
            seen.add(iid)
            ids.append(iid)
        plans.append(SeriesPlan(p, patient_id(seed, p), tuple(ids), encodings[p], p in multi))
    return plans


def _share(fraction: float, n: int) -> int:
    if fraction <= 0 or n <= 0:
        return 0
    return min(n, max(1, round(fraction * n)))


def encode_hu(hu: np.ndarray, encoding: str) -> tuple[np.ndarray, dict]:
    """HU (whole numbers) -> stored values and the pixel tags of ``encoding``."""
    if encoding == "int16":
        stored = np.clip(hu, -1024, 3071).astype(np.int16) + np.int16(1024)
        return stored, {"bits_stored": 16, "pixel_representation": 1, "rescale_intercept": -1024.0}
    if encoding == "uint12":
        stored = (np.clip(hu, -1024, 3071) + 1024).astype(np.uint16)
        return stored, {"bits_stored": 12, "pixel_representation": 0, "rescale_intercept": -1024.0}
    if encoding == "quirk12":
        # Two's complement in 12 bits: negative HU wrap to 4096 + HU. Air below -1000 cannot survive
        # the fix (stored + 1000 must stay within one wrap), so it is clipped there, as in RSNA's files.
        wrapped = np.mod(np.clip(hu, -1000, 3071).astype(np.int32), 4096)
        return wrapped.astype(np.uint16), {
            "bits_stored": 12,
            "pixel_representation": 0,
            "rescale_intercept": 0.0,
        }
    raise ValueError(f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}")


def expected_hu(hu: np.ndarray, encoding: str) -> np.ndarray:
    """The HU a correct reader recovers from a file written with ``encoding``."""
    low = -1000 if encoding == "quirk12" else -1024
    return np.clip(hu, low, 3071).astype(np.float32)


def _identity(key: str, index: int) -> dict:
    """Synthetic identifying tags: present in the files so tests can check they never leak."""
    h = int(key[:8], 16)
    year, month, day = 1930 + h % 75, 1 + (h >> 8) % 12, 1 + (h >> 12) % 28
    return {
        "PatientName": f"SYNTH-{_FAMILY_NAMES[h % len(_FAMILY_NAMES)]}^{_GIVEN_NAMES[(h >> 4) % len(_GIVEN_NAMES)]}-{index}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "PatientSex": "MF"[h % 2],
        "InstitutionName": _INSTITUTIONS[(h >> 16) % len(_INSTITUTIONS)],
        "StudyDate": f"2019{1 + (h >> 20) % 12:02d}{1 + (h >> 24) % 28:02d}",
        "StudyDescription": "CT HEAD WITHOUT CONTRAST",
        "Manufacturer": "hemorrhage-ct synthetic phantom",
        "SliceThickness": "5",
        "KVP": "120",
    }


@dataclass(frozen=True)
class _Task:
    out_dir: str
    seed: int
    plan: SeriesPlan
    slices_per_patient: int
    size: int
    config: PhantomConfig
    identity_tags: tuple[tuple[str, str], ...] = ()


def _write_series(task: _Task) -> list[tuple[str, dict[str, int]]]:
    """Render and write one patient's series; returns (image id, labels) per slice."""
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    plan = task.plan
    patient = sample_patient(task.seed, plan.index, task.slices_per_patient, task.config)
    key = patient.patient_key
    study_uid = new_uid(f"study/{key}")
    series_uid = new_uid(f"series/{key}")
    identity = _identity(key, plan.index)
    identity.update((k, v.replace("{patient}", str(plan.index))) for k, v in task.identity_tags)
    pixel_mm = round(FOV_MM / task.size, 6)
    window = ([40.0, 80.0], [80.0, 200.0]) if plan.multivalued_window else (40.0, 80.0)
    images_dir = Path(task.out_dir) / IMAGES_DIR
    out = []
    for i, iid in enumerate(plan.image_ids):
        rendered = render_slice(patient, i, size=task.size, config=task.config)
        stored, tags = encode_hu(rendered.hu, plan.encoding)
        write_ct_slice(
            images_dir / f"{iid}.dcm",
            stored,
            patient_id=plan.patient_id,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=new_uid(f"sop/{key}/{iid}"),
            z=round(patient.z_mm(i), 3),
            instance_number=i + 1,
            pixel_spacing=(pixel_mm, pixel_mm),
            window_center=window[0],
            window_width=window[1],
            extra=identity,
            **tags,
        )
        out.append((iid, rendered.labels))
    return out


def _run_tasks(
    tasks: list[_Task], workers: int, progress: bool
) -> Iterator[list[tuple[str, dict[str, int]]]]:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="synth patients", unit="patient", disable=not progress)
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                yield _write_series(task)
                bar.update()
        else:
            with multiprocessing.Pool(workers) as pool:
                for result in pool.imap(_write_series, tasks):
                    yield result
                    bar.update()
    finally:
        bar.close()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    patients: int = 60,
    slices_per_patient: int = 10,
    size: int = 512,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    config: PhantomConfig | None = None,
    overwrite: bool = False,
    identity_tags: Mapping[str, str] | None = None,
) -> SynthSummary:
    """Write ``patients`` x ``slices_per_patient`` synthetic CT slices in the RSNA layout under ``out_dir``.

    Creates ``stage_2_train/ID_<hex>.dcm``, ``stage_2_train.csv`` (ID,Label; six rows per image in
    LABELS order) and ``synth.json`` (parameters and summary). Same arguments, same bytes. Refuses
    (HemorrhageError) when ``stage_2_train`` already holds other ``.dcm`` files, unless ``overwrite``,
    which deletes those stale ``ID_*.dcm`` files.

    ``identity_tags`` (DICOM keyword -> text, ``{patient}`` replaced by the patient index) replace
    the synthetic identifying header values, e.g. with marker strings that tests then look for in
    every output; a ``PatientID`` given here replaces the RSNA-style id (keep ``{patient}`` in it so
    patients stay distinct). They are written to the DICOM files only, never to synth.json.
    """
    if patients < 1 or slices_per_patient < 1:
        raise HemorrhageError("patients and slices_per_patient must be at least 1")
    if not 32 <= size <= 2048:
        raise HemorrhageError(f"size must be between 32 and 2048 pixels, got {size}")
    config = config or PhantomConfig()
    workers = min(_usable_cores(), 4) if workers is None else max(1, int(workers))
    out = Path(out_dir)
    images_dir = out / IMAGES_DIR
    plans = plan_series(seed, patients, slices_per_patient, config)
    wanted = {f"{iid}.dcm" for plan in plans for iid in plan.image_ids}
    try:
        if images_dir.is_dir():
            stale = sorted(p for p in images_dir.glob("*.dcm") if p.name not in wanted)
            if stale and not (overwrite and all(p.name.startswith("ID_") for p in stale)):
                raise HemorrhageError(
                    f"{images_dir} already holds {len(stale)} .dcm files that are not part of this data set "
                    "(another seed or size?); choose another folder"
                    + (
                        ""
                        if overwrite
                        else " or pass overwrite=True (--overwrite) to delete stale ID_*.dcm files"
                    )
                )
            for path in stale:
                path.unlink()
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HemorrhageError(f"cannot write a data set under {out}: {exc.strerror or exc}") from None

    tags = tuple((str(k), str(v)) for k, v in (identity_tags or {}).items())
    tasks = [_Task(str(out), seed, plan, slices_per_patient, size, config, tags) for plan in plans]
    rows: list[str] = ["ID,Label"]
    counts = dict.fromkeys(LABELS, 0)
    n_multi = 0
    n_healthy = 0
    for result in _run_tasks(tasks, workers, progress):
        any_blood = False
        for iid, labels in result:
            rows.extend(f"{iid}_{name},{labels[name]}" for name in LABELS)
            for name in LABELS:
                counts[name] += labels[name]
            n_multi += sum(labels[name] for name in SUBTYPES) >= 2
            any_blood |= bool(labels["any"])
        n_healthy += not any_blood

    n_images = patients * slices_per_patient
    quirk = sum(slices_per_patient for p in plans if p.encoding == "quirk12")
    summary = SynthSummary(
        n_images=n_images,
        n_patients=patients,
        counts=counts,
        n_multi=int(n_multi),
        n_quirk_12bit=quirk,
        n_quirk_multivalued=sum(slices_per_patient for p in plans if p.multivalued_window),
        out_dir=str(out),
        n_healthy_patients=n_healthy,
        n_uint12=sum(slices_per_patient for p in plans if p.encoding == "uint12"),
        seed=seed,
        size=size,
        prevalence={name: round(counts[name] / n_images, 4) for name in LABELS},
    )
    _write_text_atomically(out / LABELS_CSV, "\n".join(rows) + "\n")
    record = {
        "format_version": FORMAT_VERSION,
        "generator": "hemorrhage_core.synthetic",
        "parameters": {
            "patients": patients,
            "slices_per_patient": slices_per_patient,
            "size": size,
            "seed": seed,
        },
        "config": config.to_dict(),
        "summary": {k: v for k, v in summary.to_dict().items() if k != "out_dir"},
    }
    _write_text_atomically(out / SUMMARY_JSON, json.dumps(record, indent=2) + "\n")
    return summary
