"""``fit(config) -> run directory``: data, model, loop, run records, checkpoints and ``--resume``.

One code path for one process and for torchrun: every rank trains, rank 0 alone writes. Each epoch
ends with metrics.csv's row, then (when the validation metric improved) best.pt, predictions.csv and
the gallery, then last.pt with the full train state. A resumed run restores model, optimizer,
scheduler, grad scaler, epoch and every RNG state from last.pt, so on CPU it ends bitwise where an
uninterrupted run ends.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from hemorrhage_core.labels import LABELS, SUBTYPES
from hemorrhage_core.machine import device_label
from training import distributed as D
from training.config import ConfigError, TrainConfig
from training.engine import (
    LoopSettings,
    NonFiniteLossError,
    TrainView,
    TrunkHold,
    evaluate,
    improved,
    make_grad_scaler,
    make_loss,
    make_optimizer,
    make_scheduler,
    may_leave_parameters_unused,
    recompute_batchnorm,
    selection_value,
    steps_in,
    train_one_epoch,
)

log = logging.getLogger(__name__)

LAST = "last"
BEST = "best"


# ------------------------------------------------------------------------------------------ runtime
@dataclass(frozen=True)
class Runtime:
    env: D.DistEnv
    device: torch.device


def setup_runtime(config: TrainConfig) -> Runtime:
    """Join torchrun's process group if launched by it, pick the device, set CPU threads."""
    device_type = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    env = D.init(device_type)
    device = D.device_for(env, config.device)
    if device.type == "cuda":
        # Fixed input sizes: cuDNN times its convolution algorithms once and keeps the fastest.
        torch.backends.cudnn.benchmark = True
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    return Runtime(env, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as checkpoint-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), int(np_state["pos"]),
                         int(np_state["has_gauss"]), float(np_state["cached_gaussian"])))
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def _python_state_from_list(values: list) -> tuple:
    version, internal, gauss = values
    return (int(version), tuple(int(v) for v in internal), gauss)


# --------------------------------------------------------------------------------------------- data
@dataclass
class DataBundle:
    """The rows a run trains and validates on, and where they come from."""

    data_dir: Path
    index: pd.DataFrame  # usable rows after the patient subset
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame  # held-out test patients' rows (empty when test_fraction is 0): never trained on
    patient_ids: np.ndarray  # every patient of the data set (split.csv lists the unused ones too)
    cache: Any  # SliceCache or None
    skipped: list[str]
    fingerprint: str
    prep: Any  # the run's SlicePrep


def slice_prep(config: TrainConfig):
    """The run's preprocessing (size, windows, head crop), built once per run from its config."""
    from hemorrhage_core.preprocess import SlicePrep
    from hemorrhage_core.windowing import WindowStack

    try:
        windows = WindowStack.from_list(config.windows)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"config windows={config.windows!r}: {exc}") from None
    return SlicePrep(config.image_size, windows, head_crop=config.head_crop, crop_margin=config.crop_margin,
                     crop_stretch=config.crop_stretch, context=config.context, polar=config.polar,
                     polar_overlap=config.polar_overlap, polar_trace=config.polar_trace, polar_fold=config.polar_fold,
                     polar_seam=config.polar_seam, polar_midline=config.polar_midline)


def load_index(config: TrainConfig, env: D.DistEnv):
    """The data set's index. Rank 0 builds it, or checks the saved one is fresh; the other ranks then
    read the file rank 0 names, without listing the image folder (no per-file stat on a shared disk)."""
    from hemorrhage_core.data import build_index
    from hemorrhage_core.data.header_index import read_index

    def work():
        return build_index(config.data, progress=config.progress)

    shared = _rank0_then_share(env, work, lambda index: index.report.index_path)
    if env.is_main:
        return shared
    # An index rank 0 could not save anywhere: each rank builds its own.
    return read_index(shared) if shared else build_index(config.data, progress=False)


