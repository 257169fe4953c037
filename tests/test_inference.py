"""Predictor: DICOM -> probabilities, images, theta and Grad-CAM; refusals, flags, thread safety."""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from hemorrhage_core.checkpoint import save_checkpoint
from hemorrhage_core.dicom import new_uid, read_slice, write_ct_slice
from hemorrhage_core.errors import DicomReadError, InputRejectedError
from hemorrhage_core.inference import Prediction, Predictor, hu_flags
from hemorrhage_core.labels import LABELS, consistent_labels
from hemorrhage_core.models import ModelSpec, build_model, label_scores, probabilities
from hemorrhage_core.preprocess import SlicePrep, prepare_slice, to_tensor
from hemorrhage_core.windowing import DEFAULT_STACK

IMAGE_SIZE = 96
SECRET = "PATIENT-SECRET-42"


def head_phantom(n: int = 160, *, bleed: bool = True) -> np.ndarray:
    """Air, an elliptical skull, brain, and optionally a hyperdense blob (HU)."""
    yy, xx = (np.mgrid[:n, :n] + 0.5) / n - 0.5
    r = np.hypot(xx / 0.8, yy)
    hu = np.full((n, n), -1000.0, dtype=np.float32)
    hu[r < 0.42] = 1200.0
    hu[r < 0.37] = 35.0
    if bleed:
        hu[np.hypot(xx - 0.12, yy + 0.05) < 0.06] = 75.0
    return hu


def write(path, hu: np.ndarray, **extra) -> str:
    write_ct_slice(
        path, np.rint(hu + 1024).astype(np.int16), patient_id=SECRET, study_uid=new_uid("study"),
        series_uid=new_uid("series"), sop_uid=new_uid(str(path)), z=12.5, instance_number=1,
        extra={"PatientName": "Doe^Jane", **extra},
    )
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicom")
    return {
        "head": write(d / "ID_00000000a.dcm", head_phantom()),
        "other": write(d / "ID_00000000b.dcm", np.fliplr(head_phantom()).copy()),
        "mr": write(d / "ID_00000000c.dcm", head_phantom(), Modality="MR"),
        "no_bone": write(d / "ID_00000000d.dcm", np.clip(head_phantom(), -1000, 60)),
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec("resnet18", 2, input_size=64, hidden=(32, 16, 8))).eval()


@pytest.fixture(scope="module")
def predictor(model, tmp_path_factory):
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt", model, prep=SlicePrep(IMAGE_SIZE))
    return Predictor.from_checkpoint(path)


def test_predict_gives_probabilities_images_theta_and_heatmap(predictor, model, files):
    result = predictor.predict(files["head"], saliency_label="any")
    assert list(result.probabilities) == list(LABELS)
    assert all(0.0 <= p <= 1.0 for p in result.probabilities.values())
    expected_image = prepare_slice(read_slice(files["head"]).hu, IMAGE_SIZE, DEFAULT_STACK)
    assert result.image.dtype == np.uint8 and np.array_equal(result.image, expected_image)
    with torch.inference_mode():
        expected = probabilities(2, model(to_tensor(expected_image)[None]))[0].numpy()
    np.testing.assert_allclose(list(result.raw_probabilities.values()), expected, atol=1e-6)
    # what it reports: no subtype above any (here the untrained model's subdural is above any)
    np.testing.assert_allclose(list(result.probabilities.values()), consistent_labels(expected), atol=1e-6)
    assert result.aligned.dtype == np.uint8 and result.aligned.shape == (3, 64, 64)
    np.testing.assert_allclose(result.theta, np.eye(2, 3), atol=1e-6)  # untrained STN: identity
    # on the slice's own grid (160 px), not the model input's (96 px): it overlays the slice as read
    assert result.heatmap.dtype == np.float32 and result.heatmap.shape == read_slice(files["head"]).hu.shape
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert result.meta["modality"] == "CT" and result.meta["image_id"] == "ID_00000000a" and result.meta["z"] == 12.5
    assert result.flags == []


def test_bytes_and_path_agree_and_saliency_does_not_change_probabilities(predictor, files):
    with open(files["head"], "rb") as fh:
        from_bytes = predictor.predict(fh.read())
    from_path = predictor.predict(files["head"], saliency_label="subdural")
    assert from_bytes.heatmap is None
    np.testing.assert_allclose(list(from_bytes.probabilities.values()), list(from_path.probabilities.values()), atol=1e-6)


def test_heatmap_matches_pytorch_grad_cam_on_the_plain_model_at_identity(predictor, model, files):
    """At identity theta the STN mapping is a no-op, so the per-call view must reproduce the library's
    standard use (hooks on the trunk of the model itself) for every label."""

    class Scores(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return label_scores(2, self.net(x))

    reference_model = copy.deepcopy(model)
    prepared = predictor.prepare(files["head"])
    x = to_tensor(prepared.image)[None]
    nonzero = 0
    for index, label in enumerate(LABELS):
        cam = GradCAM(model=Scores(reference_model), target_layers=[reference_model.backbone])
        expected = prepared.geometry.to_slice(cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])[0])
        cam.activations_and_grads.release()
        got = predictor.predict(files["head"], saliency_label=label).heatmap
        np.testing.assert_allclose(got, expected, atol=1e-4)
        nonzero += int(expected.max() > 0)
    assert nonzero > 0  # the comparison is not between empty maps


