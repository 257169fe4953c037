"""The training loop's parts: losses, optimizer, learning-rate schedule, one epoch, evaluation.

``train_one_epoch`` and ``evaluate`` follow torchvision's reference scripts: plain functions over a
model, a loader and a small settings record, so the trainer, the grid-search estimator and the tests
share one loop. Nothing here writes files.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hemorrhage_core.labels import LABEL_WEIGHTS, LABELS, STAGE1_CLASSES
from hemorrhage_core.metrics import stage1_targets
from training.config import TrainConfig
from training.distributed import DistEnv, all_mean, all_true, gather_rows, unwrap

# CUDA: steps between host reads of the summed loss (NaN check and log). A read waits for the GPU to
# drain its queue, so reading every step would stall it; on CPU a read costs nothing and happens every step.
CUDA_READ_EVERY = 50

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the epoch stopped before the optimizer step."""


# ---------------------------------------------------------------------------------------- losses
class Stage1Loss(nn.Module):
    """Cross-entropy over STAGE1_CLASSES, each sample scaled by its class weight, averaged over N.

    ``smoothing`` (label smoothing, Szegedy et al. 2016) spreads that share of every target evenly
    over the six classes; a sample's weight still comes from its unsmoothed target.

    Dividing by N (not by the sum of the weights, as CrossEntropyLoss does) keeps the loss of a batch
    split over processes equal to the mean of their losses, which is what DDP's gradient averaging
    assumes.
    """

    def __init__(self, class_weights: torch.Tensor | None = None, ignore_index: int = -100,
                 smoothing: float = 0.0) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smoothing = float(smoothing)
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(len(STAGE1_CLASSES)))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:
            return self._shared(logits.float(), target.float())
        target = target.long()
        keep = target != self.ignore_index
        per_sample = F.cross_entropy(logits.float(), target.clamp_min(0), reduction="none",
                                     label_smoothing=self.smoothing)
        weights = self.class_weights.to(per_sample.device)[target.clamp_min(0)] * keep
        return (per_sample * weights).sum() / max(int(target.numel()), 1)

    def _shared(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, 6) LABELS targets (``stage1_multi: share``): see ``shared_stage1_targets``; a sample's
        weight is the same mix of class weights. A single-type slice gets exactly the hard-label loss."""
        soft = shared_stage1_targets(labels)
        # Rows with no target (all zeros) stay all zeros: they take no part, smoothed or not.
        smooth = soft * (1.0 - self.smoothing) + soft.sum(dim=1, keepdim=True) * (self.smoothing / soft.shape[1])
        per_sample = -(smooth * F.log_softmax(logits, dim=1)).sum(dim=1)
        weights = soft @ self.class_weights.to(soft.device)
        return (per_sample * weights).sum() / max(int(labels.shape[0]), 1)


def shared_stage1_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N, 6) LABELS -> (N, 6) target distributions over STAGE1_CLASSES: none when nothing bleeds,
    else 1 shared equally among the slice's subtypes. Unlabeled rows, and rows marked ``any`` without
    a subtype, get all zeros (no part in the loss)."""
    known = torch.isfinite(labels).all(dim=1, keepdim=True)
    labels = torch.where(known, labels, torch.zeros_like(labels))
    types = labels[:, :-1]
    count = types.sum(dim=1, keepdim=True)
    none = ((count == 0) & (labels[:, -1:] == 0)).to(labels.dtype)
    return torch.cat([none, types / count.clamp_min(1.0)], dim=1) * known