def build_cache(
    config: TrainConfig, rows: pd.DataFrame, env: D.DistEnv, prep=None, *,
    workers: int | None = None, cache_dir=None, rebuild: bool = False,
):
    """The preprocessed slice cache over ``rows`` (None when the config turns it off). Rank 0 builds it
    (continuing an unfinished build), or checks the saved one; the other ranks open the folder it names.
    ``workers``, ``cache_dir`` and ``rebuild`` go to ``SliceCache.build`` (the cache command sets them)."""
    if not config.cache:
        return None
    from hemorrhage_core.data import SliceCache

    prep = slice_prep(config) if prep is None else prep

    def work():
        return SliceCache.build(rows, config.data, prep=prep, progress=config.progress, workers=workers,
                                cache_dir=cache_dir, rebuild=rebuild)

    shared = _rank0_then_share(env, work, lambda cache: str(cache.directory))
    return shared if env.is_main else SliceCache.open(shared)


def _rank0_then_share(env: D.DistEnv, work: Callable[[], Any], share: Callable[[Any], Any]) -> Any:
    """On rank 0: ``work()``'s result, after sending ``share(result)`` to the other ranks; there: what
    rank 0 sent. When rank 0's work raises, the other ranks raise too instead of waiting for it."""
    from contextlib import suppress

    from hemorrhage_core.errors import DatasetError

    if env.is_main:
        try:
            result = work()
        except BaseException:
            with suppress(Exception):
                D.broadcast(("failed", None), env, prepare=True)
            raise
        D.broadcast(("ok", share(result)), env, prepare=True)
        return result
    status, value = D.broadcast(None, env, prepare=True)  # rank 0 may read the whole data set first
    if status != "ok":
        raise DatasetError("rank 0 could not prepare the data (its error says why)")
    return value


def data_fingerprint(rows: pd.DataFrame) -> str:
    """SHA-256 (16 hex) of the image ids, paths and labels a run used: same data, same fingerprint."""
    digest = hashlib.sha256()
    ordered = rows.sort_values("image_id")
    for values in ordered[["image_id", "path", *LABELS]].itertuples(index=False, name=None):
        digest.update("\t".join(str(v) for v in values).encode() + b"\n")
    return digest.hexdigest()[:16]


def holdout_test(config: TrainConfig, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, test) rows of the index: the config's held-out test patients (none when test_fraction is 0)."""
    from hemorrhage_core.data import split_test

    if config.test_fraction <= 0.0:
        return table, table.iloc[:0]
    return split_test(table, fraction=config.test_fraction, seed=config.test_seed)


def split_roles(data: DataBundle) -> pd.DataFrame:
    """split.csv: every patient of the data set (hashed) and its role: train, val, test or unused."""
    role = dict.fromkeys(data.patient_ids, "unused")
    for name, rows in (("test", data.test), ("train", data.train), ("val", data.val)):
        role.update(dict.fromkeys(rows["patient_id"].unique(), name))
    frame = pd.DataFrame({"patient": _hash(role), "role": list(role.values())})
    return frame.sort_values(["role", "patient"], kind="stable").reset_index(drop=True)


