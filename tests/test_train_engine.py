"""The loop's parts: losses against the metric, the schedule, parameter groups, batch norm handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from hemorrhage_core import metrics
from hemorrhage_core.labels import STAGE1_CLASSES
from hemorrhage_core.models import ModelSpec, build_model
from training.config import ConfigError, TrainConfig
from training.engine import (
    LoopSettings,
    LrSchedule,
    NonFiniteLossError,
    Stage1Loss,
    Stage2Loss,
    TrainView,
    TrunkHold,
    class_weights_for,
    group_part,
    improved,
    main_lr,
    make_loss,
    make_optimizer,
    make_scheduler,
    predict_loader,
    set_batchnorm_eval,
    subtype_rank_loss,
    train_one_epoch,
)


def test_stage2_loss_is_the_rsna_weighted_log_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 6, generator=gen) * 3
    target = (torch.rand(32, 6, generator=gen) > 0.6).float()
    ours = float(Stage2Loss()(logits, target))
    reference = metrics.weighted_log_loss(target.numpy().astype(int), torch.sigmoid(logits).double().numpy())
    assert ours == pytest.approx(reference, rel=1e-5)


def test_stage2_subtype_cross_entropy_scores_the_bleed_slices_against_their_types():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 6, generator=gen) * 2
    target = torch.tensor([
        [0, 0, 0, 0, 0, 0],  # no blood: no softmax term
        [1, 0, 0, 0, 0, 1],  # epidural
        [0, 1, 0, 1, 0, 1],  # two types share the target
        [0, 0, 0, 0, 1, 1],  # subdural
        [0, 0, 1, 0, 0, 1.0],
    ])
    target_unknown = target.clone()
    target_unknown[4, 0] = float("nan")  # an unknown label leaves its slice out of the softmax term
    log_p = torch.log_softmax(logits[:, :5], dim=1)
    hand = [-log_p[1, 0], -(log_p[2, 1] + log_p[2, 3]) / 2, -log_p[3, 4], -log_p[4, 2]]
    for tgt, terms in ((target, hand), (target_unknown, hand[:3])):
        plain = float(Stage2Loss()(logits, tgt))
        with_ce = float(Stage2Loss(subtype_ce=0.5)(logits, tgt))
        assert with_ce - plain == pytest.approx(0.5 * float(sum(terms)) / 5, rel=1e-5)
    # The term depends on the subtype logits' differences only: the levels stay with the sigmoids.
    shifted = logits.clone()
    shifted[:, :5] += 3.0
    extra = Stage2Loss(subtype_ce=1.0)
    assert float(extra(shifted, target)) - float(Stage2Loss()(shifted, target)) == pytest.approx(
        float(extra(logits, target)) - float(Stage2Loss()(logits, target)), rel=1e-5)


def test_subtype_rank_loss_ranks_each_subtype_among_the_bleed_slices_by_hand():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 6, generator=gen) * 2
    target = torch.tensor([
        [0, 0, 0, 0, 0, 0],  # no blood: in no pair
        [1, 0, 0, 0, 1, 1],  # epidural and subdural
        [0, 0, 0, 0, 1, 1],  # subdural
        [0, 1, 0, 0, 0, 1],  # intraparenchymal
        [1, 0, 0, 0, 0, 1],  # epidural
        [0, 0, 0, 1, 0, float("nan")],  # any unknown: in no pair
        [float("nan"), 0, 1, 0, 0, 1],  # epidural unknown: in intraventricular's pairs, not in epidural's
    ])
    z = logits.double()
    pairs = {0: ([1, 4], [2, 3]), 1: ([3], [1, 2, 4, 6]), 2: ([6], [1, 2, 3, 4]),
             4: ([1, 2], [3, 4, 6])}  # SAH: no bleed slice with it
    hand = [np.mean([math.log1p(math.exp(float(z[j, k] - z[i, k]))) for i in has for j in lacks])
            for k, (has, lacks) in pairs.items()]
    assert float(subtype_rank_loss(logits, target)) == pytest.approx(float(np.mean(hand)), rel=1e-5)
    assert float(Stage2Loss(subtype_rank=0.5)(logits, target)) - float(Stage2Loss()(logits, target)) == pytest.approx(
        0.5 * float(np.mean(hand)), rel=1e-5)
    # Levels stay with the sigmoids: a shift of any subtype's logits changes nothing.
    shifted = logits.clone()
    shifted[:, 0] += 5.0
    shifted[:, 4] -= 2.0
    assert float(subtype_rank_loss(shifted, target)) == pytest.approx(float(subtype_rank_loss(logits, target)), rel=1e-6)


def test_subtype_rank_loss_is_multi_label_and_zero_without_pairs():
    # A slice with epidural and subdural blood: the term asks both of its outputs up, where the
    # softmax would ask them to be equal.
    logits = torch.zeros(3, 6, requires_grad=True)
    target = torch.tensor([[1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1.0]])
    subtype_rank_loss(logits, target).backward()
    assert logits.grad[0, 0] < 0 and logits.grad[0, 4] < 0  # descent raises both
    assert logits.grad[1, 0] > 0 and logits.grad[2, 4] > 0  # and lowers each on the slice without it
    # A batch without blood, or with one type only, has no pair: zero, and still differentiable.
    none = torch.zeros(4, 6, requires_grad=True)
    loss = subtype_rank_loss(none, torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1.0]] * 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(none.grad, torch.zeros(4, 6))
    # Perfectly ranked with a wide margin: close to 0.
    far = torch.tensor([[9.0, 0, 0, 0, -9, 0], [-9, 0, 0, 0, 9, 0]])
    assert float(subtype_rank_loss(far, torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1.0]]))) < 1e-7


def test_make_loss_takes_the_subtype_weight_for_stage2_only():
    assert make_loss(TrainConfig(stage=2, subtype_ce_weight=0.5)).subtype_ce == 0.5
    assert make_loss(TrainConfig(stage=2, subtype_rank_weight=0.5)).subtype_rank == 0.5
    with pytest.raises(ConfigError, match="subtype_rank_weight"):
        TrainConfig(subtype_rank_weight=float("nan"))
    assert isinstance(make_loss(TrainConfig(stage=1, subtype_ce_weight=0.5)), Stage1Loss)
    with pytest.raises(ConfigError, match="subtype_ce_weight"):
        TrainConfig(subtype_ce_weight=-1.0)


def test_stage2_label_weights_give_the_weighted_log_loss_with_those_weights():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(24, 6, generator=gen) * 2
    target = (torch.rand(24, 6, generator=gen) > 0.6).float()
    weights = (1.0, 1.0, 1.0, 2.0, 1.0, 2.0)  # subarachnoid counted twice, as the model card measured
    loss = make_loss(TrainConfig(stage=2, label_weights=list(weights)))
    reference = metrics.weighted_log_loss(target.numpy().astype(int), torch.sigmoid(logits).double().numpy(),
                                          weights=weights)
    assert float(loss(logits, target)) == pytest.approx(reference, rel=1e-5)
    assert make_loss(TrainConfig(stage=2)).label_weights.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 2.0]  # RSNA's
    for bad in ([1, 1, 1], [1, 1, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], "balanced", [1, 1, 1, 1, 1, float("nan")]):
        with pytest.raises(ConfigError, match="label_weights"):
            TrainConfig(stage=2, label_weights=bad)


def test_stage1_label_smoothing_spreads_a_share_of_each_target_over_the_classes():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, generator=gen)
    classes = torch.tensor([0, 2, 5, 1])
    labels = torch.zeros(4, 6)  # the same slices as six labels (stage1_multi: share)
    for row, cls in enumerate(classes.tolist()):
        if cls:
            labels[row, cls - 1] = 1.0
            labels[row, 5] = 1.0
    reference = float(F.cross_entropy(logits, classes, label_smoothing=0.1))
    loss = make_loss(TrainConfig(stage=1, label_smoothing=0.1))
    assert float(loss(logits, classes)) == pytest.approx(reference, rel=1e-5)
    assert float(loss(logits, labels)) == pytest.approx(reference, rel=1e-5)
    # By hand for a slice with two types: 0.9 of the target shared between them, 0.1 over all six.
    two = torch.tensor([[0, 1.0, 0, 1, 0, 1]])
    target = torch.full((6,), 0.1 / 6)
    target[[2, 4]] += 0.45
    assert float(loss(logits[:1], two)) == pytest.approx(float(-(target * torch.log_softmax(logits[0], 0)).sum()), rel=1e-5)
    # A slice without a target takes no part, smoothed or not; and 0 is the plain loss.
    unknown = torch.cat([labels[:1], torch.full((1, 6), float("nan"))])
    assert float(loss(logits[:2], unknown)) == pytest.approx(float(loss(logits[:1], labels[:1])) / 2, rel=1e-5)
    assert float(make_loss(TrainConfig(stage=1))(logits, classes)) == pytest.approx(float(F.cross_entropy(logits, classes)), rel=1e-5)
    for bad in (-0.1, 1.0, True):
        with pytest.raises(ConfigError, match="label_smoothing"):
            TrainConfig(label_smoothing=bad)


def test_stage1_loss_weights_samples_by_class_and_divides_by_n():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 6, generator=gen)
    target = torch.arange(12) % 6
    weights = torch.tensor([0.5, 1, 2, 3, 4, 5.0])
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    assert float(Stage1Loss(weights)(logits, target)) == pytest.approx(float((weights[target] * ce).mean()), rel=1e-6)
    # Without weights it is plain cross-entropy.
    assert float(Stage1Loss()(logits, target)) == pytest.approx(float(ce.mean()), rel=1e-6)


def test_stage1_loss_of_a_split_batch_is_the_mean_of_the_halves():
    # What DDP's gradient averaging assumes of a loss.
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 6, generator=gen)
    target = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    loss = Stage1Loss(torch.tensor([0.2, 1, 1, 3, 1, 1.0]))
    halves = (loss(logits[:4], target[:4]) + loss(logits[4:], target[4:])) / 2
    assert float(loss(logits, target)) == pytest.approx(float(halves), rel=1e-6)


def test_stage1_shared_targets_split_a_multi_type_slice_among_its_types():
    # stage1_multi: share. Labels in LABELS order (five subtypes, any); classes: none + the five.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 6, generator=gen)
    nan = float("nan")
    labels = torch.tensor([
        [0, 0, 0, 0, 0, 0],  # nothing: class none
        [0, 1, 0, 0, 0, 1],  # intraparenchymal only
        [1, 0, 0, 0, 1, 1],  # epidural and subdural: half each
        [nan] * 6,  # unlabeled: no part
        [0, 0, 0, 0, 0, 1],  # any without a subtype: no part
    ])
    weights = torch.tensor([0.5, 1, 2, 3, 4, 5.0])
    log_p = torch.log_softmax(logits, dim=1)
    terms = [-0.5 * log_p[0, 0], -2 * log_p[1, 2], -(1 + 5) / 2 * (log_p[2, 1] + log_p[2, 5]) / 2]
    assert float(Stage1Loss(weights)(logits, labels)) == pytest.approx(float(sum(terms) / 5), rel=1e-6)
    # A single-type slice scores exactly as its hard class index does.
    hard = torch.tensor([0, 2, -100, -100, -100])
    single = labels.clone()
    single[2:] = nan
    assert float(Stage1Loss(weights)(logits, single)) == pytest.approx(float(Stage1Loss(weights)(logits, hard)), rel=1e-6)


def test_balanced_class_weights_from_labels_count_each_slices_share():
    nan = float("nan")
    labels = np.array([[0, 0, 0, 0, 0, 0]] * 6 + [[1, 0, 0, 0, 0, 1]] * 2 + [[1, 0, 0, 0, 1, 1]] * 2 + [[nan] * 6])
    weights = class_weights_for(TrainConfig(class_weights="balanced"), labels).numpy()
    # class mass: none 6, epidural 2 + 2 x 0.5 = 3, subdural 2 x 0.5 = 1, of 10 labelled slices
    np.testing.assert_allclose(weights, [10 / (6 * 6), 10 / (6 * 3), 1, 1, 1, 10 / (6 * 1)])
    # Single-type slices only: the same weights as from their class indices.
    single = class_weights_for(TrainConfig(class_weights="balanced"), labels[:8]).numpy()
    np.testing.assert_allclose(single, class_weights_for(TrainConfig(class_weights="balanced"), np.array([0] * 6 + [1] * 2)).numpy())


def test_stage1_multi_is_drop_or_share():
    assert TrainConfig().stage1_multi == "drop"  # the original report
    with pytest.raises(ConfigError, match="stage1_multi"):
        TrainConfig(stage1_multi="keep")


def test_balanced_class_weights():
    classes = np.array([0] * 6 + [1] * 2 + [2] * 4 + [-1] * 3)  # -1: several subtypes, ignored
    weights = class_weights_for(TrainConfig(class_weights="balanced"), classes).numpy()
    n = 12
    assert weights[0] == pytest.approx(n / (6 * 6)) and weights[1] == pytest.approx(n / (6 * 2))
    assert weights[5] == 1.0  # absent class
    assert class_weights_for(TrainConfig(), classes) is None


def test_schedule_warms_up_then_follows_a_cosine_to_the_floor():
    s = LrSchedule(total_steps=100, warmup_steps=10, kind="cosine", steps_per_epoch=10, step_epochs=3, step_gamma=0.1, min_ratio=0.01)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert s(100) == pytest.approx(0.01)
    values = [s(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_step_schedule_decays_every_step_epochs():
    s = LrSchedule(total_steps=90, warmup_steps=0, kind="step", steps_per_epoch=10, step_epochs=3, step_gamma=0.1, min_ratio=0.0)
    assert s(0) == 1.0 and s(29) == 1.0 and s(30) == pytest.approx(0.1) and s(60) == pytest.approx(0.01)


def _tiny_model(backbone: str = "resnet18", stage: int = 1):
    torch.manual_seed(0)
    return build_model(ModelSpec(backbone, stage, input_size=32))


def test_stn_localisation_net_gets_its_own_smaller_learning_rate():
    net = _tiny_model()
    config = TrainConfig(lr=1e-3, stn_lr_scale=0.1, weight_decay=0.05)
    optimizer = make_optimizer(net, config)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    stn_ids = {id(p) for p in net.parameter_groups()["stn"]}
    assert {id(p) for g in optimizer.param_groups if g["name"].startswith("stn") for p in g["params"]} == stn_ids
    assert by_name["stn"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == pytest.approx(1e-3)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["head"]["weight_decay"] == 0.05
    # Every trainable parameter is optimised exactly once.
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters() if p.requires_grad)


def test_fused_adamw_makes_torchs_default_update_to_rounding():
    """The trainer's AdamW is torch's fused kernel on CPU; the same gradients give the same parameters
    (group learning rates, weight decay and no-decay groups included) as torch's default one."""
    nets = [_tiny_model(), _tiny_model()]
    config = TrainConfig(lr=1e-2, stn_lr_scale=0.1, weight_decay=0.05)
    fused = make_optimizer(nets[0], config)
    plain = make_optimizer(nets[1], config.replace(fused_optimizer=False))
    assert all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in nets[0].parameters()]
        for net, optimizer in zip(nets, (fused, plain), strict=True):
            for p, g in zip(net.parameters(), grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    moved = [(a - b).abs().max().item() for a, b in zip(nets[0].parameters(), _tiny_model().parameters(), strict=True)]
    assert max(moved) > 0.04  # five steps of lr 1e-2 moved the weights
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Parameters where torch has no fused kernel get its default one, not an error at the first step.
    assert not any(g["fused"] for g in make_optimizer(_tiny_model().to("meta"), config).param_groups)
    # A run resumed from a checkpoint of torch's default AdamW keeps it (the groups' settings load too).
    resumed = make_optimizer(_tiny_model(), config)
    resumed.load_state_dict(plain.state_dict())
    assert not any(g["fused"] for g in resumed.param_groups)


def test_scheduler_scales_every_group_from_its_own_base():
    net = _tiny_model()
    optimizer = make_optimizer(net, TrainConfig(lr=1e-3, stn_lr_scale=0.1, warmup_epochs=1.0))
    make_scheduler(optimizer, TrainConfig(lr=1e-3, warmup_epochs=1.0, epochs=2), steps_per_epoch=4)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(1e-3 / 4) and lrs["stn"] == pytest.approx(1e-4 / 4)


def _loader(n: int = 8, stage: int = 1, size: int = 32, batch: int = 4):
    gen = torch.Generator().manual_seed(3)
    images = torch.rand(n, 3, size, size, generator=gen)
    if stage == 1:
        target = torch.arange(n) % len(STAGE1_CLASSES)
    else:
        target = (torch.rand(n, 6, generator=gen) > 0.5).float()
    ids = [f"ID_{i:09x}" for i in range(n)]

    class WithIds(TensorDataset):
        def __getitem__(self, i):
            image, t = super().__getitem__(i)
            return image, t, ids[i]

    return DataLoader(WithIds(images, target), batch_size=batch)


def test_evaluation_runs_batch_norm_on_running_statistics():
    net = _tiny_model()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    settings = LoopSettings(stage=1, device=torch.device("cpu"), progress=False)
    loader = _loader(stage=2)
    first = predict_loader(net, loader, settings)
    second = predict_loader(net, _loader(stage=2, batch=3), settings)  # other batch composition
    np.testing.assert_allclose(first["probs"], second["probs"], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert first["probs"].shape == (8, 6) and np.all((first["probs"] >= 0) & (first["probs"] <= 1))


def test_freeze_bn_keeps_running_statistics_while_weights_learn():
    net = _tiny_model()
    set_batchnorm_eval(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    config = TrainConfig(lr=1e-2, warmup_epochs=0, freeze_bn=True)
    settings = LoopSettings(stage=1, device=torch.device("cpu"), freeze_bn=True, progress=False)
    optimizer = make_optimizer(net, config)
    train_one_epoch(TrainView(net), _loader(), optimizer, None, Stage1Loss(), settings, epoch=1)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if "running_" in k or "num_batches" in k)
    assert not torch.equal(before["head.layers.0.weight"], after["head.layers.0.weight"])


def test_non_finite_loss_stops_before_the_optimizer_step():
    net = _tiny_model(stage=2)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}

    class NanLoss(Stage2Loss):
        def forward(self, logits, target):
            return super().forward(logits, target) * float("nan")

    optimizer = make_optimizer(net, TrainConfig(stage=2))
    settings = LoopSettings(stage=2, device=torch.device("cpu"), progress=False)
    with pytest.raises(NonFiniteLossError, match="nan"):
        train_one_epoch(TrainView(net), _loader(stage=2), optimizer, None, NanLoss(), settings, epoch=1)
    assert all(torch.equal(v, dict(net.named_parameters())[k]) for k, v in before.items())
    assert not optimizer.state  # no step was taken


def test_inception_aux_loss_is_added_in_training():
    torch.manual_seed(0)
    net = build_model(ModelSpec("inception_v3", 1, input_size=75))
    seen = []

    class Recording(Stage1Loss):
        def forward(self, logits, target):
            seen.append(logits.shape)
            return super().forward(logits, target)

    optimizer = make_optimizer(net, TrainConfig())
    settings = LoopSettings(stage=1, device=torch.device("cpu"), aux_loss_weight=0.4, max_steps=1, progress=False)
    result = train_one_epoch(TrainView(net), _loader(size=75), optimizer, None, Recording(), settings, epoch=1)
    assert len(seen) == 2  # main and auxiliary logits
    assert result.steps == 1 and math.isfinite(result.loss)


def test_improvement_direction():
    assert improved(0.9, 0.8, maximize=True) and not improved(0.7, 0.8, maximize=True)
    assert improved(0.1, 0.2, maximize=False) and not improved(None, 0.2, maximize=False)
    assert improved(0.5, None, maximize=True)


def test_sgd_is_available_for_exact_gradient_comparisons():
    net = _tiny_model()
    optimizer = make_optimizer(net, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.5))
    assert isinstance(optimizer, torch.optim.SGD)
    assert {g["momentum"] for g in optimizer.param_groups} == {0.5}


