"""The benchmark scripts (benchmarks/): what they build and measure, their refusals without CUDA, and
the CUDA settings as far as a CPU can check them. Tiny sizes: they check the scripts, not speeds."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from training.config import PipelinePreset

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """A benchmark script as a module, leaving this process's environment as it was (bench_data pins
    BLAS threads through environment variables at import)."""
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


@pytest.fixture(scope="module")
def bench_train() -> ModuleType:
    return load("bench_train")


# ------------------------------------------------------------------------------------ bench_train
def test_plan_takes_sizes_and_settings_from_the_presets(bench_train):
    quick, full = PipelinePreset.load("quick"), PipelinePreset.load("full")
    cases = bench_train.plan(["vgg16", "inception_v3"], "both")
    got = {(c.backbone, c.size, c.preset): c for c in cases}
    small, large = sorted({quick.config(p, "stage1").input_size for p in ("phase1", "phase2")})
    assert small < large  # phase 1's size, then phase 2's
    assert set(got) == {
        ("vgg16", small, "quick"),
        ("vgg16", large, "quick"),
        ("inception_v3", small, "quick"),
        ("inception_v3", large, "quick"),
        ("vgg16", 224, "full"),
        ("inception_v3", 299, "full"),
    }
    for case in cases:
        preset = quick if case.preset == "quick" else full
        reference = preset.config(case.phase, "stage1")
        assert case.config.batch_size == 10 == reference.batch_size
        assert (case.config.lr, case.config.amp, case.config.channels_last, case.config.grad_clip) == (
            reference.lr,
            reference.amp,
            reference.channels_last,
            reference.grad_clip,
        )
        assert case.config.weights == "none"
        # The trunk is frozen exactly when the preset's weights (imagenet in full, none in quick) freeze it.
        assert case.config.freeze_trunk is (reference.weights != "none")
    assert bench_train.plan(["vgg16"], "full", trunk="trainable")[0].config.freeze_trunk is False


def test_refuses_a_size_below_the_backbones_minimum(bench_train, capsys):
    assert bench_train.main(["--backbones", "inception_v3", "--px", "32"]) == 2
    assert "at least 75 px" in capsys.readouterr().err


def test_cuda_settings_are_the_trainers_amp_and_channels_last(bench_train, monkeypatch):
    config = bench_train.plan(["vgg16"], "full")[0].config
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    settings, scaler = bench_train.cuda_settings(config)
    assert settings.amp and settings.channels_last
    assert settings.amp_dtype == torch.bfloat16 and scaler is None  # bf16 needs no loss scaling
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler warns that this machine has no CUDA
        settings, scaler = bench_train.cuda_settings(config)
    assert settings.amp_dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    off = bench_train.plan(["vgg16"], "full", overrides={"amp": False, "channels_last": False})[0].config
    settings, scaler = bench_train.cuda_settings(off)
    assert not settings.amp and not settings.channels_last and scaler is None


@pytest.mark.parametrize("trunk, low, high", [("trainable", 2.5, 3.0), ("frozen", 1.8, 2.2)])
def test_a_step_is_forward_plus_backward(bench_train, tmp_path, trunk, low, high, monkeypatch):
    """Counted FLOPs of a step over a forward: about 3x with every weight learning (input and weight
    gradients), about 2x with the trunk frozen (input gradients only, for the STN before it)."""
    # float32 on every CPU (the quick preset's cpu_bf16 follows the hardware): one expectation here.
    monkeypatch.setenv("HEMORRHAGE_CPU_BF16", "0")
    out = tmp_path / "train.json"
    argv = [
        "--backbones",
        "vgg16",
        "--px",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--trunk",
        trunk,
        "--json",
        str(out),
    ]
    assert bench_train.main(argv) == 0
    report = json.loads(out.read_text())
    (r,) = report["results"]
    assert (r["backbone"], r["px"], r["batch"], r["trunk"], r["amp"]) == ("vgg16", 32, 2, trunk, None)
    assert low <= r["train_gflop_per_step"] / r["forward_gflop_per_batch"] <= high
    for clock in ("wall", "cpu"):
        c, s = r[clock], r["seconds"]
        assert c["train_img_s"] == pytest.approx(2 / s["train"][clock])
        assert c["train_over_forward"] == pytest.approx(s["forward"][clock] / s["train"][clock])
        assert c["share"] == pytest.approx(c["train_gflop_s"] / c["matmul_gflop_s"])


def test_ratio_tables_time_both_variants_of_the_same_step(bench_train, tmp_path, capsys):
    """--cpu-bf16-ratio, --channels-last-ratio, --optimizer-ratio and --head-warmup-ratio: each variant's rate is the batch
    over its own median time, and the ratio is the second variant's rate over the first's."""
    out = tmp_path / "train.json"
    argv = ["--backbones", "resnet18", "--px", "32", "--steps", "1", "--warmup", "0", "--batch-size", "2",
            "--threads", "1", "--cpu-bf16-ratio", "--channels-last-ratio", "--optimizer-ratio", "--head-warmup-ratio",
            "--json", str(out)]
    assert bench_train.main(argv) == 0
    report = json.loads(out.read_text())
    pairs = {"cpu_precision": ("float32", "bf16"), "layout": ("nchw", "channels_last"), "optimizer": ("default", "fused"),
             "head_warmup": ("trained", "held")}
    for key, (a, b) in pairs.items():
        (r,) = report[key]
        assert (r["backbone"], r["px"]) == ("resnet18", 32)
        for clock in ("wall", "cpu"):
            c, s = r[clock], r["seconds"]
            assert c[f"{a}_img_s"] == pytest.approx(2 / s[a][clock])
            assert c[f"{b}_img_s"] == pytest.approx(2 / s[b][clock])
            assert c["ratio"] == pytest.approx(s[a][clock] / s[b][clock])
    printed = capsys.readouterr().out
    assert "fused / default" in printed and "held / trained" in printed and "channels_last / NCHW" in printed


def test_early_size_and_batch_tables_time_each_variant_at_its_own_pixels_and_images(bench_train, tmp_path, capsys):
    """--early-size-ratio: the same step with the STN resampling to fewer pixels (an early_input_size
    epoch); --batch-ratio: a step of another batch, each rate that batch's images over its own time."""
    out = tmp_path / "train.json"
    argv = ["--backbones", "resnet18", "--px", "40", "--steps", "1", "--warmup", "0", "--batch-size", "2",
            "--threads", "1", "--early-size-ratio", "32", "--batch-ratio", "4", "--json", str(out)]
    assert bench_train.main(argv) == 0
    report = json.loads(out.read_text())
    (early,) = report["early_size"]
    (batch,) = report["batch"]
    assert (early["px"], early["early_px"], batch["other_batch"]) == (40, 32, 4)
    for clock in ("wall", "cpu"):
        c, s = early[clock], early["seconds"]
        assert c["full_img_s"] == pytest.approx(2 / s["full"][clock])
        assert c["early_img_s"] == pytest.approx(2 / s["early"][clock])
        c, s = batch[clock], batch["seconds"]
        assert c["base_img_s"] == pytest.approx(2 / s["base"][clock])
        assert c["other_img_s"] == pytest.approx(4 / s["other"][clock])
        assert c["ratio"] == pytest.approx(c["other_img_s"] / c["base_img_s"])
    printed = capsys.readouterr().out
    assert "early / full" in printed and "batch 4 img/s" in printed