def patient_subset(config: TrainConfig, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the config's patient subset (``subset``, strata shares times ``subset_boost``)."""
    from hemorrhage_core.data import subset_patients
    from hemorrhage_core.labels import STAGE1_CLASSES

    if config.subset >= 1.0:
        return table
    boost = dict(zip(STAGE1_CLASSES, config.subset_boost, strict=True)) if config.subset_boost else None
    return subset_patients(table, fraction=config.subset, seed=config.seed, boost=boost)


def prepare_data(config: TrainConfig, env: D.DistEnv) -> DataBundle:
    """Index -> patient subset -> patient-grouped train/validation split -> cache."""
    from hemorrhage_core.data import split_train_val

    index = load_index(config, env)
    prep = slice_prep(config)
    # One cache over the whole data set serves every subset and split of it (and the next run).
    cache = build_cache(config, index.table, env, prep)
    # The test patients go first, from the whole index, so every run of a recipe holds out the same ones.
    table, test = holdout_test(config, index.table)
    table = patient_subset(config, table)
    skipped = set(index.report.missing_ids) | set(index.report.unreadable)
    if cache is not None:
        failed = set(cache.failed) & set(table["image_id"])
        skipped |= failed
        table = cache.usable(table)
    train, val = split_train_val(table, val_fraction=config.val_fraction, seed=config.seed)
    return DataBundle(
        data_dir=Path(config.data), index=table, train=train, val=val, test=test, cache=cache,
        patient_ids=index.table["patient_id"].unique(),
        skipped=sorted(skipped), fingerprint=data_fingerprint(table), prep=prep,
    )


def augmenter(config: TrainConfig):
    """The training augmentation of the config (None when off)."""
    if config.augment is False:
        return None
    from hemorrhage_core.data import AugmentConfig, SliceAugment

    panels = config.polar_fold if config.polar else 1  # a flip of a folded polar image swaps its panels
    if config.augment is True:
        return SliceAugment(AugmentConfig(), panels)
    try:
        return SliceAugment(AugmentConfig(**dict(config.augment)), panels)
    except TypeError as exc:
        raise ConfigError(f"config augment: {exc}") from None


def make_dataset(config: TrainConfig, rows: pd.DataFrame, data_dir: Path, cache, *, stage: int, train: bool, prep=None):
    from hemorrhage_core.data import SliceDataset

    prep = slice_prep(config) if prep is None else prep
    return SliceDataset(
        rows, data_dir, stage=stage, prep=prep, cache=cache,
        augment=augmenter(config) if train else None, stage1_multi=config.stage1_multi,
    )


def train_loader(dataset, config: TrainConfig, env: D.DistEnv, device: torch.device) -> DataLoader:
    """Shuffled by a DistributedSampler in every world size (see distributed.train_sampler), or with
    ``repeat_threshold`` > 0 by repeat-factor sampling (training.sampling), which keeps the epoch's
    length; a full last batch only, so batch norm never sees a single image."""
    from hemorrhage_core.data.loader import collate_skip_failed, seed_worker
    from training.sampling import RepeatFactorSampler, repeat_factors

    if config.repeat_threshold > 0:
        sampler = RepeatFactorSampler(repeat_factors(np.asarray(dataset.targets), config.repeat_threshold,
                                                     config.repeat_boost),
                                      num_replicas=env.world_size, rank=env.rank, seed=config.seed)
    else:
        sampler = D.train_sampler(dataset, env, seed=config.seed)
    generator = torch.Generator()  # the workers' seeds: one stream per rank, so ranks augment differently
    generator.manual_seed(D.rank_seed(config.seed, env.rank))
    per_rank = len(sampler)
    return DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
        collate_fn=collate_skip_failed, pin_memory=device.type == "cuda",
        drop_last=per_rank > config.batch_size, persistent_workers=config.num_workers > 0,
        worker_init_fn=seed_worker, generator=generator,
    )


def eval_loader(dataset, config: TrainConfig, env: D.DistEnv, device: torch.device) -> DataLoader:
    from hemorrhage_core.data.loader import collate_skip_failed

    return DataLoader(
        dataset, batch_size=config.effective_eval_batch_size, sampler=D.ShardSampler(len(dataset), env),
        num_workers=config.num_workers, collate_fn=collate_skip_failed, pin_memory=device.type == "cuda",
    )


# -------------------------------------------------------------------------------------------- model
def parent_checkpoint(init_from: str | os.PathLike) -> Path:
    """The best checkpoint of a stage-1 run directory (or a checkpoint file given directly)."""
    from hemorrhage_core.runs import RunFormatError, read_run

    path = Path(init_from)
    if path.is_file():
        return path
    try:
        record = read_run(path)
    except RunFormatError as exc:
        raise ConfigError(f"--init-from {path}: not a usable run directory ({exc})") from None
    if record.stage != 1:
        raise ConfigError(f"--init-from {path}: stage 2 starts from a stage-1 run, this is stage {record.stage}")
    model_path = record.model_path
    if not model_path.is_file():
        raise ConfigError(f"--init-from {path}: the run has no model file yet ({record.info.get('model_file')})")
    return model_path


