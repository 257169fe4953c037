"""A scikit-learn estimator around the trainer, so ``GridSearchCV`` can tune it.

``X`` is a slice of the data set's index (a DataFrame with ``image_id``, ``path``, ``patient_id``,
``series_uid``, ``z``, the six labels and ``stage1_class``); ``fit`` trains on those rows with the same
loop as ``train`` (no validation split, no run directory) and ``predict_proba`` returns (N, 6)
probabilities over LABELS. Scorers judge the held-out rows by validation AUC or weighted log loss, as
the original report asks (not by the loss the model minimises). Cross-validate with ``GroupKFold`` on
``X["patient_id"]`` so no patient is on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from hemorrhage_core.labels import LABELS
from training.config import ConfigError, TrainConfig

# TrainConfig fields a grid may vary (each is an estimator parameter; None = the base config's value).
TUNABLE: tuple[str, ...] = (
    "lr", "batch_size", "epochs", "image_size", "input_size", "stn_lr_scale", "weight_decay",
    "warmup_epochs", "schedule", "augment", "dropout", "freeze_trunk", "freeze_bn", "grad_clip",
    "class_weights", "label_smoothing", "label_weights", "stage1_multi", "subtype_ce_weight", "subtype_rank_weight",
    "repeat_threshold", "repeat_boost", "fine_size", "head_warmup_epochs",
)


class HemorrhageEstimator(BaseEstimator):
    """Train one model on index rows; predict label probabilities for others.

    ``config`` is the base TrainConfig (data folder, backbone, stage, sizes...); the keyword parameters
    override its fields of the same name when not None, which is what GridSearchCV sets.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        lr: float | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
        image_size: int | None = None,
        input_size: int | None = None,
        stn_lr_scale: float | None = None,
        weight_decay: float | None = None,
        warmup_epochs: float | None = None,
        schedule: str | None = None,
        augment: bool | dict | None = None,
        dropout: float | None = None,
        freeze_trunk: bool | None = None,
        freeze_bn: bool | None = None,
        grad_clip: float | None = None,
        class_weights: str | list | None = None,
        label_smoothing: float | None = None,
        label_weights: list | None = None,
        stage1_multi: str | None = None,
        subtype_ce_weight: float | None = None,
        subtype_rank_weight: float | None = None,
        repeat_threshold: float | None = None,
        repeat_boost: list | None = None,
        fine_size: int | None = None,
        head_warmup_epochs: float | None = None,
    ) -> None:
        self.config = config
        self.lr = lr
        self.batch_size = batch_size
        self.epochs = epochs
        self.image_size = image_size
        self.input_size = input_size
        self.stn_lr_scale = stn_lr_scale
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.schedule = schedule
        self.augment = augment
        self.dropout = dropout
        self.freeze_trunk = freeze_trunk
        self.freeze_bn = freeze_bn
        self.grad_clip = grad_clip
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.label_weights = label_weights
        self.stage1_multi = stage1_multi
        self.subtype_ce_weight = subtype_ce_weight
        self.subtype_rank_weight = subtype_rank_weight
        self.repeat_threshold = repeat_threshold
        self.repeat_boost = repeat_boost
        self.fine_size = fine_size
        self.head_warmup_epochs = head_warmup_epochs

    def effective_config(self) -> TrainConfig:
        """The base config with this estimator's non-None parameters applied (validated)."""
        base = self.config or TrainConfig()
        changes = {name: getattr(self, name) for name in TUNABLE if getattr(self, name) is not None}
        return TrainConfig.from_dict(changes, base=base)

    # ------------------------------------------------------------------------------------ fitting
    def fit(self, X: pd.DataFrame, y: Any = None, groups: Any = None) -> HemorrhageEstimator:  # noqa: ARG002
        """Train on the rows of ``X`` for ``epochs`` epochs; the final weights are kept (``net_``)."""
        from training import trainer
        from training.distributed import DistEnv

        config = trainer.adopt_parent(self.effective_config())
        rows = _rows(X)
        runtime = trainer.Runtime(DistEnv(), trainer.D.device_for(DistEnv(), config.device))
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        trainer.seed_everything(config.seed)
        net = trainer.build_network(config)
        cache = trainer.build_cache(config, rows, DistEnv())
        if cache is not None:
            rows = cache.usable(rows)
        train_set = trainer.make_dataset(config, rows, trainer.Path(config.data), cache, stage=config.stage, train=True)
        if len(train_set) < 1:
            raise ConfigError("no trainable images in this fold")
        loop = trainer.Loop(config, net, train_set, runtime)
        self.losses_ = [loop.train_epoch(epoch).loss for epoch in range(1, config.epochs + 1)]
        self.net_ = loop.net
        self.config_ = config
        self.fit_patients_ = sorted(set(rows["patient_id"].astype(str)))
        self.n_fit_images_ = len(train_set)
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        """(N, 6) probabilities over LABELS for the rows of ``X`` (in ``X``'s order)."""
        from training import trainer
        from training.distributed import DistEnv
        from training.engine import LoopSettings, predict_loader

        if not hasattr(self, "net_"):
            raise RuntimeError("fit the estimator before predicting")
        config = self.config_
        rows = _rows(X)
        cache = trainer.build_cache(config, rows, DistEnv())  # the fit's cache may not cover these rows
        dataset = trainer.make_dataset(config, rows, trainer.Path(config.data), cache, stage=2, train=False)
        device = next(self.net_.parameters()).device
        settings = LoopSettings.from_config(config, device, DistEnv())
        out = predict_loader(self.net_, trainer.eval_loader(dataset, config, DistEnv(), device), settings, desc="predict")
        position = {image_id: i for i, image_id in enumerate(rows["image_id"].astype(str))}
        probs = np.full((len(rows), len(LABELS)), np.nan)
        probs[[position[i] for i in out["image_ids"]]] = out["probs"]
        # Rows without a prediction (failed to decode) are scored as unknown: 0.5.
        return np.nan_to_num(probs, nan=0.5)

    def score(self, X: pd.DataFrame, y: Any = None) -> float:
        """Mean validation AUC over the labels with both classes in ``X``."""
        return make_scorer("auc_mean")(self, X, y)


def _rows(X: Any) -> pd.DataFrame:
    if not isinstance(X, pd.DataFrame):
        raise TypeError("X must be rows of the data-set index (a pandas DataFrame)")
    missing = [c for c in ("image_id", "path", "patient_id", *LABELS) if c not in X.columns]
    if missing:
        raise ValueError(f"X lacks index columns {missing}")
    return X


def make_scorer(metric: str) -> Callable[[HemorrhageEstimator, pd.DataFrame, Any], float]:
    """A GridSearchCV scorer: ``auc_mean`` (higher is better) or ``weighted_log_loss`` (negated)."""
    from hemorrhage_core import metrics

    if metric not in ("auc_mean", "weighted_log_loss"):
        raise ConfigError(f"scoring must be auc_mean or weighted_log_loss, got {metric!r}")

    def scorer(estimator: HemorrhageEstimator, X: pd.DataFrame, y: Any = None) -> float:  # noqa: ARG001
        rows = _rows(X)
        truth = rows[list(LABELS)].to_numpy(dtype=np.int64)
        probs = estimator.predict_proba(rows)
        if metric == "auc_mean":
            value = metrics.mean_defined(metrics.per_label_auc(truth, probs))
            return float("nan") if value is None else float(value)
        return -metrics.weighted_log_loss(truth, probs)

    scorer.__name__ = f"{metric}_scorer"
    return scorer
