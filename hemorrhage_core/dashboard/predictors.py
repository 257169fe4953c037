"""One Predictor per model, loaded once and shared read-only by every session; the upload pipeline.

``PredictorCache`` keys models by run id and the checkpoint's modification time, so a retrained
``best.pt`` is picked up and an unchanged one is never loaded twice (a lock stops two sessions from
loading the same model at once). Given the run's folder it also applies the run's calibration.json,
read on every request (a small file), so a calibration fitted later is used at once and a damaged one
refuses the run as a damaged checkpoint does. ``analyse_uploads`` is the blocking work behind the
Predict panel's extended task: it decodes each uploaded slice once (for the window sliders) and
predicts it, a 2.5D model with its uploaded neighbours, turning every failure into a per-file message
so that one bad file never sinks the others.
``series_verdict`` is the study-level reading of one uploaded series: per label, the highest
probability over its slices, on which slice, against the run's study-level threshold.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hemorrhage_core.dashboard.safety import user_message
from hemorrhage_core.errors import CheckpointError
from hemorrhage_core.labels import LABELS

if TYPE_CHECKING:  # the dashboard imports torch only when a model is first used
    from hemorrhage_core.calibration import Calibration
    from hemorrhage_core.dicom import CtSlice
    from hemorrhage_core.inference import Prediction, Predictor

log = logging.getLogger("hemorrhage_core.dashboard")

# The code that starts ``inference.NO_NEIGHBOURS_FLAG``, spelt here because that module imports torch:
# a 2.5D model read the slice with itself repeated in place of the neighbours it was not given.
NO_NEIGHBOURS = "no_neighbours:"


def is_no_neighbours(flag: str) -> bool:
    """Whether ``flag`` says the slice was read without neighbours (not that it looks unlike a head CT)."""
    return str(flag).startswith(NO_NEIGHBOURS)


class PredictorCache:
    """Thread-safe map (run id, checkpoint mtime) -> Predictor; old versions of a run's model are dropped."""

    def __init__(self, loader: Callable[[Path], Predictor] | None = None) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._models: dict[str, tuple[int, Predictor]] = {}

    def _load(self, path: Path) -> Predictor:
        if self._loader is not None:
            return self._loader(path)
        from hemorrhage_core.inference import Predictor

        return Predictor.from_checkpoint(path)

    def get(self, run_id: str, model_path: Path, run_dir: Path | None = None) -> Predictor:
        """The run's Predictor, loading it on first use; CheckpointError when the file is absent.

        With ``run_dir`` the Predictor applies the run's calibration.json when it has one; a damaged
        one raises EvaluationError naming the run (the model itself stays cached).
        """
        try:
            mtime = model_path.stat().st_mtime_ns
        except OSError:
            raise CheckpointError("this run has no saved model yet") from None
        calibration = self._calibration(run_id, run_dir)
        predictor = self._model(run_id, model_path, mtime)
        return predictor if calibration is None else predictor.with_calibration(calibration)

    @staticmethod
    def _calibration(run_id: str, run_dir: Path | None) -> Calibration | None:
        if run_dir is None:
            return None
        from hemorrhage_core.evaluations import EvaluationError, read_calibration

        try:
            return read_calibration(run_dir)
        except EvaluationError as exc:
            raise EvaluationError(f"run {run_id}: {exc}") from None

    def _model(self, run_id: str, model_path: Path, mtime: int) -> Predictor:
        with self._lock:
            cached = self._models.get(run_id)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            log.info("loading the model of run %s", run_id)
            try:
                predictor = self._load(model_path)
            except CheckpointError as exc:
                # The refusal names the file by its full path: the page names it by its run instead.
                text = str(exc)
                for form in (repr(str(model_path)), str(model_path)):
                    text = text.replace(form, f"{model_path.name} of run {run_id}")
                raise CheckpointError(text) from None
            self._models[run_id] = (mtime, predictor)
            return predictor

    def __len__(self) -> int:
        return len(self._models)