def adopt_parent(config: TrainConfig) -> TrainConfig:
    """Stage 2 takes backbone, image size, windows and input size from its stage-1 checkpoint."""
    from hemorrhage_core.checkpoint import load_checkpoint

    if config.stage != 2:
        return config
    if not config.init_from:
        raise ConfigError("stage 2 needs --init-from a stage-1 run directory")
    ckpt = load_checkpoint(parent_checkpoint(config.init_from))
    inherited = {
        "backbone": ckpt.spec.backbone,
        "image_size": ckpt.image_size,
        "windows": ckpt.windows.to_list(),
        "head_crop": ckpt.prep.head_crop,
        "crop_margin": ckpt.prep.crop_margin,
        "context": ckpt.prep.context,
        "polar": ckpt.prep.polar,
        "polar_overlap": ckpt.prep.polar_overlap,
        "crop_stretch": ckpt.prep.crop_stretch,
        "polar_trace": ckpt.prep.polar_trace,
        "polar_fold": ckpt.prep.polar_fold,
        "polar_seam": ckpt.prep.polar_seam,
        "polar_midline": ckpt.prep.polar_midline,
        "input_size": ckpt.spec.input_size,
        "stn": ckpt.spec.stn,
    }
    if config.fine_size is not None and config.fine_size != inherited["input_size"]:
        # Progressive resizing: the cached slice grows in proportion, so the STN keeps the same margin.
        inherited["image_size"] = round(ckpt.image_size * config.fine_size / inherited["input_size"])
        inherited["input_size"] = config.fine_size
        log.info("stage 2 fine-tunes at %d px (stage 1: %d px), slices cached at %d px",
                 config.fine_size, ckpt.spec.input_size, inherited["image_size"])
    changed = {k: v for k, v in inherited.items() if getattr(config, k) != v}
    if changed:
        log.info("stage 2 follows its stage-1 model for %s", ", ".join(sorted(changed)))
    return TrainConfig.from_dict(inherited, base=config)


def stage2_network(model1: nn.Module, config: TrainConfig) -> nn.Module:
    """Model2 of stage-2 ``config`` on ``model1`` as its trunk."""
    from hemorrhage_core.models import stage2_from_stage1

    return stage2_from_stage1(model1, dropout=config.dropout, freeze=config.freeze_trunk, input_size=config.input_size)


def build_network(config: TrainConfig) -> nn.Module:
    """Model1 from scratch/ImageNet, or Model2 from the stage-1 run's best checkpoint."""
    from hemorrhage_core.checkpoint import model_from_checkpoint
    from hemorrhage_core.models import DEFAULT_DROPOUT, ModelSpec, build_model

    if config.stage == 2:
        model1, _ = model_from_checkpoint(parent_checkpoint(config.init_from))
        return stage2_network(model1, config)
    spec = ModelSpec(
        backbone=config.backbone, stage=1, input_size=config.input_size,
        stn=config.stn, context=config.context,
        dropout=DEFAULT_DROPOUT if config.dropout is None else config.dropout,
    )
    return build_model(spec, weights=config.weights, freeze=config.freeze_trunk)


