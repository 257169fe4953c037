"""Calibration on plain arrays: reliability bins, expected calibration error, Brier score, and
per-label temperature scaling fitted on a validation set.

Pure numpy/scipy, no I/O. Arrays follow ``LABELS`` order as in ``hemorrhage_core.metrics``; a metric
that is undefined (empty input) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

from hemorrhage_core.labels import LABELS
from hemorrhage_core.metrics import PROB_CLIP, _as_prob, _pair, per_label_log_loss

ECE_BINS = 15
# Search range of the temperature; the fit is done over log T, where the NLL is smooth and unimodal.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
_CALIBRATION_KEYS = ("method", "temperatures", "fitted_on", "n_images", "nll_before", "nll_after")


# ------------------------------------------------------------------------------------- reliability
@dataclass(frozen=True)
class Reliability:
    """Equal-width reliability bins on [0, 1] for one label.

    Each bin is [lower, upper) except the last, [lower, 1.0]. ``mean_predicted`` and
    ``fraction_positive`` are NaN in empty bins (``to_dict`` writes them as None). ``ece`` is None for
    empty input.
    """

    bin_lower: np.ndarray
    bin_upper: np.ndarray
    count: np.ndarray
    mean_predicted: np.ndarray
    fraction_positive: np.ndarray
    ece: float | None

    def to_dict(self) -> dict:
        def as_list(a: np.ndarray) -> list:
            return [None if math.isnan(v) else v for v in a.tolist()] if a.dtype.kind == "f" else a.tolist()

        arrays = {k: as_list(getattr(self, k)) for k in self.__dataclass_fields__ if k != "ece"}
        return {**arrays, "ece": self.ece}


def reliability(y_true, y_prob, n_bins: int = ECE_BINS) -> Reliability:
    """Reliability bins of one label's (N,) truth and probabilities, with the ECE they give."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    t, p = _pair(y_true, y_prob, 1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="right" makes bins closed on the left; the clip puts p == 1.0 in the last bin.
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=p, minlength=n_bins) / count
        fraction_positive = np.bincount(index, weights=t, minlength=n_bins) / count
    ece = None
    if len(t):
        gaps = np.abs(fraction_positive - mean_predicted)
        ece = float(np.sum(count[count > 0] / len(t) * gaps[count > 0]))
    return Reliability(edges[:-1], edges[1:], count, mean_predicted, fraction_positive, ece)


def expected_calibration_error(y_true, y_prob, n_bins: int = ECE_BINS) -> float | None:
    """Sum over bins of (count / N) * |fraction positive - mean predicted|; None for empty input."""
    return reliability(y_true, y_prob, n_bins).ece


def brier(y_true, y_prob) -> float | None:
    """Mean squared error of one label's (N,) probabilities against its 0/1 truth; None for empty."""
    t, p = _pair(y_true, y_prob, 1)
    return float(np.mean((p - t) ** 2)) if len(t) else None


# ------------------------------------------------------------------------------ temperature scaling
def _clipped_logit(y_prob: np.ndarray) -> np.ndarray:
    return logit(np.clip(y_prob, PROB_CLIP, 1.0 - PROB_CLIP))