class Stage2Loss(nn.Module):
    """Binary cross-entropy over LABELS with the RSNA weights (``any`` x2), the challenge metric's form.

    ``subtype_ce`` > 0 adds, on the slices that bleed, a softmax cross-entropy over the five subtype
    logits whose target shares 1 equally among the slice's types, times ``subtype_ce`` and averaged
    over N as the rest. The sigmoids alone learn "blood or not" first, since most of each subtype's
    negatives are slices without blood; the softmax term makes the subtypes compete on the slices that
    bleed, as stage 1's softmax does, and leaves the binary terms (and so calibration) in charge of the
    levels. A slice with an unknown label takes no part in it.

    ``subtype_rank`` > 0 adds ``subtype_rank_loss`` times it: per subtype, the batch's slices that bleed
    with that type ranked above those that bleed without it. Unlike the softmax it is multi-label: a
    slice with epidural and subdural blood asks both outputs to be high, not to be equal.
    """

    def __init__(self, label_weights: tuple[float, ...] = LABEL_WEIGHTS, subtype_ce: float = 0.0,
                 subtype_rank: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("label_weights", torch.tensor(label_weights, dtype=torch.float32))
        self.subtype_ce = float(subtype_ce)
        self.subtype_rank = float(subtype_rank)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        known = torch.isfinite(target)
        target0 = torch.where(known, target, torch.zeros_like(target))
        per_element = F.binary_cross_entropy_with_logits(logits, target0, reduction="none")
        weights = self.label_weights.to(per_element.device) * known
        loss = (per_element * weights).sum(dim=1).div(self.label_weights.sum()).mean()
        if self.subtype_ce > 0:
            # Stage 1's shared target without its none column: all zeros on slices without blood.
            share = shared_stage1_targets(target)[:, 1:]
            ce = -(share * F.log_softmax(logits[:, :-1], dim=1)).sum(dim=1)
            loss = loss + self.subtype_ce * ce.sum() / max(int(target.shape[0]), 1)
        if self.subtype_rank > 0:
            loss = loss + self.subtype_rank * subtype_rank_loss(logits, target)
        return loss


def subtype_rank_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic (RankNet) loss of each subtype among the slices that bleed: for subtype k,
    the mean of softplus(z_j - z_i) over pairs of a slice i with k and a slice j with blood but not k,
    then the mean over the subtypes that have such a pair in the batch (0 when none has). A smooth
    surrogate of 1 - AUC among bleed slices (``auc_given_any``); every subtype weighs the same however
    rare, and a shift of all of a subtype's logits leaves it unchanged, so levels stay the BCE's.
    Slices whose ``any`` or subtype label is unknown take no part."""
    z, target = logits.float()[:, :-1], target.float()
    bleed = (target[:, -1:] == 1)  # an unknown (NaN) label compares unequal to 0 and to 1: in no pair
    has = bleed & (target[:, :-1] == 1)  # (N, 5)
    lacks = bleed & (target[:, :-1] == 0)
    # All subtypes at once, with masks rather than a loop of boolean indexing: no host sync per subtype
    # on a GPU. [i, j, k]: slice i with subtype k against slice j that bleeds without it.
    pairs = has[:, None, :] & lacks[None, :, :]
    per_pair = F.softplus(z[None, :, :] - z[:, None, :]) * pairs
    count = pairs.sum(dim=(0, 1))
    present = count > 0
    per_subtype = per_pair.sum(dim=(0, 1)) / count.clamp_min(1)
    return (per_subtype * present).sum() / present.sum().clamp_min(1)


def class_weights_for(config: TrainConfig, stage1_classes: np.ndarray) -> torch.Tensor | None:
    """Stage-1 class weights from the config: None, ``balanced`` (N / (K x count)) or six numbers.
    ``stage1_classes``: (N,) class indices (-1, several subtypes, not counted) or (N, 6) labels, where a
    slice with k subtypes counts 1/k towards each."""
    if config.stage != 1 or config.class_weights == "none":
        return None
    if config.class_weights == "balanced":
        classes = np.asarray(stage1_classes)
        if classes.ndim == 2:  # six labels (stage1_multi: share): each slice's target mass per class
            counts = shared_stage1_targets(torch.from_numpy(classes.astype(np.float64))).sum(dim=0).numpy()
        else:
            counts = np.bincount(classes[classes >= 0], minlength=len(STAGE1_CLASSES)).astype(np.float64)
        # A class absent from training gets weight 1: it cannot contribute a loss anyway.
        weights = np.where(counts > 0, counts.sum() / (len(STAGE1_CLASSES) * np.maximum(counts, 1)), 1.0)
        return torch.tensor(weights, dtype=torch.float32)
    return torch.tensor([float(w) for w in config.class_weights], dtype=torch.float32)


def make_loss(config: TrainConfig, stage1_classes: np.ndarray | None = None) -> nn.Module:
    if config.stage == 1:
        weights = class_weights_for(config, stage1_classes if stage1_classes is not None else np.zeros(0, int))
        return Stage1Loss(weights, smoothing=config.label_smoothing)
    weights = LABEL_WEIGHTS if config.label_weights is None else tuple(float(w) for w in config.label_weights)
    return Stage2Loss(weights, subtype_ce=config.subtype_ce_weight, subtype_rank=config.subtype_rank_weight)


# ------------------------------------------------------------------------------ optimizer, schedule
def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over the trainable parameters, in groups: STN localisation net at ``lr x stn_lr_scale``,
    backbone and head at ``lr``; biases and normalisation weights (1-D) without weight decay. AdamW is
    torch's fused kernel unless ``fused_optimizer`` is off; a checkpoint's groups bring their own setting
    back on resume, so a run continues with the implementation it started with."""
    net = unwrap(model)
    groups: list[dict] = []
    for part, params in net.parameter_groups().items():
        lr = config.lr * (config.stn_lr_scale if part == "stn" else 1.0)
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": config.weight_decay, "name": f"{part}"})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}_no_decay"})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    # One fused kernel over all parameters instead of a dozen passes: on a 2-core CPU torch's default
    # (one parameter at a time) took about twice as long (docs/benchmarks.md). torch checks the
    # parameters only at the first step, so the devices the trainer uses are checked here.
    fused = config.fused_optimizer and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for group in groups for p in group["params"]
    )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