def test_early_size_step_resamples_to_the_early_pixels(bench_train):
    import torch

    from hemorrhage_core.models.backbones import Trunk
    from training.distributed import DistEnv
    from training.trainer import Runtime

    (case,) = bench_train.plan(["resnet18"], "quick", batch_size=2, threads=1, px=[40])
    runtime = Runtime(DistEnv(), torch.device("cpu"))
    steps = [bench_train._trainer_step(case.config.replace(epochs=2, **early), case, runtime)
             for early in ({}, {"early_input_size": 32, "early_epochs": 1})]
    seen: list[int] = []

    def trunk_input(module, args):
        if isinstance(module, Trunk):
            seen.append(args[0].shape[-1])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(trunk_input)
    try:
        for step in steps:
            step()
    finally:
        handle.remove()
    assert seen == [40, 32]


def test_cuda_timings_wait_for_the_gpu(bench_train, monkeypatch):
    """On CUDA every timed call ends with a synchronize, so its time includes the queued GPU work."""
    bench_inference = load("bench_inference")
    log: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(f"sync {device}"))
    cuda = torch.device("cuda", 0)
    bench_train.interleaved({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, 2, cuda)
    assert log == ["sync cuda:0", "a", "sync cuda:0", "sync cuda:0", "b", "sync cuda:0"] * 2
    log.clear()
    bench_inference.interleaved_medians({"a": lambda: log.append("a")}, repeats=2, warmup=1, device=cuda)
    assert log == ["a", "sync cuda:0"] * 3
    log.clear()
    bench_inference.interleaved_medians({"a": lambda: log.append("a")}, repeats=1, warmup=0)
    assert log == ["a"]  # no synchronisation on the CPU


def test_every_script_refuses_cuda_without_a_gpu(bench_train, capsys):
    assert not torch.cuda.is_available()  # conftest hides any GPU
    assert bench_train.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    for script in ("bench_data", "bench_inference"):
        assert load(script).main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err, script
    gpu = load("gpu_bench")
    assert gpu.main(["--out", "unused"]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bench_data
def test_loader_throughput_delivers_the_cached_slices(tmp_path):
    bench_data = load("bench_data")
    data = bench_data._make_data(tmp_path / "data", 4, 64)
    paths = sorted((data / "stage_2_train").glob("*.dcm"))[:4]
    d = bench_data.loader_throughput(paths, data, 32, tmp_path / "cache", workers=1, batch_size=2, slices=10)
    assert (d["slices"], d["workers"], d["pinned"]) == (10, 1, False)
    cycled = bench_data._Cycled(list("abc"), 7)
    assert [cycled[i] for i in range(len(cycled))] == list("abcabca")


# ------------------------------------------------------------------------------------- bench_demo
def test_pipeline_phases_add_up_run_durations(tmp_path):
    bench_demo = load("bench_demo")
    runs = tmp_path / "runs"
    plan = {"phase1": {"stage1": "r1", "stage2": "r2"}, "phase2": {"stage1": "r3", "stage2": None}}
    for i, (backbone, seconds, epochs) in enumerate(
        [("vgg16_bn", 100.5, 5), ("vgg16_bn", 40.0, 3), ("inception_v3", 300.0, 8)], start=1
    ):
        (runs / f"r{i}").mkdir(parents=True)
        (runs / f"r{i}" / "run.json").write_text(
            json.dumps({"backbone": backbone, "status": "finished", "duration_s": seconds})
        )
        (runs / f"r{i}" / "metrics.csv").write_text(
            "epoch,train_loss\n" + "".join(f"{e},0.1\n" for e in range(epochs))
        )
    (runs / "pipeline.json").write_text(json.dumps(plan))
    phases = bench_demo.pipeline_phases(runs)
    assert phases["phase1"]["seconds"] == pytest.approx(140.5)
    assert phases["phase2"]["seconds"] == pytest.approx(300.0)  # the unstarted stage adds nothing
    assert phases["phase1"]["stages"]["stage1"] == {
        "run": "r1",
        "backbone": "vgg16_bn",
        "status": "finished",
        "duration_s": 100.5,
        "epochs": 5,
    }
    assert phases["phase2"]["stages"]["stage2"]["run"] is None


def test_demo_times_synth_and_dashboard_then_stops_it(tmp_path):
    bench_demo = load("bench_demo")
    port = bench_demo.free_port()
    out = tmp_path / "demo.json"
    argv = [
        "--patients",
        "2",
        "--slices",
        "2",
        "--port",
        str(port),
        "--workdir",
        str(tmp_path / "w"),
        "--timeout",
        "120",
        "--json",
        str(out),
    ]
    assert bench_demo.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_slices"] == 4 == len(list((tmp_path / "w" / "data" / "stage_2_train").glob("*.dcm")))
    assert 0 < result["synth_s"] < result["dashboard_up_s"]
    assert result["dashboard_up_s"] == pytest.approx(result["synth_s"] + result["dashboard_start_s"], abs=0.5)
    assert result["fractions"] == {"dashboard": pytest.approx(result["dashboard_up_s"] / 180.0)}
    assert "pipeline_done_s" not in result
    # The dashboard it started is stopped (Ctrl-C) before it returns.
    assert not bench_demo.answers(f"http://127.0.0.1:{port}/", timeout=2.0)


def test_demo_refuses_a_folder_that_already_holds_data(tmp_path, capsys):
    bench_demo = load("bench_demo")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stage_2_train.csv").write_text("ID,Label\n")
    assert bench_demo.main(["--workdir", str(tmp_path)]) == 1
    assert "fresh folder" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- gpu_bench
@pytest.mark.slow
def test_gpu_bench_cpu_smoke_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("HEMORRHAGE_CPU_BF16", "0")  # float32 on every CPU; its subprocesses inherit it
    out = tmp_path / "gpu"
    monkeypatch.chdir(tmp_path)  # --out is relative to where the script starts, not to the checkout
    assert load("gpu_bench").main(["--cpu-smoke", "--out", "gpu"]) == 0  # its parts run as subprocesses
    summary = json.loads((out / "gpu_bench.json").read_text())
    assert summary["smoke"] is True and summary["card"] == "no GPU (CPU)"
    assert {name: [("result" in r) for r in part] for name, part in summary["parts"].items()} == {
        "train": [True],
        "loader": [True],
        "inference": [True],
    }
    text = (out / "gpu_bench.md").read_text()
    assert "| vgg16 | 32 | trainable | 2 | off | False |" in text
    report = summary["parts"]["train"][0]["result"]
    (train,) = report["results"]
    clock = train[report["clock"]]
    assert clock["overhead_ms"] == pytest.approx(clock["step_ms"] - clock["fwd_bwd_ms"])
    assert f"| {clock['step_ms']:.2f} | {clock['fwd_bwd_ms']:.2f} | {clock['overhead_ms']:.2f} (" in text
    # the loader row: 32 px, the trainer's augmentation, 1 worker, batch 10, not pinned on CPU
    assert "| 32 | on | 1 | 10 | False |" in text
    assert "| mobilenet_v3_small | 224 |" in text
    assert "Failed parts" not in text
