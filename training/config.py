"""Training configuration as data: one dataclass, read from and written to YAML, saved into every run.

Every hyper-parameter the loop uses lives here, so a run's ``run.json`` holds everything needed to
repeat it. Presets (``training/configs/*.yaml``) and ``--config FILE.yaml`` are partial mappings of
these fields; the command line overrides them; unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The STN kinds of hemorrhage_core.models.spec.STN_MODES, repeated so the CLI needs no torch import;
# tests/test_train_config.py checks the two agree.
STN_MODES = ("similarity", "affine", "none")
SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("adamw", "sgd")
STAGE1_MULTI = ("drop", "share")  # stage 1: what happens to slices with 2+ subtypes (engine.Stage1Loss)
METRICS = ("auc_mean", "weighted_log_loss")
CLASS_WEIGHTS = ("none", "balanced")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used, said in words a person understands."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults follow the original report (batch size 10)."""

    # -- data
    data: str = ""  # RSNA-layout folder: stage_2_train/ + stage_2_train.csv
    subset: float = 1.0  # fraction of patients used (phase 1 trains on a subset), class mix kept
    val_fraction: float = 0.2  # share of patients held out for validation
    test_fraction: float = 0.0  # share of patients held out as a test set before anything else (0 = none)
    test_seed: int = 0  # draws the test patients; the pipeline gives all four runs the same one
    seed: int = 0  # split, initialisation, shuffling and augmentation all derive from it
    image_size: int = 224  # preprocessed (cached) slice size in px; the STN resamples to input_size
    windows: list = field(default_factory=lambda: ["brain", "subdural", "bone"])
    head_crop: bool = True  # crop each slice to the skull's box before resizing (preprocess.SlicePrep)
    crop_stretch: bool = False  # with head_crop: the skull's own box stretched to the square, not its square
    crop_margin: float = 0.08  # with head_crop: the box widened by this share of its side at each end (SlicePrep)
    context: int = 0  # 2.5D input: neighbours on each side in the series stacked as channels (0: 2D)
    polar: bool = False  # resample each (cropped) slice in polar coordinates around its centre (SlicePrep)
    polar_overlap: float = 0.0  # with polar: share of a turn repeated past each side of the seam (SlicePrep)
    polar_trace: bool = False  # with polar and head_crop: the polar frame follows the skull's inner table
    polar_fold: int = 1  # with polar: the turn in this many stacked panels, more columns per turn (SlicePrep)
    polar_seam: str = "back"  # with polar: where the turn starts and ends, back or front of the head (SlicePrep)
    polar_midline: float = 1.0  # with polar: the columns this many times as close at the midline (SlicePrep)
    cache: bool = True  # preprocessed uint8 cache, built once and reused
    num_workers: int = 0
    augment: bool = True  # random flips / small affine jitter on training slices only

    # -- model
    backbone: str = "vgg16"
    stage: int = 1
    init_from: str | None = None  # stage-1 run directory (stage 2 only)
    weights: str = "none"  # imagenet | none | PATH to a state dict
    input_size: int | None = None  # backbone input size (STN output); None = the backbone's default
    fine_size: int | None = None  # stage 2 only: fine-tune at this input size instead of the stage-1 model's (progressive resizing)
    early_input_size: int | None = None  # the first early_epochs train at this smaller input (STN output) size; validation at the full size
    early_epochs: int = 0  # epochs at early_input_size (fewer than epochs: the model always ends at its own size)
    freeze_trunk: bool | None = None  # None = the models' policy (frozen with ImageNet weights)
    freeze_bn: bool = False  # batch-norm layers keep their running statistics while training
    precise_bn_images: int = 0  # > 0: before each evaluation, recompute BN statistics over this many training images
    dropout: float | None = None  # head dropout; None = the model's default
    stn: str = "similarity"  # similarity | affine | none (ModelSpec.stn); true / false read as similarity / none

    # -- optimisation
    epochs: int = 10
    batch_size: int = 10
    optimizer: str = "adamw"  # adamw (the original report's) | sgd (momentum; exact to compare gradients, e.g. the DDP test)
    momentum: float = 0.9  # sgd only
    fused_optimizer: bool = True  # adamw: torch's fused kernel (the same update to rounding, ~1.8x faster step on CPU); false: torch's default
    lr: float = 1e-4
    stn_lr_scale: float = 0.1  # the STN localisation net learns at lr * stn_lr_scale
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant, after a linear warm-up
    warmup_epochs: float = 1.0
    head_warmup_epochs: float = 0.0  # stage 2: STN and backbone held still (no gradient, lr 0) this long while the new layers learn (LP-FT)
    step_epochs: int = 3  # step schedule: multiply by step_gamma every step_epochs
    step_gamma: float = 0.1
    min_lr_ratio: float = 0.01  # cosine floor as a share of lr
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    class_weights: str | list = "none"  # stage 1: none | balanced | six numbers (STAGE1_CLASSES order)
    label_smoothing: float = 0.0  # stage 1: this share of each target spread evenly over the six classes
    label_weights: list | None = None  # stage 2: six binary cross-entropy weights (LABELS order); None = RSNA's (any x2)
    stage1_multi: str = "drop"  # stage 1, slices with 2+ subtypes: drop (the original report) | share (kept, target shared among their types)
    aux_loss_weight: float = 0.4  # Inception_v3's auxiliary classifier loss weight
    subtype_ce_weight: float = 0.0  # stage 2: softmax cross-entropy among the subtypes on bleed slices (engine.Stage2Loss)
    subtype_rank_weight: float = 0.0  # stage 2: pairwise ranking of each subtype among bleed slices (engine.subtype_rank_loss)
    repeat_threshold: float = 0.0  # > 0: repeat-factor sampling, a category of frequency f < t drawn sqrt(t / f) x as often (training.sampling)
    subset_boost: list | None = None  # with subset < 1: six multipliers >= 1 of the strata's shares of the subset (STAGE1_CLASSES order)
    repeat_boost: list | None = None  # with repeat_threshold: six multipliers >= 1 of those factors (STAGE1_CLASSES order)
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16)
    channels_last: bool = True  # memory format, used on CUDA (and on CPU with cpu_bf16)
    cpu_bf16: bool = False  # on a CPU with native bf16 (AVX512-BF16/AMX): bf16 autocast + channels_last
    max_steps_per_epoch: int | None = None  # cap for smoke tests and the DDP check

    # -- selection and records
    metric: str = "auc_mean"  # auc_mean (higher is better) | weighted_log_loss (lower is better)
    z_smooth: bool = True  # also report z-smoothed validation metrics
    calibrate: bool = False  # fit per-label temperature scaling on the validation predictions at the end
    gallery_size: int = 24
    eval_batch_size: int | None = None  # None = 2 x batch_size
    runs_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    progress: bool = True  # tqdm bars

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot work."""
        _check(self.stage in (1, 2), "stage", self.stage, "must be 1 or 2")
        _check(0.0 < self.subset <= 1.0, "subset", self.subset, "must be in (0, 1]")
        _check(0.0 < self.val_fraction <= 0.5, "val_fraction", self.val_fraction, "must be in (0, 0.5]")
        _check(0.0 <= self.test_fraction < 0.5, "test_fraction", self.test_fraction, "must be in [0, 0.5)")
        _check(self.image_size >= 32, "image_size", self.image_size, "must be >= 32 px")
        from hemorrhage_core.preprocess import (
            MAX_CONTEXT,
            MAX_POLAR_FOLD,
            MAX_POLAR_MIDLINE,
            MAX_POLAR_OVERLAP,
            POLAR_SEAMS,
        )

        _check(isinstance(self.context, int) and not isinstance(self.context, bool) and 0 <= self.context <= MAX_CONTEXT,
               "context", self.context, f"must be a whole number of slices from 0 to {MAX_CONTEXT}")
        _check(isinstance(self.polar, bool), "polar", self.polar, "must be true or false")
        _check(isinstance(self.crop_stretch, bool), "crop_stretch", self.crop_stretch, "must be true or false")
        _check(isinstance(self.crop_margin, (int, float)) and not isinstance(self.crop_margin, bool)
               and 0.0 <= self.crop_margin <= 0.5,
               "crop_margin", self.crop_margin, "must be a number from 0 to 0.5 (of the box's side, at each end)")
        _check(isinstance(self.polar_trace, bool), "polar_trace", self.polar_trace, "must be true or false")
        _check(isinstance(self.polar_overlap, (int, float)) and not isinstance(self.polar_overlap, bool)
               and 0.0 <= self.polar_overlap <= MAX_POLAR_OVERLAP,
               "polar_overlap", self.polar_overlap, f"must be a number from 0 to {MAX_POLAR_OVERLAP} (of a turn)")
        _check(isinstance(self.polar_fold, int) and not isinstance(self.polar_fold, bool)
               and 1 <= self.polar_fold <= MAX_POLAR_FOLD,
               "polar_fold", self.polar_fold, f"must be a whole number of panels from 1 to {MAX_POLAR_FOLD}")
        _check(not self.polar or self.image_size % self.polar_fold == 0, "polar_fold", self.polar_fold,
               f"must divide image_size ({self.image_size} px) into panels of whole rows")
        _check(isinstance(self.polar_seam, str) and self.polar_seam in POLAR_SEAMS, "polar_seam", self.polar_seam, f"must be one of {', '.join(POLAR_SEAMS)}")
        _check(isinstance(self.polar_midline, (int, float)) and not isinstance(self.polar_midline, bool)
               and 1.0 <= self.polar_midline <= MAX_POLAR_MIDLINE, "polar_midline", self.polar_midline,
               f"must be a number from 1 (columns evenly spaced) to {MAX_POLAR_MIDLINE}")
        _check(self.input_size is None or self.input_size >= 32, "input_size", self.input_size, "must be >= 32 px")
        _check(self.fine_size is None or self.fine_size >= 32, "fine_size", self.fine_size, "must be >= 32 px")
        _check(self.stage == 2 or self.fine_size is None, "fine_size", self.fine_size, "is for stage 2 only")
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.early_input_size is None or (isinstance(self.early_input_size, int) and self.early_input_size >= 32),
               "early_input_size", self.early_input_size, "must be null or a whole number of px >= 32")
        _check(isinstance(self.early_epochs, int) and not isinstance(self.early_epochs, bool) and self.early_epochs >= 0,
               "early_epochs", self.early_epochs, "must be a whole number >= 0")
        _check(self.early_epochs < self.epochs, "early_epochs", self.early_epochs,
               f"must leave at least one of the run's {self.epochs} epochs at the full input size")
        _check(self.early_input_size is None or self.input_size is None or self.early_input_size < self.input_size,
               "early_input_size", self.early_input_size, f"must be smaller than input_size ({self.input_size})")
        _check(self.early_input_size is not None or self.early_epochs == 0, "early_epochs", self.early_epochs,
               "needs early_input_size too")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size, "must be >= 1")
        for name in ("lr", "weight_decay", "stn_lr_scale", "warmup_epochs", "min_lr_ratio", "aux_loss_weight",
                     "subtype_ce_weight", "subtype_rank_weight", "repeat_threshold", "head_warmup_epochs"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(self.repeat_threshold <= 1, "repeat_threshold", self.repeat_threshold, "must be in [0, 1] (a frequency)")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
        _check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "must be in [0, 1)")
        _check(self.stage1_multi in STAGE1_MULTI, "stage1_multi", self.stage1_multi, f"must be one of {', '.join(STAGE1_MULTI)}")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"must be one of {', '.join(SCHEDULES)}")
        _check(self.step_epochs >= 1, "step_epochs", self.step_epochs, "must be >= 1")
        _check(0.0 < self.step_gamma <= 1.0, "step_gamma", self.step_gamma, "must be in (0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "must be > 0 or null")
        _check(self.metric in METRICS, "metric", self.metric, f"must be one of {', '.join(METRICS)}")
        _check(self.device in DEVICES, "device", self.device, f"must be one of {', '.join(DEVICES)}")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _check(self.gallery_size >= 0, "gallery_size", self.gallery_size, "must be >= 0")
        _check(self.precise_bn_images >= 0, "precise_bn_images", self.precise_bn_images, "must be >= 0")
        _check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be >= 1")
        _check(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "max_steps_per_epoch",
            self.max_steps_per_epoch,
            "must be >= 1",
        )
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _check(bool(self.windows), "windows", self.windows, "needs at least one window")
        _check(self.stn in STN_MODES, "stn", self.stn, f"must be one of {', '.join(STN_MODES)}")
        if isinstance(self.class_weights, str):
            _check(self.class_weights in CLASS_WEIGHTS, "class_weights", self.class_weights, "must be none, balanced or six numbers")
        else:
            _check(
                _six_weights(self.class_weights),
                "class_weights",
                self.class_weights,
                "must be none, balanced or six non-negative numbers",
            )
        _check(isinstance(self.label_smoothing, (int, float)) and not isinstance(self.label_smoothing, bool)
               and 0.0 <= self.label_smoothing < 1.0,
               "label_smoothing", self.label_smoothing, "must be a number in [0, 1)")
        if self.label_weights is not None:
            _check(
                _six_weights(self.label_weights) and all(map(math.isfinite, self.label_weights))
                and sum(self.label_weights) > 0,
                "label_weights",
                self.label_weights,
                "must be null or six non-negative numbers (epidural ... subdural, any), not all zero",
            )
        _check_boost("subset_boost", self.subset_boost, self.subset < 1.0,
                     "multiplies the strata's shares of a patient subset: set subset < 1 too")
        _check_boost("repeat_boost", self.repeat_boost, self.repeat_threshold > 0,
                     "multiplies repeat-factor sampling's factors: set repeat_threshold > 0 too")
        _check(self.stage == 2 or self.init_from is None, "init_from", self.init_from, "is for stage 2 only")
        _check(self.stage == 2 or self.head_warmup_epochs == 0, "head_warmup_epochs", self.head_warmup_epochs,
               "is for stage 2 only (the trunk it holds comes from stage 1)")
        _check(self.head_warmup_epochs < self.epochs, "head_warmup_epochs", self.head_warmup_epochs,
               f"must be shorter than the run ({self.epochs} epochs)")

    @property
    def maximize(self) -> bool:
        """True when a larger selection metric is better."""
        return self.metric == "auc_mean"

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    # -------------------------------------------------------------------------- conversions
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
        """Fields from ``values`` over ``base`` (or the defaults); unknown keys are refused."""
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
        merged = (base or cls()).to_dict()
        merged.update({k: _coerce(k, v) for k, v in values.items()})
        try:
            return cls(**merged)
        except TypeError as exc:  # e.g. a list where a number belongs
            raise ConfigError(str(exc)) from None

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied (None values are ignored: 'not given')."""
        return TrainConfig.from_dict({k: v for k, v in changes.items() if v is not None}, base=self)

    def to_yaml(self, path: str | PathLike | None = None) -> str:
        """YAML text of every field; also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_yaml(cls, path: str | PathLike, *, base: TrainConfig | None = None) -> TrainConfig:
        """Read a (partial) TrainConfig mapping from a YAML file."""
        return cls.from_dict(read_yaml_mapping(path), base=base)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def read_yaml_mapping(path: str | PathLike) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError otherwise."""
    import yaml

    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings, not {type(loaded).__name__}")
    return loaded