@dataclass(eq=False)  # identity equality: results hold arrays, and panels look them up by identity
class UploadResult:
    """One uploaded file after analysis: either the slice and its prediction, or a message."""

    index: int
    name: str
    error: str | None = None
    hu: np.ndarray | None = None
    z: float | None = None
    series: str | None = None  # used only to group slices; never shown
    pixel_spacing: tuple[float, float] | None = None
    modality: str | None = None
    shape: tuple[int, int] | None = None
    probabilities: dict[str, float] = field(default_factory=dict)  # calibrated when the run is
    raw_probabilities: dict[str, float] = field(default_factory=dict)  # the model's own values
    image: np.ndarray | None = None  # windowed model input, uint8 (C, S, S)
    aligned: np.ndarray | None = None  # STN output, uint8 (C, s, s)
    theta: np.ndarray | None = None
    heatmap: np.ndarray | None = None  # Grad-CAM, float32 on the slice's grid (like hu)
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def input_flags(self) -> list[str]:
        """The flags saying the slice does not look like a head CT (all but ``no_neighbours``)."""
        return [f for f in self.flags if not is_no_neighbours(f)]

    @property
    def without_neighbours(self) -> bool:
        """A 2.5D model read this slice with itself repeated in place of its neighbours."""
        return any(is_no_neighbours(f) for f in self.flags)


class Progress:
    """How far a long call has got: written by its worker thread, read by the page's timer."""

    def __init__(self) -> None:
        self.done, self.total = 0, 0

    def update(self, done: int, total: int) -> None:
        self.done, self.total = int(done), int(total)

    def reset(self) -> None:
        self.update(0, 0)

    def text(self, what: str) -> str:
        """e.g. ``"Predicting 3 of 40 slices…"``; without a total yet, ``"Predicting…"``."""
        return f"{what} {self.done} of {self.total} slices…" if self.total else f"{what}…"


@dataclass(frozen=True)
class Upload:
    """An uploaded file held in memory: the display name the browser sent and its bytes."""

    name: str
    data: bytes


