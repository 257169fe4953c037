"""What a training step asks of the host: the loss summed on the device and read every N steps (a read
is a GPU synchronisation), the NaN check at those reads, the CUDA precision choices, DDP's unused-
parameter search only where a parameter can go unused, and evaluation in inference mode with a
float32 head. CPU tests: what they show about CUDA is the settings and the number of reads."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hemorrhage_core.labels import STAGE1_CLASSES
from hemorrhage_core.models import ModelSpec, build_model
from training import engine
from training.config import TrainConfig
from training.distributed import DistEnv
from training.engine import (
    CUDA_READ_EVERY,
    LoopSettings,
    NonFiniteLossError,
    Stage1Loss,
    TrainView,
    eval_logits,
    make_optimizer,
    may_leave_parameters_unused,
    predict_loader,
    train_one_epoch,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _model(backbone: str = "mobilenet_v3_small", stage: int = 1, size: int = 32):
    torch.manual_seed(0)
    return build_model(ModelSpec(backbone, stage, input_size=size))


def _batches(n_batches: int, batch: int = 2, size: int = 32) -> DataLoader:
    gen = torch.Generator().manual_seed(5)
    n = n_batches * batch
    images = torch.rand(n, 3, size, size, generator=gen)
    targets = torch.arange(n) % len(STAGE1_CLASSES)

    class WithIds(TensorDataset):
        def __getitem__(self, i):
            image, t = super().__getitem__(i)
            return image, t, f"ID_{i:09x}"

    return DataLoader(WithIds(images, targets), batch_size=batch)


def _epoch(net, loader, settings, loss_fn=None):
    optimizer = make_optimizer(net, TrainConfig(lr=1e-3))
    return train_one_epoch(TrainView(net), loader, optimizer, None, loss_fn or Stage1Loss(), settings, epoch=1)


@pytest.fixture
def reads(monkeypatch) -> list[tuple[int, int]]:
    """Every host read of the summed loss, as (first, last) step since the previous read."""
    seen: list[tuple[int, int]] = []
    real = engine.read_loss_sum

    def spy(loss_sum, settings, *, epoch, first, last):
        seen.append((first, last))
        return real(loss_sum, settings, epoch=epoch, first=first, last=last)

    monkeypatch.setattr(engine, "read_loss_sum", spy)
    return seen


def test_every_step_is_read_on_cpu_and_every_n_on_cuda():
    assert LoopSettings(stage=1, device=CPU).sync_every == 1  # a read costs nothing without a device queue
    assert LoopSettings(stage=1, device=CUDA).sync_every == CUDA_READ_EVERY > 1
    assert LoopSettings(stage=1, device=CUDA, read_every=7).sync_every == 7


def test_the_loss_is_read_every_n_steps_and_at_the_epoch_end_with_the_same_result(reads):
    reference = _model()
    every_step = _epoch(reference, _batches(7), LoopSettings(stage=1, device=CPU, progress=False))
    assert reads == [(i, i) for i in range(1, 8)]
    reads.clear()
    net = _model()
    sparse = _epoch(net, _batches(7), LoopSettings(stage=1, device=CPU, progress=False, read_every=3))
    assert reads == [(1, 3), (4, 6), (7, 7)]  # two in the epoch, one at its end
    # When the loss is read changes nothing it computes: the same mean and weights, bit for bit.
    assert sparse.loss == every_step.loss and sparse.steps == every_step.steps == 7
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True))


class _NanFrom(Stage1Loss):
    """Stage-1 loss that becomes NaN from its ``step``-th call on, counting the calls."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = super().forward(logits, target)
        return loss * float("nan") if self.calls >= self.step else loss


def test_a_nan_stops_the_epoch_at_the_next_read(reads):
    loss_fn = _NanFrom(step=2)
    settings = LoopSettings(stage=1, device=CPU, progress=False, read_every=4)
    with pytest.raises(NonFiniteLossError, match="nan at epoch 1, steps 1-4"):
        _epoch(_model(), _batches(10), settings, loss_fn)
    assert loss_fn.calls == 4  # no step after the read that found it


def test_a_nan_in_the_last_steps_is_found_at_the_epoch_end(reads):
    loss_fn = _NanFrom(step=5)
    settings = LoopSettings(stage=1, device=CPU, progress=False, read_every=4)
    with pytest.raises(NonFiniteLossError, match="steps 5-6"):
        _epoch(_model(), _batches(6), settings, loss_fn)
    assert reads == [(1, 4), (5, 6)]


