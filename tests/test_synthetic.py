"""The head-CT phantom: labels true to the pixels, tissue HU, lesion shapes, files that read back."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
from scipy import ndimage

from hemorrhage_core.dicom import read_header, read_slice
from hemorrhage_core.errors import HemorrhageError
from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.synthetic import PhantomConfig, render_slice, sample_patient, write_dataset
from hemorrhage_core.synthetic.anatomy import Tissue
from hemorrhage_core.synthetic.dataset import _INSTITUTIONS, ENCODINGS, encode_hu, expected_hu, plan_series
from hemorrhage_core.synthetic.lesions import Epidural, Intraventricular, Subdural, sample_lesion

CONFIG = PhantomConfig()
ID_PATTERN = re.compile(r"^ID_[0-9a-f]{9}$")


def _min_pixels(size: int) -> int:
    pixel_mm2 = (250.0 / size) ** 2
    return max(CONFIG.min_visible_pixels, math.ceil(CONFIG.min_visible_area_mm2 / pixel_mm2))


def _read_csv(path) -> list[tuple[str, int]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["ID", "Label"]
        return [(row[0], int(row[1])) for row in reader]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """3 patients x 4 slices at 96 px, one series per file encoding (int16, unsigned 12-bit, RSNA quirk)."""
    out = tmp_path_factory.mktemp("phantoms")
    config = PhantomConfig(quirk_12bit_share=0.34, uint12_share=0.5, multivalued_window_share=0.34)
    summary = write_dataset(
        out, patients=3, slices_per_patient=4, size=96, seed=5, workers=1, progress=False, config=config
    )
    return out, summary, config


# --------------------------------------------------------------------------- pure rendering


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_labels_are_true_to_the_pixels(subtype):
    size = 192
    for index in range(2):
        patient = sample_patient(3, index, 8, lesion_types=(subtype,))
        positives = []
        for s in range(patient.n_slices):
            r = render_slice(patient, s, size=size)
            for name in SUBTYPES:
                area = int(r.blood[name].sum())
                if r.labels[name]:
                    assert area >= _min_pixels(size), (name, s, area)
                    # Visibly blood: denser than any brain tissue (grey matter tops out at 45 HU).
                    assert float(np.median(r.hu[r.blood[name]])) > 45.0
                else:
                    assert area == 0, (name, s, area)
            union = np.logical_or.reduce([r.blood[n] for n in SUBTYPES])
            np.testing.assert_array_equal(union, r.tissue == Tissue.BLOOD)
            assert r.labels["any"] == int(any(r.labels[n] for n in SUBTYPES))
            positives.append(r.labels[subtype])
        # One lesion: present on consecutive slices, at most five of them.
        hits = np.flatnonzero(positives)
        assert 1 <= hits.size <= CONFIG.span_slices[1]
        assert hits[-1] - hits[0] + 1 == hits.size


def test_healthy_patient_has_no_blood():
    patient = sample_patient(0, 0, 3, lesion_types=())
    for s in range(3):
        r = render_slice(patient, s, size=128)
        assert r.labels == dict.fromkeys(LABELS, 0)
        assert not (r.tissue == Tissue.BLOOD).any()


def test_tissue_hu_ranges_on_a_full_size_slice():
    patient = sample_patient(0, 4, 10, lesion_types=())
    index = int(np.argmin(np.abs(np.asarray(patient.slice_h_mm))))  # a mid-ventricular level
    r = render_slice(patient, index, size=512)

    def median(code: Tissue) -> float:
        # Eroded so partial-volume pixels at tissue borders do not count.
        mask = ndimage.binary_erosion(r.tissue == code, iterations=2)
        assert mask.sum() > 50, code
        return float(np.median(r.hu[mask]))

    assert median(Tissue.BONE) > 700.0
    assert 35.0 <= median(Tissue.GREY) <= 45.0
    assert 20.0 <= median(Tissue.WHITE) <= 30.0
    assert 0.0 <= median(Tissue.CSF) <= 15.0
    assert -1005.0 <= median(Tissue.AIR) <= -995.0
    brain = ndimage.binary_erosion(np.isin(r.tissue, (Tissue.GREY, Tissue.WHITE)), iterations=2)
    assert 20.0 <= float(np.median(r.hu[brain])) <= 45.0
    # Realistic noise: 4-10 HU standard deviation in air far from the head (before the scanner's clip).
    corner = r.hu[:40, :40]
    assert 4.0 <= float(corner.std()) <= 10.0
    assert r.hu.dtype == np.float32 and np.all(r.hu == np.rint(r.hu))


def test_acute_blood_is_50_to_90_hu():
    patient = sample_patient(2, 1, 6, lesion_types=("intraparenchymal", "subdural"))
    seen = 0
    for s in range(patient.n_slices):
        r = render_slice(patient, s, size=256)
        for name in ("intraparenchymal", "subdural"):
            core = ndimage.binary_erosion(r.blood[name], iterations=2)
            if core.sum() > 30:
                assert 48.0 <= float(np.median(r.hu[core])) <= 92.0
                seen += 1
    assert seen > 0


def test_rendering_is_deterministic_and_patients_vary():
    a = render_slice(sample_patient(0, 1, 5), 2, size=128)
    b = render_slice(sample_patient(0, 1, 5), 2, size=128)
    np.testing.assert_array_equal(a.hu, b.hu)
    assert a.labels == b.labels
    other = render_slice(sample_patient(1, 1, 5), 2, size=128)
    assert not np.array_equal(a.hu, other.hu)


def test_poses_cover_the_stated_range():
    poses = [sample_patient(0, i, 2).pose for i in range(40)]
    rotations = [p.rotation_deg for p in poses]
    scales = [p.scale for p in poses]
    assert all(-15.0 <= r <= 15.0 for r in rotations) and max(rotations) - min(rotations) > 15.0
    assert all(0.85 <= s <= 1.1 for s in scales) and max(scales) - min(scales) > 0.1
    # Slices are consecutive, 5 mm apart.
    np.testing.assert_allclose(np.diff(sample_patient(0, 0, 10).slice_h_mm), 5.0)


def test_epidural_stays_between_sutures_and_subdural_on_one_side():
    rng = np.random.default_rng(0)
    patient = sample_patient(0, 0, 10)
    a = patient.anatomy
    sectors = [(8.0, a.coronal_deg), (a.coronal_deg, a.lambdoid_deg), (a.lambdoid_deg, 172.0)]
    for _ in range(200):
        edh = sample_lesion("epidural", rng, a, patient.slice_h_mm)
        assert isinstance(edh, Epidural)
        low, high = edh.theta_deg - edh.half_angle_deg, edh.theta_deg + edh.half_angle_deg
        assert any(lo <= low and high <= hi for lo, hi in sectors), (low, high)
        sdh = sample_lesion("subdural", rng, a, patient.slice_h_mm)
        assert isinstance(sdh, Subdural)
        # The falx stops a subdural: it stays off the midline (0 and 180 degrees).
        assert sdh.theta_deg - sdh.half_angle_deg >= 4.0 and sdh.theta_deg + sdh.half_angle_deg <= 176.0


def test_intraventricular_blood_layers_dependently():
    # Supine patient: the fluid level is horizontal in the scanner, blood below it (larger row).
    checked = 0
    for index in range(12):
        patient = sample_patient(4, index, 8, lesion_types=("intraventricular",))
        (ivh,) = patient.lesions
        if not isinstance(ivh, Intraventricular) or ivh.cast:
            continue
        level_mm = patient.pose.shift_y_mm + patient.pose.scale * ivh.level_mm
        size = 192
        level_row = level_mm / (250.0 / size) + (size - 1) / 2.0
        for s in range(patient.n_slices):
            r = render_slice(patient, s, size=size)
            rows = np.nonzero(r.blood["intraventricular"])[0]
            if rows.size:
                assert rows.min() >= math.floor(level_row)
                checked += 1
    assert checked > 0


def test_population_prevalence_matches_the_documented_mix():
    # Slice level (rendered small): any ~40-50%, every subtype present in several percent of slices.
    counts = dict.fromkeys(LABELS, 0)
    n = 0
    for p in range(30):
        patient = sample_patient(0, p, 10)
        for s in range(patient.n_slices):
            labels = render_slice(patient, s, size=128).labels
            n += 1
            for name in LABELS:
                counts[name] += labels[name]
    share = {name: counts[name] / n for name in LABELS}
    assert 0.3 <= share["any"] <= 0.6
    assert all(share[name] >= 0.02 for name in SUBTYPES)
    # Patient level, over more patients: healthy ones exist, epidural is the rarest type.
    patients = [sample_patient(1, p, 10) for p in range(150)]
    lesions = [lesion.subtype for patient in patients for lesion in patient.lesions]
    per_type = {name: lesions.count(name) for name in SUBTYPES}
    assert per_type["epidural"] == min(per_type.values()) and per_type["epidural"] > 0
    assert 0.05 <= sum(not p.lesions for p in patients) / len(patients) <= 0.3


# --------------------------------------------------------------------------- written files


def test_csv_layout(small_set):
    out, summary, _ = small_set
    rows = _read_csv(out / "stage_2_train.csv")
    files = sorted(p.stem for p in (out / "stage_2_train").glob("*.dcm"))
    assert len(rows) == 6 * len(files) == 6 * summary.n_images
    ids = []
    for start in range(0, len(rows), 6):
        block = rows[start : start + 6]
        image = block[0][0].rsplit("_", 1)[0]
        assert ID_PATTERN.match(image)
        assert [r[0] for r in block] == [f"{image}_{name}" for name in LABELS]
        values = [r[1] for r in block]
        assert set(values) <= {0, 1}
        assert values[-1] == max(values[:-1])  # any = OR of the five
        ids.append(image)
    assert sorted(ids) == files and len(set(ids)) == len(ids)
    assert summary.counts == {name: sum(r[1] for r in rows if r[0].endswith(f"_{name}")) for name in LABELS}


def test_files_read_back_as_the_rendered_hu(small_set):
    out, summary, config = small_set
    plans = plan_series(5, 3, 4, config)
    assert sorted(p.encoding for p in plans) == sorted(ENCODINGS)
    assert summary.n_quirk_12bit == 4 and summary.n_quirk_multivalued >= 4
    labels = dict(_read_csv(out / "stage_2_train.csv"))
    for plan in plans:
        patient = sample_patient(5, plan.index, 4, config)
        zs = []
        for s, iid in enumerate(plan.image_ids):
            rendered = render_slice(patient, s, size=96, config=config)
            got = read_slice(out / "stage_2_train" / f"{iid}.dcm")
            np.testing.assert_array_equal(got.hu, expected_hu(rendered.hu, plan.encoding))
            meta = got.meta
            assert meta.image_id == iid and meta.patient_id == plan.patient_id
            assert meta.modality == "CT" and (meta.rows, meta.columns) == (96, 96)
            assert meta.window_center == 40.0 and meta.window_width == 80.0
            assert meta.pixel_spacing == pytest.approx((250.0 / 96, 250.0 / 96), abs=1e-5)
            assert [labels[f"{iid}_{n}"] for n in LABELS] == [rendered.labels[n] for n in LABELS]
            zs.append(meta.z)
        assert np.allclose(np.diff(zs), 5.0, atol=1e-3)  # consecutive axial slices along z


def test_quirk_encoding_needs_the_reader_fix():
    hu = np.array([[-1000.0, -20.0, 0.0, 40.0, 1500.0, 3071.0]], dtype=np.float32)
    stored, tags = encode_hu(hu, "quirk12")
    assert (
        tags["bits_stored"] == 12 and tags["pixel_representation"] == 0 and tags["rescale_intercept"] > -100
    )
    naive = stored.astype(np.float64) + tags["rescale_intercept"]
    assert naive[0, 0] > 3000  # air would read as bone without the fix
    fixed = stored.astype(np.int32) + 1000
    fixed[fixed >= 4096] -= 4096
    np.testing.assert_array_equal(fixed - 1000, hu)
    for encoding in ("int16", "uint12"):
        stored, tags = encode_hu(hu, encoding)
        np.testing.assert_array_equal(stored.astype(np.float64) + tags["rescale_intercept"], hu)


def test_identifying_tags_are_written_but_not_in_the_metadata(small_set):
    out, _, _ = small_set
    path = next((out / "stage_2_train").glob("*.dcm"))
    raw = path.read_bytes()
    assert b"SYNTH-" in raw  # the synthetic PatientName
    assert any(name.encode() in raw for name in _INSTITUTIONS)
    meta = read_header(path)
    assert "SYNTH-" not in repr(meta) and "SYNTH-" not in json.dumps(meta.to_dict())


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(a, patients=2, slices_per_patient=3, size=64, seed=7, workers=1, progress=False)
    write_dataset(b, patients=2, slices_per_patient=3, size=64, seed=7, workers=2, progress=False)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 2 * 3 + 2
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    record = json.loads((a / "synth.json").read_text())
    assert record["parameters"] == {"patients": 2, "slices_per_patient": 3, "size": 64, "seed": 7}
    assert record["summary"]["n_images"] == 6


def test_patients_differ_between_seeds():
    plans0, plans1 = plan_series(0, 50, 10), plan_series(1, 50, 10)
    pids0, pids1 = {p.patient_id for p in plans0}, {p.patient_id for p in plans1}
    assert len(pids0) == len(pids1) == 50 and not pids0 & pids1
    ids0 = {i for p in plans0 for i in p.image_ids}
    ids1 = {i for p in plans1 for i in p.image_ids}
    assert len(ids0) == 500 and not ids0 & ids1
    assert all(ID_PATTERN.match(i) for i in ids0)


def test_refuses_a_folder_holding_another_set(tmp_path):
    write_dataset(tmp_path, patients=1, slices_per_patient=2, size=48, seed=0, workers=1, progress=False)
    with pytest.raises(HemorrhageError, match="not part of this data set"):
        write_dataset(tmp_path, patients=1, slices_per_patient=2, size=48, seed=1, workers=1, progress=False)
    assert len(list((tmp_path / "stage_2_train").glob("*.dcm"))) == 2  # nothing lost
    write_dataset(
        tmp_path, patients=1, slices_per_patient=2, size=48, seed=1, workers=1, progress=False, overwrite=True
    )
    stems = {p.stem for p in (tmp_path / "stage_2_train").glob("*.dcm")}
    assert stems == set(plan_series(1, 1, 2)[0].image_ids)
    with pytest.raises(HemorrhageError):
        write_dataset(tmp_path / "x", patients=0, progress=False)