def preset_path(name: str) -> Path:
    """``training/configs/<name>.yaml``, or ``name`` itself when it is a path to a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(known)} (or a path to a .yaml file)")
    return path


def _six_weights(value: Any) -> bool:
    """True for six non-negative numbers (per-class or per-label loss weights), not a string."""
    if isinstance(value, str):
        return False
    try:
        values = list(value)
    except TypeError:
        return False
    return len(values) == 6 and all(isinstance(w, (int, float)) and w >= 0 for w in values)


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"config {name}={value!r} {why}")


def _check_boost(name: str, value: Any, applies: bool, why_not: str) -> None:
    """A boost field: null, or six multipliers >= 1 (STAGE1_CLASSES order) where the thing it multiplies
    is on (``applies``; else refused with ``why_not``)."""
    if value is None:
        return
    _check(_six_weights(value) and all(math.isfinite(b) and b >= 1 for b in value), name, value,
           "must be null or six numbers >= 1 (none, epidural ... subdural)")
    _check(applies, name, value, why_not)


_FLOAT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", "float | None")}


def _coerce(name: str, value: Any) -> Any:
    if name == "stn" and isinstance(value, bool):  # the field was a bool: keep old configs and --set stn=false working
        return "similarity" if value else "none"
    # YAML reads "1e-4" (no dot) as a string; numbers given as text are accepted for float fields.
    if name in _FLOAT_FIELDS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"config {name}={value!r} must be a number") from None
    if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# ------------------------------------------------------------------------------- pipeline presets
PHASES = ("phase1", "phase2")
STAGES = ("stage1", "stage2")


@dataclass(frozen=True)
class PipelinePreset:
    """The two-phase recipe: TrainConfig fields shared by all runs, per phase and per stage.

    YAML layout::

        defaults: {...}            # every run
        phase1: {subset: 0.5, stage1: {...}, stage2: {...}}
        phase2: {stage1: {...}, stage2: {...}}

    A stage's config is defaults < phase fields < stage fields < command-line overrides.
    """

    name: str
    defaults: dict
    phases: dict  # phase -> {"shared": {...}, "stage1": {...}, "stage2": {...}}

    @classmethod
    def load(cls, name: str) -> PipelinePreset:
        path = preset_path(name)
        raw = read_yaml_mapping(path)
        unknown = set(raw) - {"defaults", "description", *PHASES}
        if unknown:
            raise ConfigError(f"preset {path}: unknown sections {sorted(unknown)}; use defaults, phase1, phase2")
        defaults = dict(raw.get("defaults") or {})
        phases = {}
        for phase in PHASES:
            section = dict(raw.get(phase) or {})
            stages = {stage: dict(section.pop(stage, None) or {}) for stage in STAGES}
            phases[phase] = {"shared": section, **stages}
        preset = cls(name=path.stem, defaults=defaults, phases=phases)
        for phase in PHASES:  # fail on a bad key now, not after an hour of phase 1
            for stage in STAGES:
                preset.config(phase, stage)
        return preset

    def sets(self, phase: str, stage: str, key: str) -> bool:
        """Whether this preset itself gives ``key`` to that run (in defaults, the phase or the stage)."""
        return any(key in layer for layer in (self.defaults, self.phases[phase]["shared"], self.phases[phase][stage]))

    def config(self, phase: str, stage: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of one run of the recipe (``init_from`` is set by the pipeline)."""
        values: dict[str, Any] = {}
        for layer in (self.defaults, self.phases[phase]["shared"], self.phases[phase][stage], overrides or {}):
            values.update(layer)
        values["stage"] = 1 if stage == "stage1" else 2
        if values["stage"] == 1:
            values.pop("init_from", None)
        return TrainConfig.from_dict(values)