@dataclass(frozen=True)
class LrSchedule:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine, step or constant.

    A callable object (not a closure) so LambdaLR can rebuild it from the config on resume.
    """

    total_steps: int
    warmup_steps: int
    kind: str
    steps_per_epoch: int
    step_epochs: int
    step_gamma: float
    min_ratio: float
    hold_steps: int = 0  # multiplier 0 before this step (the trunk while a new head warms up)

    def __call__(self, step: int) -> float:
        if step < self.hold_steps:
            return 0.0
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "step":
            return self.step_gamma ** ((step // max(self.steps_per_epoch, 1)) // self.step_epochs)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


TRUNK_GROUPS = ("stn", "backbone")  # parameter groups held still by head_warmup_epochs


def group_part(group: dict) -> str:
    """The model part (``parameter_groups`` key) of an optimizer group made by ``make_optimizer``."""
    return str(group.get("name", "")).removesuffix("_no_decay")


def hold_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps that ``head_warmup_epochs`` holds the trunk: the scheduler's zero-rate span and
    ``TrunkHold``'s no-gradient span, one number so the two always agree."""
    return int(round(config.head_warmup_epochs * max(int(steps_per_epoch), 1)))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR for ``config.epochs`` epochs of ``steps_per_epoch`` optimizer steps.

    With ``head_warmup_epochs`` the STN and backbone groups stay at learning rate 0 for that long, then
    follow the same schedule as the head: the new layers first learn on the stage-1 features, so their
    random start does not send large gradients back into a trained trunk (linear probing then
    fine-tuning, Kumar et al. 2022)."""
    steps_per_epoch = max(int(steps_per_epoch), 1)
    schedule = LrSchedule(
        total_steps=steps_per_epoch * config.epochs,
        warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
        kind=config.schedule,
        steps_per_epoch=steps_per_epoch,
        step_epochs=config.step_epochs,
        step_gamma=config.step_gamma,
        min_ratio=config.min_lr_ratio,
    )
    hold = hold_steps(config, steps_per_epoch)
    if not hold:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    trunk = replace(schedule, hold_steps=hold)
    per_group = [trunk if group_part(g) in TRUNK_GROUPS else schedule for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, per_group)


@dataclass
class TrunkHold:
    """The STN and backbone parameters that ``head_warmup_epochs`` holds still for the first ``steps``
    optimizer steps. While held they compute no gradient (``requires_grad`` off), so backward stops at
    the new layers (a held VGG16-BN step skips the trunk's backward, most of a step's work), gradient
    clipping measures the layers that learn, and AdamW keeps no moments for the trunk until it trains.
    The scheduler holds the same groups at learning rate 0, which the log reports."""

    params: list[nn.Parameter]
    steps: int

    @classmethod
    def of(cls, net: nn.Module, config: TrainConfig, steps_per_epoch: int) -> TrunkHold | None:
        """The hold of ``config`` over ``net``'s trainable trunk parameters; None without one. A trunk
        frozen by policy (``freeze_trunk``) is not trainable and stays frozen after the hold."""
        steps = hold_steps(config, steps_per_epoch)
        groups = unwrap(net).parameter_groups()
        params = [p for part in TRUNK_GROUPS for p in groups[part] if p.requires_grad]
        return cls(params, steps) if steps and params else None

    def update(self, step: int) -> None:
        """Set the trunk for optimizer step ``step`` (0-based, the scheduler's count): held before
        ``steps``, trainable from then on (so a resumed run picks up where it was)."""
        train = step >= self.steps
        for p in self.params:
            if p.requires_grad != train:
                p.requires_grad_(train)


# ------------------------------------------------------------------------------------ loop settings
@dataclass
class LoopSettings:
    """What one epoch needs beyond model, loader and optimizer."""

    stage: int
    device: torch.device
    env: DistEnv = field(default_factory=DistEnv)
    grad_clip: float | None = None
    aux_loss_weight: float = 0.4
    amp: bool = False  # autocast: float16/bfloat16 on CUDA, bfloat16 on CPU
    channels_last: bool = False
    freeze_bn: bool = False
    max_steps: int | None = None
    progress: bool = True
    read_every: int | None = None  # steps between host reads of loss and NaN flag; None: 1 on CPU, CUDA_READ_EVERY on CUDA
    fp32_head: bool = False  # evaluation runs the head outside autocast (float32 logits); set on CUDA with AMP

    @classmethod
    def from_config(cls, config: TrainConfig, device: torch.device, env: DistEnv) -> LoopSettings:
        from hemorrhage_core.machine import cpu_has_native_bf16

        cuda = device.type == "cuda"
        # On CPU, bf16 only where the hardware has it: emulated bf16 is slower than float32.
        cpu_bf16 = device.type == "cpu" and config.cpu_bf16 and cpu_has_native_bf16()
        return cls(
            stage=config.stage,
            device=device,
            env=env,
            grad_clip=config.grad_clip,
            aux_loss_weight=config.aux_loss_weight,
            amp=(config.amp and cuda) or cpu_bf16,
            channels_last=(config.channels_last and cuda) or cpu_bf16,
            freeze_bn=config.freeze_bn,
            max_steps=config.max_steps_per_epoch,
            progress=config.progress,
            fp32_head=config.amp and cuda,
        )

    @property
    def amp_dtype(self) -> torch.dtype:
        if self.device.type != "cuda":
            return torch.bfloat16
        # Emulated bf16 (pre-Ampere cards) is slow: those take float16 with a GradScaler instead.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16

    @property
    def sync_every(self) -> int:
        """Steps between host reads of the summed loss (each read is a device synchronisation)."""
        if self.read_every is not None:
            return max(int(self.read_every), 1)
        return CUDA_READ_EVERY if self.device.type == "cuda" else 1

    @property
    def precision(self) -> str:
        """What the forward computes in, for run.json: ``float32`` or ``bfloat16 autocast`` (etc.)."""
        return f"{str(self.amp_dtype).removeprefix('torch.')} autocast" if self.amp else "float32"

    def autocast(self):
        # The losses cast logits to float32 themselves: only the network runs in the low precision.
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def make_grad_scaler(settings: LoopSettings) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 autocast on CUDA (bfloat16 needs none)."""
    if settings.amp and settings.amp_dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def set_batchnorm_eval(model: nn.Module) -> None:
    """Put every batch-norm layer in eval mode: running statistics stay fixed, affine weights still learn."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, loader: Iterable, settings: LoopSettings, max_images: int) -> int:
    """Precise BN: replace the running statistics of the trainable batch-norm layers by their plain
    average over up to ``max_images`` training images, with the weights fixed.

    The exponential running averages of small CPU batches (momentum 0.1, batch 10) follow the weights
    of the last few dozen steps, so evaluating with them makes validation AUC jump between epochs even
    at a tiny learning rate. Under torchrun the ranks' averages are averaged. Returns the images seen.
    """
    net = unwrap(model)
    net.train()  # frozen trunks and freeze_bn keep their layers in eval: those are left alone
    if settings.freeze_bn:
        set_batchnorm_eval(net)
    layers = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    if not layers or max_images <= 0:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    seen = 0
    try:
        for batch in loader:
            if batch is None:
                continue
            with settings.autocast():
                net(settings.to_device(batch[0]))
            seen += int(batch[0].shape[0])
            if seen >= max_images:
                break
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
    if settings.env.enabled:
        import torch.distributed as dist

        for m in layers:
            for buffer in (m.running_mean, m.running_var):
                dist.all_reduce(buffer)
                buffer.div_(settings.env.world_size)
    return seen


def steps_in(loader: Iterable, settings: LoopSettings) -> int:
    n = len(loader)  # type: ignore[arg-type]
    return min(n, settings.max_steps) if settings.max_steps else n


# ------------------------------------------------------------------------------------------ epoch
@dataclass(frozen=True)
class EpochResult:
    loss: float  # mean training loss over the epoch's steps (averaged over ranks)
    images: int  # images seen by this rank
    steps: int
    seconds: float
    lr: float  # learning rate of the backbone/head at the end of the epoch


def _progress(iterable: Iterable, total: int, desc: str, settings: LoopSettings):
    from tqdm.auto import tqdm

    # At most two refreshes a second: a terminal write per step costs more than a small GPU step.
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, mininterval=0.5,
                disable=not settings.progress or not settings.env.is_main, dynamic_ncols=True)


def may_leave_parameters_unused(net: nn.Module, settings: LoopSettings, *, holds_trunk: bool = False) -> bool:
    """True when a training step can leave a trainable parameter without a gradient, which DDP must
    then be told (``find_unused_parameters``): Inception's auxiliary head when its loss weight is 0, and
    the trunk while a ``TrunkHold`` holds it (``holds_trunk``). Frozen parameters do not count (DDP
    skips them)."""
    if holds_trunk:
        return True
    aux = getattr(unwrap(net), "aux_head", None)
    return aux is not None and settings.aux_loss_weight <= 0 and any(p.requires_grad for p in aux.parameters())


def read_loss_sum(loss_sum: torch.Tensor, settings: LoopSettings, *, epoch: int, first: int, last: int) -> float:
    """The host value of the loss summed on the device (a synchronisation); NonFiniteLossError when it
    is NaN/Inf on any rank, naming the steps ``first``..``last`` since the previous read."""
    value = float(loss_sum)
    if not all_true(math.isfinite(value), settings.env):
        where = f"step {last}" if first == last else f"steps {first}-{last}"
        what = value if not math.isfinite(value) else "non-finite on another rank"
        raise NonFiniteLossError(f"training loss became {what} at epoch {epoch}, {where}")
    return value


def main_lr(optimizer: torch.optim.Optimizer) -> float:
    """Learning rate of the added layers (what the log and metrics.csv report), else of the first
    non-STN group. The head follows the schedule throughout: while ``head_warmup_epochs`` holds the
    trunk at 0 the log shows the rate that is training, and otherwise backbone and head share it."""
    rank = {"backbone": 1, "stn": 2}  # min() keeps the first group of the best rank
    return float(min(optimizer.param_groups, key=lambda g: rank.get(group_part(g), 0))["lr"])


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: nn.Module,
    settings: LoopSettings,
    *,
    epoch: int,
    scaler: torch.amp.GradScaler | None = None,
    desc: str | None = None,
    hold: TrunkHold | None = None,
) -> EpochResult:
    """One pass over ``loader`` with ``model`` a TrainView (or DDP around one): forward, loss (+ Inception aux loss), backward, clip, step, schedule.

    The loss is summed on the device (float64) and read on the host every ``settings.sync_every`` steps
    and at the epoch end, never in between, so a GPU step does not wait for the host. A read that finds
    it NaN/Inf on any rank raises NonFiniteLossError before that step's optimizer step: on CPU (a read
    every step) the weights and optimizer state stay those of the last good step; on CUDA the steps
    since the previous read may have moved them, and the run keeps the last epoch's checkpoint.
    ``hold`` (``TrunkHold``) sets the trunk trainable or not before each step, by the scheduler's count.
    """
    if hold is not None and scheduler is None:
        raise ValueError("a TrunkHold counts the scheduler's steps: pass the scheduler too")
    model.train()
    if settings.freeze_bn:
        set_batchnorm_eval(model)
    total = steps_in(loader, settings)
    every = settings.sync_every
    started = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=settings.device)
    steps, images, read_at, mean = 0, 0, 0, float("nan")
    bar = _progress(loader, total, desc or f"epoch {epoch} train", settings)
    try:
        for batch in bar:
            if steps >= total:
                break
            if batch is None:  # every slice of the batch failed to decode
                continue
            inputs, target, _ids = batch
            if hold is not None:
                hold.update(scheduler.last_epoch)  # type: ignore[union-attr]  # checked above
            inputs = settings.to_device(inputs)
            target = target.to(settings.device, non_blocking=True)
            with settings.autocast():
                out = model(inputs)
                loss = loss_fn(out.logits, target)
                if out.aux_logits is not None and settings.aux_loss_weight > 0:
                    loss = loss + settings.aux_loss_weight * loss_fn(out.aux_logits, target)
            loss_sum += loss.detach()  # float64: the same sum the host made of float(loss) before
            steps += 1
            images += int(inputs.shape[0])
            if steps % every == 0:  # before this step's update, so a NaN read here is never applied
                mean = read_loss_sum(loss_sum, settings, epoch=epoch, first=read_at + 1, last=steps) / steps
                read_at = steps
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}", refresh=False)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
        if steps and read_at < steps:  # the epoch end reads what the last steps added
            mean = read_loss_sum(loss_sum, settings, epoch=epoch, first=read_at + 1, last=steps) / steps
    finally:
        bar.close()
    mean_loss = all_mean(mean if steps else float("nan"), settings.env)
    return EpochResult(mean_loss, images, steps, time.perf_counter() - started, main_lr(optimizer))


class TrainView(nn.Module):
    """The training forward: ``forward`` returns the model's ``forward_extras`` (logits, aux logits,
    theta, aligned). DDP hooks gradients in ``forward`` only, so this view is what it wraps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor):
        return self.net.forward_extras(inputs)