def test_heatmap_follows_the_stn_back_onto_the_input(model, files):
    """A 2x zoom into the centre: saliency can only lie in the input's central half."""
    zoomed = copy.deepcopy(model)
    with torch.no_grad():
        zoomed.stn.regressor[-1].bias.copy_(torch.tensor([math.log(0.5), 0.0, 0.0, 0.0]))
    predictor = Predictor(zoomed, {"image_size": IMAGE_SIZE, "windows": DEFAULT_STACK.to_list()})
    heat = np.stack([predictor.predict(files["head"], saliency_label=label).heatmap for label in LABELS])
    np.testing.assert_allclose(predictor.predict(files["head"]).theta, [[0.5, 0, 0], [0, 0.5, 0]], atol=1e-6)
    side = heat.shape[-1]  # the slice's grid: the input's, scaled by side / IMAGE_SIZE
    quarter, margin = side // 4, -(-side // IMAGE_SIZE)
    outside = np.ones((side, side), dtype=bool)
    outside[quarter - margin : side - quarter + margin, quarter - margin : side - quarter + margin] = False
    assert float(heat[:, outside].max()) == 0.0
    assert float(heat[:, ~outside].max()) > 0.0


def test_with_the_head_crop_the_heatmap_lands_on_the_head_in_the_slice(model, tmp_path):
    """A head in one corner of a large slice: the model sees the crop around it, and the heatmap comes
    back onto the slice at the crop's place (zero elsewhere), not stretched over the whole slice."""
    from hemorrhage_core.saliency import grad_cam

    slice_hu = np.full((320, 320), -1000.0, dtype=np.float32)
    slice_hu[20:180, 140:300] = head_phantom()
    path = write(tmp_path / "ID_00000000e.dcm", slice_hu)
    predictor = Predictor.from_checkpoint(
        save_checkpoint(tmp_path / "crop.pt", model, prep=SlicePrep(IMAGE_SIZE, head_crop=True))
    )
    result = predictor.predict(path, saliency_label="any")
    geometry = predictor.prepare(path).geometry
    top, left, side, width = geometry.box
    assert width == side
    assert 0 <= top and top + side <= 200 and left >= 120 and side < 200  # around the head, not the slice
    on_input = grad_cam(model, to_tensor(result.image)[None], "any").heatmaps[0]
    np.testing.assert_allclose(result.heatmap, geometry.to_slice(on_input), atol=1e-4)
    assert result.heatmap.shape == (320, 320) and float(result.heatmap.max()) > 0.0
    outside = np.ones((320, 320), dtype=bool)
    outside[top : top + side, left : left + side] = False
    assert float(result.heatmap[outside].max()) == 0.0


def test_non_ct_is_refused_and_predict_many_keeps_errors_in_place(predictor, files):
    with pytest.raises(InputRejectedError, match="'MR' is not CT"):
        predictor.predict(files["mr"])
    results = predictor.predict_many([files["head"], files["mr"], b"not a dicom", files["other"]], batch_size=2)
    assert [type(r) for r in results][:3] == [Prediction, InputRejectedError, type(results[2])]
    assert isinstance(results[2], DicomReadError) and isinstance(results[3], Prediction)
    single = predictor.predict(files["other"])
    np.testing.assert_allclose(list(results[3].probabilities.values()), list(single.probabilities.values()), atol=1e-5)
    # Reading ahead in a helper thread (the accelerator default) gives the same results in the same order.
    ahead = Predictor(predictor.model, {"image_size": IMAGE_SIZE, "windows": DEFAULT_STACK}, read_ahead=True)
    again = ahead.predict_many(iter([files["head"], files["mr"], b"not a dicom", files["other"]]), batch_size=1)
    assert [type(r) for r in again] == [type(r) for r in results]
    for a, b in ((again[0], results[0]), (again[3], results[3])):
        np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-5)


def test_implausible_hu_is_flagged_not_hidden(predictor, files):
    result = predictor.predict(files["no_bone"])
    assert [f.split(":")[0] for f in result.flags] == ["no_bone"]
    assert len(result.probabilities) == 6
    head = head_phantom(64)
    assert hu_flags(head) == []
    assert [f.split(":")[0] for f in hu_flags(np.clip(head, 0, 80))] == ["no_bone", "no_air"]
    assert [f.split(":")[0] for f in hu_flags(-head)] == ["inverted"]


def test_no_patient_identifiers_in_predictions(predictor, files):
    result = predictor.predict(files["head"], saliency_label="any")
    text = repr(result) + repr(result.meta) + repr(result.record())
    assert SECRET not in text and "Doe" not in text
    assert "patient_id" not in result.meta


def test_concurrent_calls_equal_sequential_and_leave_the_model_clean(predictor, files):
    tasks = [
        ("head", None), ("other", "any"), ("head", "epidural"), ("other", None),
        ("head", "any"), ("other", "subdural"), ("head", None), ("other", "intraventricular"),
    ]

    def run(task):
        name, label = task
        return predictor.predict(files[name], saliency_label=label)

    sequential = [run(t) for t in tasks]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, tasks))
    for seq, con in zip(sequential, concurrent, strict=True):
        np.testing.assert_allclose(list(seq.probabilities.values()), list(con.probabilities.values()), atol=1e-6)
        np.testing.assert_array_equal(seq.aligned, con.aligned)
        if seq.heatmap is None:
            assert con.heatmap is None
        else:
            np.testing.assert_allclose(seq.heatmap, con.heatmap, atol=1e-5)
    shared = predictor.model
    assert all(not m._forward_hooks and not m._backward_hooks for m in shared.modules())
    assert all(p.grad is None for p in shared.parameters())
    assert not shared.training