def test_precise_bn_sets_running_statistics_to_the_average_over_training_batches():
    from training.engine import recompute_batchnorm

    torch.manual_seed(0)
    trained = torch.nn.BatchNorm2d(3)
    frozen = torch.nn.BatchNorm2d(3)
    net = torch.nn.Sequential(trained, frozen)
    for bn in (trained, frozen):
        bn.running_mean.fill_(5.0)
    frozen.eval()  # e.g. a frozen trunk's layer: must keep its statistics
    original_train = net.train

    def train(mode=True):  # what HemorrhageNet.train does for a frozen trunk
        original_train(mode)
        frozen.eval()
        return net

    net.train = train
    loader = _loader(n=12, stage=1, size=8, batch=4)
    seen = recompute_batchnorm(net, loader, LoopSettings(stage=1, device=torch.device("cpu"), progress=False), 8)
    assert seen == 8
    batches = [b[0] for b, _ in zip(loader, range(2), strict=False)]
    means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    variances = torch.stack([b.transpose(0, 1).reshape(3, -1).var(dim=1, unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(trained.running_mean, means)
    torch.testing.assert_close(trained.running_var, variances)
    assert trained.momentum == 0.1
    assert torch.equal(frozen.running_mean, torch.full((3,), 5.0))


def test_head_warmup_holds_the_trunk_still_then_trains_everything():
    net = _tiny_model(stage=2)
    config = TrainConfig(stage=2, lr=1e-3, epochs=3, warmup_epochs=0.0, head_warmup_epochs=1.0)
    optimizer = make_optimizer(net, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=2)
    settings = LoopSettings(stage=2, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 3, 32, 32, generator=gen), (torch.rand(8, 6, generator=gen) > 0.5).float(),
                         torch.arange(8))
    loader = DataLoader(data, batch_size=4)
    parts = net.parameter_groups()

    def snapshot():
        return {part: [p.detach().clone() for p in params] for part, params in parts.items()}

    def moved(before, part):
        return any(not torch.equal(a, p.detach()) for a, p in zip(before[part], parts[part], strict=True))

    trunk_lrs = [g["lr"] for g in optimizer.param_groups if g["name"].removesuffix("_no_decay") in ("stn", "backbone")]
    assert trunk_lrs and all(lr == 0.0 for lr in trunk_lrs)
    hold = TrunkHold.of(net, config, steps_per_epoch=2)
    assert hold is not None and hold.steps == 2
    assert {id(p) for p in hold.params} == {id(p) for p in parts["stn"] + parts["backbone"]}
    before = snapshot()
    train_one_epoch(TrainView(net), loader, optimizer, scheduler, Stage2Loss(), settings, epoch=1, hold=hold)
    assert not moved(before, "backbone") and not moved(before, "stn")  # held still for one epoch
    assert moved(before, "head")
    # Held, the trunk computed no gradient and AdamW keeps nothing for it.
    assert all(p.grad is None and p not in optimizer.state for p in hold.params)
    assert all(g["lr"] == pytest.approx(g["initial_lr"] * scheduler.lr_lambdas[0](2)) for g in optimizer.param_groups)
    before = snapshot()
    train_one_epoch(TrainView(net), loader, optimizer, scheduler, Stage2Loss(), settings, epoch=2, hold=hold)
    assert moved(before, "backbone")  # then trained like the rest, on the head's schedule
    assert all(p.requires_grad for p in hold.params)
    assert all(int(optimizer.state[p]["step"]) == 2 for p in hold.params)  # its moments start with its training


def test_a_held_trunk_gives_the_head_the_steps_of_a_trunk_frozen_by_hand():
    """During the hold the new layers take exactly the steps they take on a trunk that is not
    trainable at all: gradient clipping measures them alone (before, the held trunk's gradients counted
    in the norm and shrank theirs)."""
    config = TrainConfig(stage=2, lr=1e-2, epochs=3, warmup_epochs=0.0, head_warmup_epochs=1.0, grad_clip=0.05)
    settings = LoopSettings(stage=2, device=torch.device("cpu"), grad_clip=config.grad_clip)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.rand(8, 3, 32, 32, generator=gen), (torch.rand(8, 6, generator=gen) > 0.5).float(),
                         torch.arange(8))
    heads = []
    for by_hand in (False, True):
        net = _tiny_model(stage=2)
        trunk = [p for part in ("stn", "backbone") for p in net.parameter_groups()[part]]
        if by_hand:
            for p in trunk:
                p.requires_grad_(False)
        optimizer = make_optimizer(net, config)
        scheduler = make_scheduler(optimizer, config, steps_per_epoch=2)
        hold = None if by_hand else TrunkHold.of(net, config, steps_per_epoch=2)
        torch.manual_seed(0)
        train_one_epoch(TrainView(net), DataLoader(data, batch_size=4), optimizer, scheduler, Stage2Loss(), settings,
                        epoch=1, hold=hold)
        heads.append([p.detach().clone() for p in net.parameter_groups()["head"]])
    for held, frozen in zip(*heads, strict=True):
        torch.testing.assert_close(held, frozen, rtol=0, atol=1e-7)
    # Without a scheduler the hold cannot count steps: refused.
    with pytest.raises(ValueError, match="scheduler"):
        train_one_epoch(TrainView(net), DataLoader(data, batch_size=4), optimizer, None, Stage2Loss(), settings,
                        epoch=1, hold=TrunkHold(trunk, 2))
    # No hold configured, or nothing trainable to hold: none.
    assert TrunkHold.of(net, TrainConfig(stage=2, epochs=3), steps_per_epoch=2) is None
    assert TrunkHold.of(net, config, steps_per_epoch=2) is None  # the by-hand net's trunk is not trainable


def test_logged_lr_is_the_head_rate_while_the_trunk_is_held():
    net = _tiny_model(stage=2)
    held = TrainConfig(stage=2, lr=1e-3, epochs=3, warmup_epochs=0.0, head_warmup_epochs=2.0)
    optimizer = make_optimizer(net, held)
    make_scheduler(optimizer, held, steps_per_epoch=2)
    rates = {group_part(g): g["lr"] for g in optimizer.param_groups}
    assert rates["backbone"] == 0.0 and rates["head"] == pytest.approx(1e-3)
    assert main_lr(optimizer) == pytest.approx(1e-3)  # the rate that trains, not the held trunk's 0
    plain = TrainConfig(stage=2, lr=1e-3, epochs=3, warmup_epochs=0.0)
    optimizer = make_optimizer(net, plain)
    make_scheduler(optimizer, plain, steps_per_epoch=2)
    backbone = next(g["lr"] for g in optimizer.param_groups if group_part(g) == "backbone")
    assert main_lr(optimizer) == backbone == pytest.approx(1e-3)  # without a hold, what it always logged


def test_head_warmup_is_refused_in_stage1_and_as_long_as_the_run():
    with pytest.raises(ConfigError, match="head_warmup_epochs.*stage 2 only"):
        TrainConfig(stage=1, head_warmup_epochs=1.0)
    with pytest.raises(ConfigError, match="head_warmup_epochs.*shorter than the run"):
        TrainConfig(stage=2, epochs=2, head_warmup_epochs=2.0)
    with pytest.raises(ConfigError, match="head_warmup_epochs"):
        TrainConfig(stage=2, head_warmup_epochs=-1.0)
    # Without it every group follows one schedule.
    config = TrainConfig(stage=2, epochs=2)
    scheduler = make_scheduler(make_optimizer(_tiny_model(stage=2), config), config, steps_per_epoch=3)
    assert len({id(f) for f in scheduler.lr_lambdas}) == 1