# ------------------------------------------------------------------------------------- evaluation
def eval_logits(net: nn.Module, inputs: torch.Tensor, settings: LoopSettings) -> torch.Tensor:
    """Eval forward of a batch; with ``settings.fp32_head`` the trunk runs under autocast and the head
    in float32, so probabilities are not rounded to bf16's 8 bits (which ties AUC ranks)."""
    x = settings.to_device(inputs)
    if settings.fp32_head and hasattr(net, "forward_features") and hasattr(net, "forward_head"):
        with settings.autocast():
            features = net.forward_features(x)
        return net.forward_head(features.float())
    with settings.autocast():
        return net(x)


@torch.inference_mode()
def predict_loader(
    model: nn.Module, loader: Iterable, settings: LoopSettings, *, desc: str = "evaluate"
) -> dict[str, np.ndarray]:
    """Eval-mode forward (inference mode) over ``loader`` (items ``(image, six labels, image_id)``);
    returns this rank's ``image_ids``, ``logits``, ``probs`` (LABELS order) and ``targets`` as arrays,
    rows in loader order."""
    from hemorrhage_core.models import probabilities

    net = unwrap(model)
    net.eval()  # batch norm on running statistics, dropout off
    logits_parts, target_parts, ids = [], [], []
    bar = _progress(loader, len(loader), desc, settings)  # type: ignore[arg-type]
    for batch in bar:
        if batch is None:
            continue
        inputs, target, batch_ids = batch
        logits = eval_logits(net, inputs, settings)
        logits_parts.append(logits.float())  # kept on the device: one copy to the host at the end
        target_parts.append(target.float().reshape(len(target), -1))
        ids.extend(str(i) for i in batch_ids)
    bar.close()
    logits = torch.cat(logits_parts).cpu() if logits_parts else torch.zeros(0, len(LABELS))
    targets = torch.cat(target_parts) if target_parts else torch.zeros(0, len(LABELS))
    probs = probabilities(settings.stage, logits)
    return {
        "image_ids": np.asarray(ids, dtype=object),
        "logits": logits.numpy().astype(np.float64),
        "probs": probs.numpy().astype(np.float64),
        "targets": targets.numpy().astype(np.float64),
    }