def analyse_uploads(
    predictor: Predictor,
    uploads: Sequence[Upload],
    saliency_label: str | None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[UploadResult]:
    """Decode each upload once and predict it; results sorted by series then z (files without z last).

    The decoded slices go to ``Predictor.predict_slices``: a 2.5D model (``predictor.context`` > 0) gets
    each series' uploads in one call, so it reads every slice with its uploaded neighbours; a 2D model
    gets one slice a call, the numbers of ``predictor.predict``. Never raises for a bad file: its result
    carries a user-facing message instead. ``progress(done, total)`` is called as files fail to decode
    and as each slice is predicted.
    """
    from hemorrhage_core.dicom import read_slice
    from hemorrhage_core.inference import isolating

    results = [UploadResult(index=i, name=upload.name) for i, upload in enumerate(uploads)]
    done = 0

    reported = 0

    def report(count: int) -> None:
        nonlocal reported
        if progress is not None and count != reported:
            reported = count
            progress(count, len(uploads))

    def advance(count: int) -> None:
        nonlocal done
        done += count
        report(done)

    def failed(i: int, exc: BaseException) -> None:
        results[i].error = user_message(exc, context=f"prediction of upload {i + 1}")

    def predict(cts: list[CtSlice]) -> list[Prediction | Exception]:
        base = done  # a series' slices count as each is predicted: Grad-CAM makes a long series slow
        return predictor.predict_slices(
            cts, saliency_label=saliency_label,
            progress=lambda n: report(base + n),
        )

    decoded: list[tuple[int, CtSlice]] = []
    for i, upload in enumerate(uploads):
        try:
            decoded.append((i, read_slice(upload.data, image_id=f"upload-{i + 1}")))
        except Exception as exc:  # noqa: BLE001 - every failure becomes this file's message
            failed(i, exc)
            advance(1)
    for group in _prediction_groups(decoded, int(getattr(predictor, "context", 0) or 0)):
        cts = [ct for _, ct in group]
        try:
            # A series whose call breaks is retried one slice at a time, so one slice cannot sink the
            # others (a 2.5D model then reads those slices alone, and flags them so).
            predictions = isolating(predict, cts) if len(cts) > 1 else predict(cts)
        except Exception as exc:  # noqa: BLE001 - a refusal of the whole call: each of its files says so
            predictions = [exc] * len(group)
        for (i, ct), prediction in zip(group, predictions, strict=True):
            if isinstance(prediction, BaseException):
                failed(i, prediction)
            else:
                _fill(results[i], ct, prediction)
        advance(len(group))
    return sort_by_position(results)


def _prediction_groups(
    decoded: Sequence[tuple[int, CtSlice]], context: int
) -> list[list[tuple[int, CtSlice]]]:
    """The slices of each ``predict_slices`` call, in upload order: a 2.5D model's per series (the
    Predictor stacks neighbours within one study and series only), a 2D model's one by one."""
    if not context:
        return [[item] for item in decoded]
    groups: dict[tuple[str, str] | int, list[tuple[int, CtSlice]]] = {}
    for i, ct in decoded:
        series = ct.meta.series_uid
        key: tuple[str, str] | int = (str(ct.meta.study_uid or ""), str(series)) if series else i
        groups.setdefault(key, []).append((i, ct))
    return list(groups.values())


def _fill(result: UploadResult, ct: CtSlice, prediction: Prediction) -> None:
    """Copy a decoded slice and its prediction into ``result``."""
    result.hu = ct.hu
    result.z = ct.meta.z
    result.series = ct.meta.series_uid
    result.pixel_spacing = ct.meta.pixel_spacing
    result.modality = ct.meta.modality
    result.shape = (ct.meta.rows, ct.meta.columns)
    result.probabilities = {str(k): float(v) for k, v in prediction.probabilities.items()}
    result.raw_probabilities = {str(k): float(v) for k, v in prediction.raw_probabilities.items()}
    result.image = prediction.image
    result.aligned = prediction.aligned
    result.theta = np.asarray(prediction.theta, dtype=float)
    result.heatmap = prediction.heatmap
    result.flags = [str(f) for f in prediction.flags]


def sort_by_position(results: Sequence[UploadResult]) -> list[UploadResult]:
    """Usable slices grouped by series (in upload order of each series' first slice) and sorted by z;
    slices without z keep upload order after them; failed files come last."""
    ok = [r for r in results if r.ok]
    first_seen: dict[str | None, int] = {}
    for r in ok:
        first_seen.setdefault(r.series, r.index)
    ok.sort(key=lambda r: (first_seen[r.series], r.z is None, r.z if r.z is not None else 0.0, r.index))
    return ok + [r for r in results if not r.ok]


def series_groups(results: Sequence[UploadResult]) -> list[list[UploadResult]]:
    """The usable results split by series, each in z order (as sort_by_position leaves them)."""
    groups: dict[str | None, list[UploadResult]] = {}
    for r in results:
        if r.ok:
            groups.setdefault(r.series, []).append(r)
    return list(groups.values())


@dataclass(frozen=True)
class LabelVerdict:
    """One label of a series verdict: the highest probability, the slice it came from, the threshold."""

    label: str
    probability: float
    slice_position: int  # 1-based, in the series' z order
    slice_name: str
    z: float | None
    threshold: float | None  # None when the run offers no threshold for this label

    @property
    def above(self) -> bool | None:
        """probability >= threshold (the rule thresholds were chosen with); None without a threshold."""
        return None if self.threshold is None else self.probability >= self.threshold


@dataclass(frozen=True)
class SeriesVerdict:
    """Study level for one uploaded series: per label the maximum over its ``n_slices`` slices."""

    n_slices: int
    labels: tuple[LabelVerdict, ...]


def series_verdict(group: Sequence[UploadResult], thresholds: Mapping[str, float] | None) -> SeriesVerdict:
    """The verdict of one series' usable results (in z order, as ``series_groups`` gives them).

    Per label the maximum probability over the slices (the first slice in z order on a tie), as the
    evaluations define study level, compared with ``thresholds[label]`` (study-level operating points).
    """
    usable = [r for r in group if r.ok]
    if not usable:
        raise ValueError("a series verdict needs at least one predicted slice")
    verdicts = []
    for label in LABELS:
        values = [r.probabilities[label] for r in usable]
        best = int(np.argmax(values))  # argmax keeps the first of equal maxima
        threshold = None if thresholds is None or label not in thresholds else float(thresholds[label])
        r = usable[best]
        verdicts.append(LabelVerdict(label, float(values[best]), best + 1, r.name, r.z, threshold))
    return SeriesVerdict(len(usable), tuple(verdicts))