def _nll(y_true: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    s = logits / temperature
    # Binary cross-entropy from logits: softplus(s) - y * s, stable for large |s|.
    return float(np.mean(np.logaddexp(0.0, s) - y_true * s))


def fit_temperature(y_true, y_prob) -> float:
    """Temperature T minimising the mean binary NLL of sigmoid(logit(p) / T) for one label's (N,) data.

    Probabilities are clipped to [PROB_CLIP, 1 - PROB_CLIP] before the logit. T > 1 softens an
    overconfident model. A label with one class only (or no images) has nothing to fit: 1.0.
    """
    t, p = _pair(y_true, y_prob, 1)
    if not 0 < int(t.sum()) < len(t):
        return 1.0
    logits = _clipped_logit(p)
    bounds = (math.log(TEMPERATURE_BOUNDS[0]), math.log(TEMPERATURE_BOUNDS[1]))
    result = minimize_scalar(
        lambda log_t: _nll(t, logits, math.exp(log_t)),
        bounds=bounds,
        method="bounded",
        options={"xatol": 1e-8},
    )
    temperature = float(math.exp(result.x))
    # Brent stops within a tolerance; never return a T that is worse than leaving the model alone.
    return temperature if _nll(t, logits, temperature) <= _nll(t, logits, 1.0) else 1.0


def _check_temperature(temperature) -> np.ndarray:
    temps = np.asarray(temperature, dtype=np.float64)
    if not (np.isfinite(temps).all() and (temps > 0).all()):
        raise ValueError("temperatures must be finite and > 0")
    return temps


def apply_temperature(y_prob, temperature) -> np.ndarray:
    """sigmoid(logit(p) / T): calibrated probabilities (0 and 1 stay 0 and 1; T broadcasts)."""
    temps = _check_temperature(temperature)
    return expit(logit(_as_prob(y_prob)) / temps)


def invert_temperature(y_prob, temperature) -> np.ndarray:
    """sigmoid(T * logit(q)): the raw probability behind a calibrated one, inverse of apply_temperature.

    Exact up to float rounding, which loses digits where either probability is within ~1e-8 of 0 or 1
    (float64 keeps few digits of 1 - p there; a value rounded to 0.0 or 1.0 stays there).
    """
    temps = _check_temperature(temperature)
    return expit(logit(_as_prob(y_prob)) * temps)


@dataclass(frozen=True)
class Calibration:
    """Per-label temperatures fitted on one split, and each label's log loss on it before and after.

    ``nll_before`` / ``nll_after`` are ``metrics.per_label_log_loss`` of the raw and the calibrated
    probabilities, what an evaluation of either would report.
    """

    temperatures: dict[str, float]
    n_images: int
    nll_before: dict[str, float]
    nll_after: dict[str, float]
    fitted_on: str = "validation"
    method: str = "temperature"

    @classmethod
    def fit(cls, y_true, y_prob, fitted_on: str = "validation") -> Calibration:
        """Fit one temperature per label on (N, 6) truth and raw probabilities in LABELS order."""
        t, p = _pair(y_true, y_prob, 2)
        if not len(t):
            raise ValueError("cannot fit a calibration on no images")
        temperatures = {label: fit_temperature(t[:, j], p[:, j]) for j, label in enumerate(LABELS)}
        after = per_label_log_loss(t, apply_temperature(p, [temperatures[label] for label in LABELS]))
        return cls(temperatures, len(t), per_label_log_loss(t, p), after, fitted_on)

    def _temps(self) -> np.ndarray:
        return np.array([self.temperatures[label] for label in LABELS])

    def _check(self, y_prob) -> np.ndarray:
        p = _as_prob(y_prob)
        if p.ndim != 2 or p.shape[1] != len(LABELS):
            raise ValueError(f"expected (N, {len(LABELS)}) probabilities in LABELS order, got {p.shape}")
        return p

    def apply(self, y_prob) -> np.ndarray:
        """(N, 6) raw probabilities -> (N, 6) calibrated probabilities."""
        return apply_temperature(self._check(y_prob), self._temps())

    def invert(self, y_prob) -> np.ndarray:
        """(N, 6) calibrated probabilities -> (N, 6) raw probabilities."""
        return invert_temperature(self._check(y_prob), self._temps())

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "temperatures": dict(self.temperatures),
            "fitted_on": self.fitted_on,
            "n_images": self.n_images,
            "nll_before": dict(self.nll_before),
            "nll_after": dict(self.nll_after),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Calibration:
        """Rebuild from ``to_dict`` output (read from disk), refusing anything malformed with ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"calibration must be a mapping, got {type(d).__name__}")
        missing = [k for k in _CALIBRATION_KEYS if k not in d]
        if missing:
            raise ValueError(f"calibration is missing {missing}")
        if d["method"] != "temperature":
            raise ValueError(f"unknown calibration method {d['method']!r} (expected 'temperature')")
        n_images = d["n_images"]
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"calibration n_images must be a positive integer, got {n_images!r}")
        temperatures = _label_numbers(d["temperatures"], "temperatures")
        bad = {k: v for k, v in temperatures.items() if v <= 0}
        if bad:
            raise ValueError(f"calibration temperatures must be > 0, got {bad}")
        return cls(
            temperatures=temperatures,
            n_images=n_images,
            nll_before=_label_numbers(d["nll_before"], "nll_before"),
            nll_after=_label_numbers(d["nll_after"], "nll_after"),
            fitted_on=str(d["fitted_on"]),
        )


def _label_numbers(values, name: str) -> dict[str, float]:
    """{label: finite float} with exactly the LABELS as keys, else ValueError naming ``name``."""
    if not isinstance(values, Mapping):
        raise ValueError(f"calibration {name} must be a mapping of label -> number")
    missing = [label for label in LABELS if label not in values]
    unknown = [k for k in values if k not in LABELS]
    if missing or unknown:
        raise ValueError(f"calibration {name}: missing labels {missing}, unknown labels {unknown}")
    out = {}
    for label in LABELS:
        v = values[label]
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"calibration {name}[{label!r}] must be a finite number, got {v!r}")
        out[label] = float(v)
    return out