# --------------------------------------------------------------------------------------------- loop
class Loop:
    """Model, optimizer, schedule and loaders of one training job, with its state for checkpoints."""

    def __init__(self, config: TrainConfig, net: nn.Module, train_set, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.net = net.to(runtime.device)
        self.settings = LoopSettings.from_config(config, runtime.device, runtime.env)
        if self.settings.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.loader = train_loader(train_set, config, runtime.env, runtime.device)
        stage1 = np.asarray(train_set.targets) if config.stage == 1 else None
        self.loss_fn = make_loss(config, stage1).to(runtime.device)
        self.steps_per_epoch = steps_in(self.loader, self.settings)
        self.hold = TrunkHold.of(self.net, config, self.steps_per_epoch)
        unused = may_leave_parameters_unused(self.net, self.settings, holds_trunk=self.hold is not None)
        self.model = D.wrap_model(TrainView(self.net), runtime.env, runtime.device, find_unused_parameters=unused)
        self.optimizer = make_optimizer(self.net, config)
        self.scheduler = make_scheduler(self.optimizer, config, self.steps_per_epoch)
        self.scaler = make_grad_scaler(self.settings)
        self.full_size = int(self.net.stn.output_size)
        if config.early_input_size is not None:
            from hemorrhage_core.models import get_backbone

            smallest = get_backbone(config.backbone).min_size
            if not smallest <= config.early_input_size < self.full_size:
                raise ConfigError(f"early_input_size {config.early_input_size} px: {config.backbone} here needs "
                                  f"{smallest} to {self.full_size - 1} px (below its input size {self.full_size})")

    def input_size_at(self, epoch: int) -> int:
        """The STN's output size while training ``epoch`` (1-based): early epochs may train smaller."""
        early = self.config.early_input_size
        return early if early is not None and epoch <= self.config.early_epochs else self.full_size

    def train_epoch(self, epoch: int):
        """One epoch of training, then (precise_bn_images > 0) batch-norm statistics recomputed.

        Early epochs (``early_input_size``) resample to fewer pixels, which costs about their square
        less; every part after the STN is size-agnostic (global pooling). The full size is back before
        anything evaluates or saves the model."""
        self.loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        self.net.stn.output_size = self.input_size_at(epoch)
        try:
            result = train_one_epoch(
                self.model, self.loader, self.optimizer, self.scheduler, self.loss_fn, self.settings,
                epoch=epoch, scaler=self.scaler, desc=f"epoch {epoch}/{self.config.epochs} train", hold=self.hold,
            )
        finally:
            self.net.stn.output_size = self.full_size
        if self.config.precise_bn_images:
            started = time.perf_counter()
            recompute_batchnorm(self.model, self.loader, self.settings, self.config.precise_bn_images)
            result = replace(result, seconds=result.seconds + time.perf_counter() - started)
        return result

    def state(self, epoch: int, best: dict | None) -> dict[str, Any]:
        """The train state for last.pt. Called on every rank: under torchrun it gathers each rank's
        RNG and loader-generator states (``ranks``), so a resume gives every rank its own streams back."""
        mine = {"rng": rng_state(), "loader_generator": self.loader.generator.get_state()}  # type: ignore[union-attr]
        state = {
            "epoch": int(epoch),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            **mine,
            "best": best,
        }
        if self.runtime.env.enabled:
            state["ranks"] = D.gather_objects(mine, self.runtime.env)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        env = self.runtime.env
        ranks = state.get("ranks") or []
        mine = ranks[env.rank] if len(ranks) == env.world_size and env.enabled else state
        self.loader.generator.set_state(mine["loader_generator"])  # type: ignore[union-attr]
        set_rng_state(mine["rng"])
        if mine is state and env.rank > 0:  # saved by another world size: fresh streams for this rank
            fresh = D.rank_seed(self.config.seed + int(state["epoch"]), env.rank)
            seed_everything(fresh)
            self.loader.generator.manual_seed(fresh)  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------ run records
def gallery_positions(targets: np.ndarray, image_ids: np.ndarray, size: int) -> list[int]:
    """A fixed sample of validation positions covering every label (then label-free slices).

    Ids are ordered by a hash, so the sample is spread over patients yet stable between epochs.
    """
    if size <= 0 or not len(image_ids):
        return []
    order = sorted(range(len(image_ids)), key=lambda i: hashlib.sha256(str(image_ids[i]).encode()).hexdigest())
    t = np.nan_to_num(np.asarray(targets, dtype=np.float64))
    per_label = max(1, size // (len(LABELS) + 1))
    chosen: list[int] = []
    for j in range(len(SUBTYPES)):
        chosen += [i for i in order if t[i, j] > 0 and i not in chosen][:per_label]
    chosen += [i for i in order if t[i, -1] == 0 and i not in chosen][:per_label]
    chosen += [i for i in order if i not in chosen][: max(0, size - len(chosen))]
    return sorted(chosen[:size])


def _hash(values) -> list[str]:
    from hemorrhage_core.data import hash_id

    return [hash_id(v) for v in values]


def predictions_frame(val_rows: pd.DataFrame, targets: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """predictions.csv: image id, hashed patient and series, z, truth and probability per label."""
    frame = pd.DataFrame({
        "image_id": val_rows["image_id"].astype(str).to_numpy(),
        "patient": _hash(val_rows["patient_id"]),
        "series": _hash(val_rows["series_uid"]),
        "z": val_rows["z"].to_numpy(dtype=np.float64),
    })
    for j, label in enumerate(LABELS):
        frame[f"true_{label}"] = np.nan_to_num(targets[:, j]).astype(np.int64)
    for j, label in enumerate(LABELS):
        frame[f"prob_{label}"] = probs[:, j]
    return frame


@torch.no_grad()
def gallery_entries(net: nn.Module, val_set, positions: list[int], stage: int, settings: LoopSettings):
    """GalleryEntry per position: the windowed input, the STN-aligned image, theta and probabilities.

    The network runs as validation runs it (``settings``: bf16 autocast and channels_last where the run
    uses them), so a gallery slice's probabilities are its row of predictions.csv, and cost what they
    cost there.
    """
    from hemorrhage_core.models import IN_CHANNELS, probabilities
    from hemorrhage_core.preprocess import centre_channels
    from hemorrhage_core.runs import GalleryEntry

    if not positions:
        return []
    items = [val_set[i] for i in positions]
    kept = [(p, item) for p, item in zip(positions, items, strict=True) if item is not None]
    if not kept:
        return []
    images = torch.stack([item[0] for _, item in kept])
    net.eval()
    with settings.autocast():
        out = net.forward_extras(settings.to_device(images))
    probs = probabilities(stage, out.logits.float()).cpu().numpy()
    entries = []
    for k, (_pos, (image, target, image_id)) in enumerate(kept):
        entries.append(GalleryEntry(
            image_id=str(image_id),
            input_image=centre_channels(image, IN_CHANNELS).numpy(),  # the centre slice of a 2.5D stack
            aligned_image=out.aligned[k].float().clamp(0, 1).cpu().numpy(),
            theta=out.theta[k].float().cpu().reshape(-1).tolist(),
            true=[int(v) for v in np.nan_to_num(target.numpy())],
            prob=probs[k].tolist(),
        ))
    return entries


def epoch_line(epoch: int, epochs: int, row: dict[str, Any], images_per_s: float, is_best: bool) -> str:
    """The concise per-epoch log line (numbers only: no ids, no patient data)."""
    def f(key: str, fmt: str = ".4f") -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)

    return (
        f"epoch {epoch}/{epochs} train_loss {f('train_loss')} val_loss {f('val_loss')} "
        f"auc_mean {f('val_auc_mean')} auc_any {f('val_auc_any')} wll {f('val_weighted_log_loss')} "
        f"acc {f('val_accuracy')} lr {f('lr', '.2e')} {row.get('seconds', 0):.1f}s {images_per_s:.1f} img/s"
        + (" *best" if is_best else "")
    )


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a scheduler stopping the job) ends the run as ``interrupted``, like Ctrl-C."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------- fit
def fit(
    config: TrainConfig,
    *,
    on_start: Callable[[Path], None] | None = None,
    resume: str | os.PathLike | None = None,
) -> Path:
    """Train one model as ``config`` says and return its run directory (on every rank).

    ``resume`` continues that run from its last.pt instead (``config`` is then the run's own).
    ``on_start`` is called with the run directory as soon as run.json exists (rank 0 only).
    Under torchrun the process group stays up for the caller's next run; the command closes it.
    """
    runtime = setup_runtime(config)
    with _sigterm_as_interrupt():
        return _fit(config, runtime, on_start=on_start, resume=Path(resume) if resume else None)


def resume_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig stored in an existing run's run.json."""
    from hemorrhage_core.runs import RunFormatError, load_run_json

    try:
        info = load_run_json(run_dir)
    except RunFormatError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    if info.get("kind") != "train":
        raise ConfigError(f"cannot resume {run_dir}: it is a {info.get('kind')} run, not a training run")
    saved = dict(info.get("config") or {})
    saved.setdefault("head_crop", False)  # a run from before the head crop did not crop
    return TrainConfig.from_dict(saved)


def record_operating_points(writer, config: TrainConfig) -> None:
    """Save with the run what is chosen on its validation predictions at the best epoch: the
    calibration (``calibrate``) and the Youden thresholds (on calibrated probabilities when calibrated)."""
    from hemorrhage_core import evaluations

    if config.calibrate:
        calibration = evaluations.fit_calibration(writer.path)
        temps = ", ".join(f"{k} {v:.2f}" for k, v in calibration.temperatures.items())
        writer.log(f"temperature scaling fitted on validation: {temps}")
    else:
        evaluations.write_thresholds(writer.path, None)


def _fit(config: TrainConfig, runtime: Runtime, *, on_start, resume: Path | None) -> Path:
    from hemorrhage_core.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from hemorrhage_core.runs import RunWriter, WriterLock, remove_stale_temp_files

    env, device = runtime.env, runtime.device
    started = time.perf_counter()
    # Dropout and augmentation draw per rank (rank 0: the seed itself); DDP copies rank 0's initial weights.
    seed_everything(D.rank_seed(config.seed, env.rank))
    train_state = None
    # A run that a live process still writes is refused before anything of it is read or changed.
    lock = WriterLock.acquire(resume) if resume is not None and env.is_main else None
    if resume is not None:
        last_path = resume / "checkpoints" / f"{LAST}.pt"
        if not last_path.is_file():
            raise ConfigError(f"cannot resume {resume}: it has no checkpoints/{LAST}.pt (no epoch finished)")
        last = load_checkpoint(last_path)
        if last.train_state is None:
            raise ConfigError(f"cannot resume {resume}: {last_path.name} holds no train state")
        train_state = last.train_state
        net, _ = model_from_checkpoint(last)
    else:
        config = adopt_parent(config)
        net = build_network(config)

    data = prepare_data(config, env)
    train_set = make_dataset(config, data.train, data.data_dir, data.cache, stage=config.stage, train=True, prep=data.prep)
    # Validation always carries the six labels: stage-1 models are scored on them too.
    val_set = make_dataset(config, data.val, data.data_dir, data.cache, stage=2, train=False, prep=data.prep)
    if len(train_set) < 1 or len(val_set) < 1:
        raise ConfigError(f"too few images: {len(train_set)} for training, {len(val_set)} for validation")
    val_rows = val_set.index
    val_position = {image_id: i for i, image_id in enumerate(val_set.image_ids)}
    series_ids = val_rows["series_uid"].astype(str).to_numpy()
    z_positions = val_rows["z"].to_numpy(dtype=np.float64)
    loop = Loop(config, net, train_set, runtime)

    writer = None
    if env.is_main:
        if resume is not None:
            writer = RunWriter.reopen(resume, lock)
            stale = remove_stale_temp_files(resume)
            if stale:
                writer.log(f"removed {len(stale)} temporary file(s) left by the interrupted process")
            writer.truncate_metrics(int(train_state["epoch"]))
            writer.log(f"resumed from epoch {int(train_state['epoch'])}")
        else:
            parent_id = None
            if config.init_from:
                parent_id = Path(config.init_from).name
            writer = RunWriter.create(
                config.runs_dir, backbone=config.backbone, stage=config.stage, config=config.to_dict(),
                parent_run=parent_id,
                data={
                    "dir": str(data.data_dir), "fingerprint": data.fingerprint, "n_images": len(data.index),
                    "n_train": len(train_set), "n_val": len(val_set),
                    "n_patients_train": int(data.train["patient_id"].nunique()),
                    "n_patients_val": int(data.val["patient_id"].nunique()),
                    "n_test": len(data.test), "n_patients_test": int(data.test["patient_id"].nunique()),
                    "skipped": data.skipped,
                },
                split={"seed": config.seed, "val_fraction": config.val_fraction,
                       "val_patients": sorted(_hash(data.val["patient_id"].unique())),
                       "test_fraction": config.test_fraction, "test_seed": config.test_seed},
                epochs_planned=config.epochs, device=device_label(device), world_size=env.world_size,
            )
            writer.update(precision=loop.settings.precision)
            if config.cpu_bf16 and device.type == "cpu" and not loop.settings.amp:
                # Said on the console too: on such a CPU the quick recipe takes several times as long.
                note = ("cpu_bf16 is on, but this CPU has no native bf16 (AVX512-BF16 or AMX): training runs in "
                        "float32, as emulated bf16 would be about ten times slower; expect each step to take 2-5x "
                        "as long as on a CPU with it (docs/benchmarks.md)")
                log.warning(note)
                writer.log(note)
            writer.write_split(split_roles(data))
            writer.log(
                f"{config.backbone} stage {config.stage}: {len(train_set)} training and {len(val_set)} "
                f"validation images, {loop.steps_per_epoch} steps per epoch, device {device_label(device)} "
                f"({loop.settings.precision}), "
                f"world size {env.world_size}"
            )
            if config.early_epochs:
                writer.log(f"epochs 1-{config.early_epochs} train at {config.early_input_size} px, the rest and "
                           f"every validation at {loop.full_size} px")
            if config.repeat_threshold > 0:
                from training.sampling import category_factors

                factors = category_factors(np.asarray(train_set.targets), config.repeat_threshold,
                                           config.repeat_boost)
                writer.log(f"repeat-factor sampling at threshold {config.repeat_threshold:g}: "
                           + ", ".join(f"{name} x{value:.2f}" for name, value in factors.items()))
    run_dir = Path(D.broadcast(str(writer.path) if writer else None, env))
    if writer is not None and on_start is not None:
        on_start(run_dir)

    best: dict | None = None
    first_epoch = 1
    if train_state is not None:
        loop.load_state(train_state)
        best = train_state.get("best")
        first_epoch = int(train_state["epoch"]) + 1
    gallery = gallery_positions(val_set.targets, val_set.image_ids, config.gallery_size)

    try:
        for epoch in range(first_epoch, config.epochs + 1):
            try:
                result = loop.train_epoch(epoch)
            except NonFiniteLossError as exc:
                message = f"{exc}; stopped, the last good checkpoint is kept"
                log.error(message)
                if writer is not None:
                    writer.log(message)
                    writer.finish("failed", message)
                D.barrier(env, f"the failed end of epoch {epoch}")
                return run_dir
            evaluation = evaluate(
                loop.net, eval_loader(val_set, config, env, device), loop.settings, loop.loss_fn,
                position_of=val_position, desc=f"epoch {epoch}/{config.epochs} validate",
                series_ids=series_ids if config.z_smooth else None, z=z_positions if config.z_smooth else None,
            )
            gathered = evaluation.predictions
            rows = val_rows.iloc[gathered["positions"]]
            row = {"epoch": epoch, "train_loss": result.loss, **evaluation.metrics, "lr": result.lr,
                   "seconds": round(result.seconds + evaluation.seconds, 3)}
            value = selection_value(row, config.metric)
            is_best = improved(value, None if best is None else best["value"], config.maximize)
            if is_best:
                best = {"epoch": epoch, "metric": config.metric, "value": value}
            epoch_state = loop.state(epoch, best)  # on every rank: it gathers their RNG states
            if writer is not None:
                writer.append_metrics(row)
                if is_best:
                    save_checkpoint(writer.checkpoint_path(BEST), loop.net, prep=data.prep, config=config.to_dict(), metrics=row)
                    writer.write_predictions(predictions_frame(rows, gathered["targets"], gathered["probs"]))
                    writer.write_gallery(gallery_entries(loop.net, val_set, gallery, config.stage, loop.settings))
                    writer.set_best(epoch, config.metric, value)
                save_checkpoint(writer.checkpoint_path(LAST), loop.net, prep=data.prep, config=config.to_dict(), metrics=row,
                                train_state=epoch_state)
                rate = result.images * env.world_size / max(result.seconds, 1e-9)
                line = epoch_line(epoch, config.epochs, row, rate, is_best)
                writer.log(line)
                log.info(line)
            D.barrier(env, f"the end of epoch {epoch} (rank 0 writes the checkpoints)")
        if writer is not None:
            if best is None:
                writer.finish("failed", "no epoch produced a finite validation metric; no best model")
            else:
                record_operating_points(writer, config)
                writer.log(f"finished in {time.perf_counter() - started:.1f}s; best epoch {best['epoch']} "
                           f"{best['metric']} {best['value']:.4f}")
                writer.finish("finished")
    except BaseException as exc:
        if writer is not None:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            writer.finish(status, f"{type(exc).__name__}: {exc}"[:500])
        raise
    return run_dir
