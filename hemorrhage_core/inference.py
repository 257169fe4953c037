"""The one way to turn a DICOM slice into hemorrhage probabilities (evaluate, predict and the dashboard).

``Predictor`` reads a file or bytes with ``hemorrhage_core.dicom.read_slice``, refuses what it was not
made for, crops, windows and resizes with the checkpoint's own preprocessing (``SlicePrep`` + ``to_tensor``),
runs the model and returns probabilities in ``LABELS`` order with the windowed input, the STN-aligned
image, theta and optionally a Grad-CAM heatmap. Given a run's ``Calibration`` (temperature scaling
fitted on its validation set) the probabilities it returns are calibrated. Then no subtype is reported
likelier than ``any`` (``labels.consistent_labels``: a subtype above ``any`` is lowered to it), since a
slice with a subtype is a slice with hemorrhage. Each Prediction keeps the model's own values beside
them (``raw_probabilities``).

Refused (InputRejectedError): a modality other than CT, and everything the DICOM reader refuses
(DicomReadError). Flagged, not refused: HU content that does not look like a head CT (no bone, no air,
inverted sign, no closed skull ring), a BodyPartExamined naming another part, a missing modality. A flagged slice still gets probabilities, because a refusal would
hide the model's behaviour on exactly the inputs a user needs to question; the flags travel with the
prediction and the caller decides (the dashboard shows them, evaluate counts them).

A 2.5D model (``SlicePrep.context`` k > 0) reads each slice with its k neighbours on each side: the
slices of one call are grouped by series and sorted by z (``stack_neighbours``), so a caller passes a
whole series (or several) to ``predict_many``. A slice whose series has no other slice among the
inputs (``predict`` of one file) is read with itself repeated in their place, and flagged
``no_neighbours``: the model was trained on real neighbours, so that answer is an approximation.

Thread-safe: the shared model is put in eval mode once, at construction; each call runs under its own
``torch.inference_mode`` and Grad-CAM builds its hooks on per-call objects (see ``saliency``).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from hemorrhage_core.dicom import CtSlice, read_slice
from hemorrhage_core.errors import HemorrhageError, InputRejectedError
from hemorrhage_core.labels import LABELS, consistent_labels
from hemorrhage_core.machine import cpu_has_native_bf16
from hemorrhage_core.models.net import HemorrhageNet, probabilities
from hemorrhage_core.preprocess import (
    InputGeometry,
    SlicePrep,
    centre_channels,
    context_positions,
    find_skull_ring,
    stack_context,
    to_tensor,
)
from hemorrhage_core.windowing import WindowStack

if TYPE_CHECKING:
    from hemorrhage_core.calibration import Calibration

log = logging.getLogger(__name__)

Source = str | os.PathLike | bytes
T = TypeVar("T")
R = TypeVar("R")

# The header fields a Prediction may carry: an allowlist, so no patient identifier can slip through.
META_FIELDS: tuple[str, ...] = (
    "image_id", "modality", "rows", "columns", "z", "pixel_spacing", "study_uid", "series_uid",
    "window_center", "window_width",
)
ACCEPTED_MODALITIES: frozenset[str] = frozenset({"CT"})
NO_NEIGHBOURS_FLAG = ("no_neighbours: this model reads each slice with its neighbours in the series; none were "
                      "given, so the slice stands in for them (give the whole series for the model's full reading)")


@dataclass(frozen=True)
class HuLimits:
    """Plausibility thresholds for a head CT slice in HU (any slice through a head holds bone and air)."""

    min_max_hu: float = 100.0  # below: no bone in the slice
    max_min_hu: float = -500.0  # above: no air around the head
    max_border_hu: float = 500.0  # image border (air) brighter than this: sign flipped
    border_px: int = 4


HU_LIMITS = HuLimits()


def hu_flags(hu: np.ndarray, limits: HuLimits = HU_LIMITS) -> list[str]:
    """Warnings ("code: explanation") for HU content that does not look like a head CT slice."""
    flags: list[str] = []
    lo, hi = float(np.min(hu)), float(np.max(hu))
    if hi < limits.min_max_hu:
        flags.append(f"no_bone: maximum HU is {hi:.0f} (< {limits.min_max_hu:.0f}); not a head CT or wrong rescale")
    if lo > limits.max_min_hu:
        flags.append(f"no_air: minimum HU is {lo:.0f} (> {limits.max_min_hu:.0f}); cropped, not CT or wrong rescale")
    b = max(1, min(limits.border_px, min(hu.shape) // 4))
    border = np.concatenate([hu[:b].ravel(), hu[-b:].ravel(), hu[:, :b].ravel(), hu[:, -b:].ravel()])
    border_median = float(np.median(border))
    if border_median > limits.max_border_hu:
        flags.append(
            f"inverted: the image border (normally air, -1000 HU) has median {border_median:.0f} HU; sign flipped?"
        )
    return flags


# BodyPartExamined values (upper case; DICOM CID 4031 and scanners' own) that name the head.
HEAD_BODY_PARTS: tuple[str, ...] = ("HEAD", "BRAIN", "SKULL", "CRAN", "CEREB")


def head_flags(body_part: str, skull_ring: bool | None) -> list[str]:
    """Warnings for a CT slice that is plainly not of a head: BodyPartExamined naming another part, or
    bone that forms no closed ring around brain-density tissue (``skull_ring`` False: the caller's
    ``find_skull_ring`` found none; None: not checked, e.g. when the HU themselves are wrong and no
    ring is then no news).

    The ring is open on the lowest slices of a head series (skull base, foramen magnum) and may be on
    the vertex, so there the warning says so instead of refusing: the reader decides.
    """
    flags: list[str] = []
    part = (body_part or "").strip().upper()
    if part and not any(name in part for name in HEAD_BODY_PARTS):
        flags.append(f"not_head: BodyPartExamined is {part!r}; this model reads head CT")
    if skull_ring is False:
        flags.append("no_skull_ring: no closed ring of skull in the slice; not a head CT, or a slice "
                     "through the skull base or vertex")
    return flags


@dataclass
class Prediction:
    """One slice's result.

    probabilities: label -> p in ``LABELS`` order, calibrated when the Predictor has a calibration, with
    no subtype above ``any`` (``consistent_labels``);
    image: uint8 (C, S, S) windowed model input (of a 2.5D stack, the slice itself); aligned: uint8 (C, s, s) STN output; theta: float32
    (2, 3); heatmap: float32 (H, W) in [0, 1] on the slice's own grid (the head crop undone, so it
    overlays the slice as read), or None; meta: header fields
    (``META_FIELDS``, no patient identifiers); flags: warnings about the input ("code: explanation");
    raw_probabilities: the model's own values, before calibration and the consistency rule.
    """

    probabilities: dict[str, float]
    image: np.ndarray = field(repr=False)
    aligned: np.ndarray = field(repr=False)
    theta: np.ndarray
    heatmap: np.ndarray | None = field(repr=False)
    meta: dict[str, Any]
    flags: list[str] = field(default_factory=list)
    saliency_label: str | None = None
    raw_probabilities: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False

    def record(self) -> dict[str, Any]:
        """JSON-safe summary without arrays: image_id, probabilities, flags (for CSV / JSON output)."""
        return {"image_id": self.meta.get("image_id"), **self.probabilities, "flags": list(self.flags)}


def _on_slice(heatmap: np.ndarray, geometry: InputGeometry | None) -> np.ndarray:
    """A heatmap on the model input's grid, moved onto its slice's grid (kept as is when unknown)."""
    return heatmap if geometry is None else geometry.to_slice(heatmap)


@dataclass(frozen=True)
class _Prepared:
    image: np.ndarray = field(repr=False)
    meta: dict[str, Any]
    flags: list[str]
    geometry: InputGeometry | None = None  # where the image came from in its slice (None: unknown)


def isolating(run: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[R | Exception]:
    """``run(items)``; if that fails unexpectedly, ``run([item])`` one item at a time, so one input that
    breaks a batch cannot sink the others (its exception stands in its place). A HemorrhageError from the
    whole batch propagates: it refuses the call, not an input (``predict_many`` returns those in place)."""
    try:
        return list(run(items))
    except HemorrhageError:
        raise
    except Exception:  # noqa: BLE001 - one input must not sink the others
        log.debug("batch prediction failed; predicting one input at a time", exc_info=True)
    out: list[R | Exception] = []
    for item in items:
        try:
            out.extend(run([item]))
        except Exception as exc:  # noqa: BLE001
            log.debug("prediction failed", exc_info=True)
            out.append(exc)
    return out


def _chunks(items: Iterator[Source], size: int) -> Iterator[list[Source]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _check_saliency_label(label: str | None) -> None:
    if label is not None and label not in LABELS:
        raise ValueError(f"unknown saliency label {label!r}; known: {', '.join(LABELS)}")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class Predictor:
    """DICOM (path or bytes) -> Prediction with a model and its checkpoint's preprocessing.

    ``checkpoint_meta``: a ``Checkpoint`` or a mapping with ``prep`` (a SlicePrep or its ``to_dict()``),
    or, for models from before the head crop, ``image_size`` and ``windows`` (a WindowStack or its
    ``to_list()``). ``batch_size`` bounds ``predict_many``'s forward batches.
    ``channels_last`` converts the model and inputs to NHWC, faster for convolutions on CPU.
    ``read_ahead`` (default: on for accelerators, off on CPU) overlaps reading with the model in
    ``predict_many`` (not for a 2.5D model, which reads every slice of the call before stacking them).
    ``calibration`` (a run's ``Calibration``) is applied to every probability returned.
    The Predictor takes the model over: it moves it to ``device``, sets its memory format and eval
    mode once, here, and never changes it afterwards.
    """

    def __init__(
        self,
        model: HemorrhageNet,
        checkpoint_meta: Any,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        channels_last: bool = True,
        read_ahead: bool | None = None,
        calibration: Calibration | None = None,
        bf16: bool | None = None,
    ) -> None:
        get = checkpoint_meta.get if isinstance(checkpoint_meta, Mapping) else lambda k: getattr(checkpoint_meta, k)
        try:
            prep = get("prep")
        except (AttributeError, KeyError):
            prep = None
        if prep is None:
            windows = get("windows")
            windows = windows if isinstance(windows, WindowStack) else WindowStack.from_list(windows)
            prep = SlicePrep(int(get("image_size")), windows)
        self.prep: SlicePrep = prep if isinstance(prep, SlicePrep) else SlicePrep.from_dict(prep)
        self.windows = self.prep.windows
        self.image_size = self.prep.image_size
        self.context = self.prep.context
        if self.context != model.spec.context:
            raise ValueError(f"the model stacks {model.spec.context} neighbours a side, the preprocessing {self.context}")
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.stage = model.spec.stage
        self.read_ahead = self.device.type != "cpu" if read_ahead is None else bool(read_ahead)
        self.calibration = calibration
        if bf16 is None:  # a model trained in bf16 on CPU is served in bf16 on CPU
            try:
                config = get("config")
            except (AttributeError, KeyError):
                config = None
            bf16 = bool((config or {}).get("cpu_bf16", False)) if isinstance(config, Mapping) else False
        # Only on a CPU that computes bf16 natively: emulated bf16 is slower than float32.
        self.bf16 = bool(bf16) and self.device.type == "cpu" and cpu_has_native_bf16()
        # Set once here, never per call: concurrent calls must not change the shared model.
        self.model = model.to(self.device, memory_format=self.memory_format).eval()

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """Load a checkpoint safely (see ``hemorrhage_core.checkpoint``) and wrap it."""
        from hemorrhage_core.checkpoint import model_from_checkpoint

        model, ckpt = model_from_checkpoint(path)
        return cls(model, ckpt, device=device, **kwargs)

    def with_calibration(self, calibration: Calibration | None) -> Predictor:
        """A Predictor sharing this one's model (no copy, no reload) that applies ``calibration``."""
        if calibration is self.calibration:
            return self
        other = copy.copy(self)
        other.calibration = calibration
        return other

    # -- reading ------------------------------------------------------------------------------------
    def prepare(self, source: Source) -> _Prepared:
        """Read, check and preprocess one slice; raises DicomReadError / InputRejectedError."""
        return self.prepare_slice(read_slice(source))

    def prepare_slice(self, ct: CtSlice) -> _Prepared:
        """Check and preprocess a slice already decoded by ``read_slice``; raises InputRejectedError."""
        meta = {name: _plain(getattr(ct.meta, name, None)) for name in META_FIELDS}
        modality = str(meta.get("modality") or "").strip().upper()
        flags: list[str] = []
        if not modality:
            flags.append("modality_missing: the file does not say it is CT")
        elif modality not in ACCEPTED_MODALITIES:
            raise InputRejectedError(
                f"{meta.get('image_id') or 'input'}: modality {modality!r} is not CT; this model reads head CT only"
            )
        hu = np.asarray(ct.hu)
        if hu.ndim != 2 or hu.size == 0:
            raise InputRejectedError(f"{meta.get('image_id') or 'input'}: expected one 2-D slice, got shape {hu.shape}")
        hu_problems = hu_flags(hu)
        # One ring search serves the not-a-head check and the head crop.
        ring = find_skull_ring(hu) if self.prep.head_crop or not hu_problems else None
        flags += hu_problems + head_flags(ct.meta.body_part, None if hu_problems else ring is not None)
        geometry = self.prep.geometry(hu.shape, ring)
        return _Prepared(self.prep.apply_at(hu, geometry), meta, flags, geometry)

    # -- prediction ---------------------------------------------------------------------------------
    def predict(
        self, source: Source | CtSlice, *, saliency_label: str | None = None,
        neighbours: Sequence[Source | CtSlice] = (),
    ) -> Prediction:
        """One slice, from a file, its bytes or a ``CtSlice`` already decoded (a caller that also shows
        the HU decodes once). ``saliency_label`` (a name in ``LABELS``) adds a Grad-CAM heatmap.
        ``neighbours``: other slices of its series (a 2.5D model stacks the nearest in z with it; a
        neighbour that cannot be read is left out; ignored without context)."""
        _check_saliency_label(saliency_label)
        prepared = self._prepare_any(source)
        if self.context and neighbours:
            others = self._prepare_chunk(neighbours)
            for refused in (p for p in others if not isinstance(p, _Prepared)):
                log.info("a neighbour was left out: %s", refused)
            prepared = self.stack_neighbours([prepared, *(p for p in others if isinstance(p, _Prepared))])[0]
        return self._run([prepared], saliency_label)[0]

    def predict_slices(
        self, slices: Sequence[Source | CtSlice], *, saliency_label: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Prediction | HemorrhageError]:
        """Slices of one upload or series, each read once and predicted one forward at a time (as
        ``predict`` would, so the numbers equal a one-slice call's), a 2.5D model stacking each with
        its neighbours among ``slices``. A slice that is refused yields its error, in place.
        ``progress(done)`` is called after each slice's forward."""
        _check_saliency_label(saliency_label)
        prepared = self._prepare_chunk(slices)
        return self._forward_in_batches(prepared, 1, saliency_label, progress)

    def _prepare_any(self, source: Source | CtSlice) -> _Prepared:
        return self.prepare_slice(source) if isinstance(source, CtSlice) else self.prepare(source)

    def predict_many(
        self, sources: Iterable[Source], *, batch_size: int | None = None
    ) -> list[Prediction | HemorrhageError]:
        """Many slices in batched forwards; a slice that is refused yields its error, in place.

        With ``read_ahead`` one helper thread reads and preprocesses the next batch while the model
        runs on the current one: that hides reading behind an accelerator's compute. On CPU the
        forward already uses every core, and on the project's 2-core machine reading ahead measured
        no faster (within noise), so it is off there by default.
        """
        size = self.batch_size if batch_size is None else max(1, int(batch_size))
        if self.context:  # neighbours may be anywhere among the sources: read them all, then stack
            prepared = self._prepare_chunk(list(sources))
            return self._forward_in_batches(prepared, size)
        chunks = _chunks(iter(sources), size)
        results: list[Prediction | HemorrhageError] = []

        def finish(prepared: list[_Prepared | HemorrhageError]) -> None:
            ready = [p for p in prepared if isinstance(p, _Prepared)]
            predictions = iter(self._run(ready, None)) if ready else iter(())
            results.extend(next(predictions) if isinstance(p, _Prepared) else p for p in prepared)

        if not self.read_ahead:
            for chunk in chunks:
                finish(self._prepare_chunk(chunk))
            return results
        def read(chunk: list[Source] | None) -> list[_Prepared | HemorrhageError] | None:
            return None if chunk is None else self._prepare_chunk(chunk)  # None: the sources are done

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="predictor-read") as pool:
            future = pool.submit(read, next(chunks, None))
            while (prepared := future.result()) is not None:
                future = pool.submit(read, next(chunks, None))
                finish(prepared)
        return results

    def predict_prepared(self, prepared: Sequence[_Prepared]) -> list[Prediction]:
        """One forward over slices ``prepare`` has read (for callers that read in their own pool). A
        2.5D model stacks each slice with its neighbours among ``prepared``, unless ``stack_neighbours``
        did so already over a larger set."""
        return self._run(prepared, None) if prepared else []

    def stack_neighbours(self, prepared: Sequence[_Prepared]) -> list[_Prepared]:
        """The model inputs of a 2.5D model: each slice stacked with its ``context`` neighbours on each
        side among ``prepared`` (same study and series, sorted by z, the series' ends repeated). A slice
        with no series, no z or no other slice of its series among them stands in for its neighbours and
        is flagged ``no_neighbours``. Without context, and for inputs stacked already, the inputs as they are."""
        if not self.context:
            return list(prepared)
        out = list(prepared)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(prepared):
            if p.image.shape[0] != self.prep.channels:
                continue  # stacked already
            series, z = p.meta.get("series_uid"), p.meta.get("z")
            if series and isinstance(z, int | float) and np.isfinite(z):
                groups.setdefault((str(p.meta.get("study_uid") or ""), str(series)), []).append(i)
            else:
                out[i] = replace(p, image=stack_context([p.image] * self.prep.slices), flags=[*p.flags, NO_NEIGHBOURS_FLAG])
        for members in groups.values():
            members.sort(key=lambda i: (float(prepared[i].meta["z"]), str(prepared[i].meta.get("image_id") or "")))
            alone = len(members) == 1
            for i, row in zip(members, context_positions(len(members), self.context), strict=True):
                p = prepared[i]
                flags = [*p.flags, NO_NEIGHBOURS_FLAG] if alone else list(p.flags)
                out[i] = replace(p, image=stack_context([prepared[members[j]].image for j in row]), flags=flags)
        return out

    def _forward_in_batches(
        self, prepared: Sequence[_Prepared | HemorrhageError], size: int,
        saliency_label: str | None = None, progress: Callable[[int], None] | None = None,
    ) -> list[Prediction | HemorrhageError]:
        """Stack the readable slices with their neighbours, forward them ``size`` at a time, and put
        each result (or the input's error) in its input's place; ``progress(done)`` after each forward."""
        ready_at = [i for i, p in enumerate(prepared) if isinstance(p, _Prepared)]
        stacked = self.stack_neighbours([prepared[i] for i in ready_at])
        results: list[Prediction | HemorrhageError] = list(prepared)  # errors stay in place
        for start in range(0, len(stacked), size):
            batch = stacked[start : start + size]
            for i, prediction in zip(ready_at[start : start + size], self._run(batch, saliency_label), strict=True):
                results[i] = prediction
            if progress is not None:
                progress(start + len(batch))
        return results

    def _prepare_chunk(self, chunk: Sequence[Source | CtSlice]) -> list[_Prepared | HemorrhageError]:
        out: list[_Prepared | HemorrhageError] = []
        for source in chunk:
            try:
                out.append(self._prepare_any(source))
            except HemorrhageError as exc:
                out.append(exc)
        return out

    def _run(self, prepared: Sequence[_Prepared], saliency_label: str | None) -> list[Prediction]:
        prepared = self.stack_neighbours(prepared)
        batch = to_tensor(np.stack([p.image for p in prepared]))
        x = batch.to(self.device).contiguous(memory_format=self.memory_format)
        heatmaps: np.ndarray | None = None
        # bf16 autocast for the network only; probabilities are taken from float32 logits.
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        if saliency_label is None:
            with torch.inference_mode():
                with autocast:
                    out = self.model.forward_extras(x)
                logits, theta, aligned = out.logits.float(), out.theta, out.aligned
                probs = probabilities(self.stage, logits)
        else:
            from hemorrhage_core.saliency import grad_cam

            # Grad-CAM reads activations as numpy, which has no bf16: it runs in float32.
            cam = grad_cam(self.model, x, saliency_label)
            heatmaps, theta, aligned = cam.heatmaps, cam.theta, cam.aligned
            with torch.inference_mode():
                logits = cam.logits.float()
                if self.bf16:  # the same probabilities as without saliency: one more forward, in bf16
                    with autocast:
                        logits = self.model(x).float()
                probs = probabilities(self.stage, logits)
        raw_np = probs.float().cpu().numpy().astype(np.float64)
        # Calibrated in float64 from the float32 output, as evaluate calibrates the saved raw values.
        probs_np = consistent_labels(raw_np if self.calibration is None else self.calibration.apply(raw_np))
        theta_np = theta.float().cpu().numpy().astype(np.float32)
        aligned_np = aligned.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8).cpu().numpy()
        return [
            Prediction(
                probabilities={label: float(probs_np[i, j]) for j, label in enumerate(LABELS)},
                image=centre_channels(p.image, self.prep.channels),
                aligned=np.ascontiguousarray(aligned_np[i]),
                theta=theta_np[i],
                heatmap=None if heatmaps is None else _on_slice(heatmaps[i], p.geometry),
                meta=dict(p.meta),
                flags=list(p.flags),
                saliency_label=saliency_label,
                raw_probabilities={label: float(raw_np[i, j]) for j, label in enumerate(LABELS)},
                calibrated=self.calibration is not None,
            )
            for i, p in enumerate(prepared)
        ]