def test_a_nan_read_at_once_leaves_the_weights_alone():
    net = _model()
    before = copy.deepcopy(net.state_dict())
    settings = LoopSettings(stage=1, device=CPU, progress=False)  # CPU: a read every step
    with pytest.raises(NonFiniteLossError, match="step 3"):
        _epoch(net, _batches(6), settings, _NanFrom(step=3))
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # steps 1-2 trained
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_the_progress_bar_is_not_redrawn_by_every_step(monkeypatch):
    import tqdm.auto

    made = {}
    real = tqdm.auto.tqdm

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        made["mininterval"] = kwargs.get("mininterval")
        postfix = bar.set_postfix

        def set_postfix(*a, **k):
            made.setdefault("refresh", []).append(k.get("refresh", True))
            return postfix(*a, **k)

        bar.set_postfix = set_postfix
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    _epoch(_model(), _batches(4), LoopSettings(stage=1, device=CPU, read_every=2))
    assert made["mininterval"] >= 0.5  # at most two redraws a second
    assert made["refresh"] == [False, False]  # the loss shown waits for the next redraw; one per read


def test_cuda_takes_bf16_only_where_the_card_computes_it(monkeypatch):
    # Emulated bf16 (pre-Ampere) would pass a plain is_bf16_supported(): those cards take fp16 + GradScaler.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert LoopSettings(stage=1, device=CUDA, amp=True).amp_dtype == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert LoopSettings(stage=1, device=CUDA, amp=True).amp_dtype == torch.bfloat16


def test_evaluation_runs_the_head_in_float32_on_cuda_only():
    cuda = LoopSettings.from_config(TrainConfig(amp=True), CUDA, DistEnv())
    assert cuda.fp32_head and cuda.amp
    assert not LoopSettings.from_config(TrainConfig(amp=False), CUDA, DistEnv()).fp32_head
    # The CPU bf16 path keeps its numbers: its head runs in bf16 autocast as before.
    assert not LoopSettings.from_config(TrainConfig(cpu_bf16=True), CPU, DistEnv()).fp32_head


def test_a_float32_head_under_autocast_gives_float32_logits():
    net = _model().eval()
    x = torch.rand(4, 3, 32, 32)
    low = LoopSettings(stage=1, device=CPU, amp=True)  # bf16 autocast on the CPU stands in for CUDA's
    high = LoopSettings(stage=1, device=CPU, amp=True, fp32_head=True)
    with torch.inference_mode():
        rounded, precise = eval_logits(net, x, low), eval_logits(net, x, high)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = net.forward_features(x)
        expected = net.forward_head(features.float())
    assert rounded.dtype == torch.bfloat16 and precise.dtype == torch.float32
    assert torch.equal(precise, expected)
    assert not torch.equal(precise, rounded.float())
    # Without autocast the split changes nothing.
    plain = LoopSettings(stage=1, device=CPU, fp32_head=True)
    with torch.inference_mode():
        assert torch.equal(eval_logits(net, x, plain), net(x))


def test_validation_runs_in_inference_mode(monkeypatch):
    net = _model()
    modes = []
    real = type(net).forward

    def watching(self, x):
        modes.append(torch.is_inference_mode_enabled())
        return real(self, x)

    monkeypatch.setattr(type(net), "forward", watching)
    out = predict_loader(net, _batches(2), LoopSettings(stage=1, device=CPU, progress=False))
    assert modes == [True, True] and out["logits"].shape == (4, 6)


def test_ddp_searches_for_unused_parameters_only_where_a_step_can_leave_one():
    settings = LoopSettings(stage=1, device=CPU, aux_loss_weight=0.4)
    vgg = _model("vgg16")
    assert not may_leave_parameters_unused(vgg, settings)
    vgg.set_backbone_frozen(True)  # frozen parameters do not count: DDP skips them
    assert not may_leave_parameters_unused(vgg, settings)
    inception = _model("inception_v3", size=75)
    assert not may_leave_parameters_unused(inception, settings)  # its aux head feeds the loss
    no_aux = LoopSettings(stage=1, device=CPU, aux_loss_weight=0.0)
    assert may_leave_parameters_unused(inception, no_aux)  # the aux head computes, nothing uses it
    inception.set_backbone_frozen(True)
    assert may_leave_parameters_unused(TrainView(inception), no_aux)  # its new aux output layer still learns