def evaluation_loss(stage: int, logits: np.ndarray, targets: np.ndarray, loss_fn: nn.Module) -> float | None:
    """The training loss on gathered predictions; stage 1 scores single-class images only."""
    if not len(logits):
        return None
    t = torch.from_numpy(targets)
    if stage == 1:
        classes = torch.from_numpy(stage1_targets(np.nan_to_num(targets).astype(np.int64)))
        keep = classes >= 0
        if not bool(keep.any()):
            return None
        return float(loss_fn(torch.from_numpy(logits)[keep].float(), classes[keep]))
    return float(loss_fn(torch.from_numpy(logits).float(), t))


def order_gathered(gathered: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of arrays gathered from several ranks, sorted back into dataset order by ``positions``."""
    order = np.argsort(gathered["positions"], kind="stable")
    return {key: value[order] for key, value in gathered.items()}


@dataclass
class EvalResult:
    """Validation predictions of every rank in dataset order, and the ``val_*`` metrics of them."""

    predictions: dict[str, np.ndarray]  # positions, image_ids, logits, probs, targets
    metrics: dict[str, float | None]  # val_loss and hemorrhage_core.metrics.validation_metrics' columns
    seconds: float


def evaluate(
    model: nn.Module,
    loader: Iterable,
    settings: LoopSettings,
    loss_fn: nn.Module,
    *,
    position_of: dict[str, int],
    series_ids: np.ndarray | None = None,
    z: np.ndarray | None = None,
    desc: str = "validate",
) -> EvalResult:
    """Eval-mode predictions on this rank's shard, gathered from all ranks, then the validation metrics.

    ``position_of`` maps image id -> dataset position (the gathered rows are put back in that order);
    ``series_ids`` and ``z`` (dataset order) add the z-smoothed metrics. Stage 1 is scored over the six
    labels (subtype p = p(class), any = 1 - p(none)) with accuracy over STAGE1_CLASSES.
    """
    from hemorrhage_core.metrics import validation_metrics

    started = time.perf_counter()
    mine = predict_loader(model, loader, settings, desc=desc)
    mine["positions"] = np.array([position_of[i] for i in mine["image_ids"]], dtype=np.int64)
    gathered = order_gathered(gather_rows(mine, settings.env))
    targets = gathered["targets"]
    labelled = np.isfinite(targets).all(axis=1) if len(targets) else np.zeros(0, dtype=bool)
    metrics: dict[str, float | None] = {
        "val_loss": evaluation_loss(settings.stage, gathered["logits"], targets, loss_fn)
    }
    if labelled.any():
        stage1_pred = None
        if settings.stage == 1:
            stage1_pred = torch.softmax(torch.from_numpy(gathered["logits"][labelled]), dim=1).numpy()
        zs = {}
        if series_ids is not None and z is not None:
            where = gathered["positions"][labelled]
            zs = {"series_ids": np.asarray(series_ids)[where], "z": np.asarray(z, dtype=np.float64)[where]}
        metrics.update(validation_metrics(targets[labelled].astype(np.int64), gathered["probs"][labelled],
                                          stage1_pred=stage1_pred, **zs))
    return EvalResult(gathered, metrics, time.perf_counter() - started)


def selection_value(row: dict[str, float | None], metric: str) -> float | None:
    """The model-selection value of a metrics row (``val_auc_mean`` or ``val_weighted_log_loss``)."""
    value = row.get(f"val_{metric}")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def improved(value: float | None, best: float | None, maximize: bool) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value > best if maximize else value < best
