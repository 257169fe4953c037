"""Preparing the data once: the ``cache`` command, the resumable slice-cache build (SIGKILL included), a
full disk, the cache location, and distributed ranks that open rank 0's index and cache without a stat."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import truncate_file, write_rsna_set

from hemorrhage_core.data import cache as cache_module
from hemorrhage_core.data import header_index
from hemorrhage_core.data.cache import SliceCache, cache_key, cache_roots, chunk_rows, slice_cache_dir
from hemorrhage_core.data.header_index import build_index
from hemorrhage_core.errors import DatasetError
from hemorrhage_core.preprocess import SlicePrep
from training import distributed as D
from training import trainer
from training.cli import main
from training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
SIZE = 40  # > the 32 px sources; TrainConfig wants >= 32
PREP = SlicePrep(SIZE)  # what `cache --image-size 24 --set head_crop=false` asks for
CLI_PREP = ["--image-size", str(SIZE), "--set", "head_crop=false"]


@pytest.fixture()
def rsna(tmp_path, monkeypatch):
    """40 slices (5 chunks of 8), one of them truncated (it fails to decode in chunk 1)."""
    monkeypatch.delenv("HEMORRHAGE_CT_CACHE", raising=False)
    data = tmp_path / "data"
    write_rsna_set(data, n_patients=5, slices_per_patient=8, size=32, seed=4)
    table = build_index(data, workers=1, progress=False).table
    truncate_file(data / table["path"][11])
    return data, table


def _files(cache: SliceCache) -> tuple[bytes, dict]:
    return (cache.directory / "slices.npy").read_bytes(), json.loads((cache.directory / "cache.json").read_text())


def _reference(data: Path, table, tmp_path: Path) -> SliceCache:
    return SliceCache.build(table, data, prep=PREP, cache_dir=tmp_path / "reference", workers=1, progress=False)


def test_chunks_do_not_depend_on_the_worker_count():
    assert chunk_rows(40, 3 * SIZE * SIZE) == 8
    assert chunk_rows(752_803, 3 * 299 * 299) * 3 * 299 * 299 <= 32 << 20  # at most 32 MiB a chunk
    assert chunk_rows(752_803, 3 * 64 * 64) == 256


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(rsna, tmp_path, monkeypatch, caplog):
    data, table = rsna
    reference = _reference(data, table, tmp_path)
    assert list(reference.failed) == [table["image_id"][11]]
    real = cache_module._fill_chunk

    def interrupted(job):
        if job[3] == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real(job)

    monkeypatch.setattr(cache_module, "_fill_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SliceCache.build(table, data, prep=PREP, workers=1, progress=False)
    monkeypatch.undo()
    monkeypatch.delenv("HEMORRHAGE_CT_CACHE", raising=False)
    (partial,) = (data / ".cache").glob(".partial-*")
    assert [json.loads(line)["chunk"] for line in (partial / "progress.log").read_text().splitlines()] == [0, 1, 2]

    with caplog.at_level(logging.INFO):
        resumed = SliceCache.build(table, data, prep=PREP, workers=2, progress=False)  # another worker count
    assert "3 of 5 chunks done" in caplog.text
    assert not partial.exists() and sorted(os.listdir(resumed.directory)) == ["cache.json", "slices.npy"]
    assert _files(resumed) == _files(reference)  # byte for byte, the failure of chunk 1 included


def test_a_build_for_other_sources_does_not_resume(rsna, tmp_path, monkeypatch):
    data, table = rsna
    real = cache_module._fill_chunk

    def interrupted(job):
        if job[3] == 2:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(cache_module, "_fill_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        SliceCache.build(table, data, prep=PREP, workers=1, progress=False)
    monkeypatch.setattr(cache_module, "_fill_chunk", real)
    # a source file changes: the two finished chunks may be stale, so the build starts over
    path = data / table["path"][0]
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = []
    monkeypatch.setattr(cache_module, "_fill_chunk", lambda job: calls.append(job[3]) or real(job))
    rebuilt = SliceCache.build(table, data, prep=PREP, workers=1, progress=False)
    assert sorted(calls) == [0, 1, 2, 3, 4]
    assert _files(rebuilt) == _files(_reference(data, table, tmp_path))


# A `cache` command that stops for good in chunk 2: half its rows and a torn progress line are written.
_STALLING_CACHE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from hemorrhage_core.data import cache
    real = cache._fill_chunk
    def stall(job):
        if job[3] == 2:
            fd = os.open(job[0], os.O_WRONLY)
            os.pwrite(fd, b"\\xff" * 1000, job[1])
            os.close(fd)
            with open(Path(job[0]).parent / "progress.log", "ab") as fh:
                fh.write(b'{"chunk": 2, "fai')
            print("stalled", flush=True)
            time.sleep(600)
        return real(job)
    cache._fill_chunk = stall
    from training.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_cache_command_killed_mid_build_resumes_to_the_same_bytes(rsna, tmp_path):
    data, table = rsna
    reference = _reference(data, table, tmp_path)
    args = ["cache", "--data", str(data), *CLI_PREP, "--workers", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "HEMORRHAGE_CT_CACHE"}
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_CACHE, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (partial,) = (data / ".cache").glob(".partial-*")
    assert not [p for p in (data / ".cache").iterdir() if not p.name.startswith(".")]  # nothing published

    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "training", *args[:-3], "--workers", "2", "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming the slice cache build" in result.stderr and "2 of 5 chunks done" in result.stderr
    resumed = SliceCache.open(result.stdout.strip().splitlines()[-1])
    assert _files(resumed) == _files(reference)  # chunk 2's junk rows and torn line are gone
    assert not partial.exists()
    assert time.perf_counter() - started < 300


def test_cache_command_builds_what_training_then_reuses(rsna, monkeypatch, capsys):
    data, table = rsna
    assert main(["cache", "--data", str(data), *CLI_PREP, "--workers", "1", "--no-progress"]) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert built.parent == data / ".cache"
    monkeypatch.setattr(cache_module, "_fill", lambda *a, **k: pytest.fail("training rebuilt the cache"))
    config = TrainConfig(data=str(data), image_size=SIZE, head_crop=False, progress=False)
    bundle = trainer.prepare_data(config, D.DistEnv())
    assert bundle.cache.directory == built
    assert table["image_id"][11] in bundle.skipped


def test_cache_command_with_the_full_preset_builds_one_cache_for_both_phases(rsna, capsys):
    from training.config import PipelinePreset

    preset = PipelinePreset.load("full")
    sizes = {preset.config(phase, "stage1").image_size for phase in ("phase1", "phase2")}
    assert sizes == {299}  # the STN resamples to 224 px for VGG16
    assert preset.config("phase1", "stage1").input_size == 224
    data, _ = rsna
    # --image-size over the preset keeps the test small; the phases still share one preprocessing
    assert main(["cache", "--data", str(data), "--preset", "full", "--image-size", "32", "--no-progress",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and Path(printed[0]).name.startswith("32px_")  # one cache, printed once


def test_disk_full_mid_build_is_one_error_line_and_the_rerun_continues(rsna, monkeypatch, capsys, caplog):
    data, table = rsna
    real = cache_module._fill_chunk

    def full_disk(job):
        if job[3] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(job)

    monkeypatch.setattr(cache_module, "_fill_chunk", full_disk)
    args = ["cache", "--data", str(data), *CLI_PREP, "--workers", "1", "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert "filled up" in err[0] and "16 of 40 slices kept" in err[0] and "rerun continues" in err[0]
    monkeypatch.setattr(cache_module, "_fill_chunk", real)
    with caplog.at_level(logging.INFO, logger="hemorrhage_core.data.cache"):
        assert main(args) == 0
    assert "2 of 5 chunks done" in caplog.text
    (built,) = [p for p in (data / ".cache").iterdir() if not p.name.startswith(".")]
    assert len(SliceCache.open(built)) == len(table)


def test_too_little_free_space_is_refused_before_writing(rsna, monkeypatch, capsys):
    data, table = rsna
    needed = len(table) * 3 * SIZE * SIZE
    margin = cache_module.free_space_margin(needed)
    assert margin == 1 << 30  # 1 GiB, more than 2% of this small cache
    real_usage = cache_module.shutil.disk_usage

    def usage(path):
        return real_usage(path)._replace(free=needed + margin - 1)

    monkeypatch.setattr(cache_module.shutil, "disk_usage", usage)
    assert main(["cache", "--data", str(data), *CLI_PREP, "--workers", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "keeps 1.1 GB free" in err and "--cache-dir" in err
    assert not list((data / ".cache").glob(".partial-*"))  # nothing written
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=needed + margin))
    assert main(["cache", "--data", str(data), *CLI_PREP, "--workers", "1", "--no-progress"]) == 0


def test_cache_env_var_takes_precedence_and_cache_dir_is_the_same_place(rsna, tmp_path, monkeypatch, capsys):
    data, table = rsna
    root = tmp_path / "scratch"
    assert main(["cache", "--data", str(data), *CLI_PREP, "--cache-dir", str(root), "--workers", "1",
                 "--no-progress"]) == 0
    built = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert built.parent == slice_cache_dir(data, root) and str(built).startswith(str(root))
    assert not (data / ".cache").exists()
    # training given HEMORRHAGE_CT_CACHE=root finds it there, and never looks in DATA/.cache
    monkeypatch.setenv("HEMORRHAGE_CT_CACHE", str(root))
    assert cache_roots(data) == [slice_cache_dir(data, root)]
    monkeypatch.setattr(cache_module, "_fill", lambda *a, **k: pytest.fail("rebuilt"))
    config = TrainConfig(data=str(data), image_size=SIZE, head_crop=False, progress=False)
    assert trainer.build_cache(config, table, D.DistEnv()).directory == built


def test_other_ranks_open_rank0s_index_and_cache_without_listing_or_stat(rsna, monkeypatch):
    data, table = rsna
    config = TrainConfig(data=str(data), image_size=SIZE, head_crop=False, progress=False)
    sent = []
    monkeypatch.setattr(D, "broadcast", lambda obj, env, **kw: sent.append(obj) or obj)
    rank0 = D.DistEnv(rank=0, world_size=2)
    index0 = trainer.load_index(config, rank0)
    cache0 = trainer.build_cache(config, index0.table, rank0)
    assert [status for status, _ in sent] == ["ok", "ok"]

    # rank 1 hears what rank 0 sent, and may not list the image folder or stat a source file
    replies = iter(sent)
    monkeypatch.setattr(D, "broadcast", lambda obj, env, **kw: next(replies))
    monkeypatch.setattr(header_index, "_list_files", lambda *a: pytest.fail("rank 1 listed the image folder"))
    monkeypatch.setattr(cache_module, "source_signature", lambda *a: pytest.fail("rank 1 stat'ed the sources"))
    rank1 = D.DistEnv(rank=1, world_size=2)
    index1 = trainer.load_index(config, rank1)
    cache1 = trainer.build_cache(config, index1.table, rank1)
    assert index1.table.equals(index0.table)
    assert cache1.directory == cache0.directory and cache1.failed == cache0.failed
    np.testing.assert_array_equal(cache1.array, cache0.array)

    # rank 0 fails: the others stop with an error instead of waiting for it
    monkeypatch.setattr(D, "broadcast", lambda obj, env, **kw: ("failed", None))
    with pytest.raises(DatasetError, match="rank 0 could not prepare"):
        trainer.build_cache(config, index1.table, rank1)


def test_a_second_builder_waits_for_the_first_and_takes_its_cache(rsna, tmp_path, monkeypatch, caplog):
    data, table = rsna
    reference = _reference(data, table, tmp_path)
    key = cache_key(PREP, list(table["image_id"]))
    (data / ".cache").mkdir()
    holder = open(data / ".cache" / f".lock-{key}", "a+b")  # noqa: SIM115 - closed by the "first builder"
    fcntl.flock(holder, fcntl.LOCK_EX)

    def first_builder_publishes():
        time.sleep(1.0)
        shutil.copytree(reference.directory, data / ".cache" / key)
        holder.close()  # releases the lock

    thread = threading.Thread(target=first_builder_publishes)
    thread.start()
    monkeypatch.setattr(cache_module, "_fill", lambda *a, **k: pytest.fail("built twice"))
    try:
        with caplog.at_level(logging.INFO, logger="hemorrhage_core.data.cache"):
            cache = SliceCache.build(table, data, prep=PREP, workers=1, progress=False)
    finally:
        thread.join()
    assert "waiting for it" in caplog.text
    assert cache.directory == data / ".cache" / key and _files(cache) == _files(reference)


def test_scale_benchmark_extrapolates_time_in_proportion_and_gives_the_rsna_disk():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cache_scale", REPO / "benchmarks" / "bench_cache_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    step = lambda wall, rss: {"wall_s": wall, "cpu_s": wall, "rss_mib": rss}  # noqa: E731
    small = {"n": 1000, "steps": {"cache build": step(2.0, 300.0)}, "disk": {"cache_json": 50_000}}
    large = {"n": 5000, "steps": {"cache build": step(10.0, 340.0)}, "disk": {"cache_json": 250_000}}
    out = bench.extrapolate(small, large, 64, target=10_000)
    assert out["steps"]["cache build"]["wall_s"] == pytest.approx(20.0)
    assert out["steps"]["cache build"]["rss_mib_per_1000"] == pytest.approx(10.0)
    assert out["steps"]["cache build"]["rss_mib"] == pytest.approx(390.0)
    rsna = bench.extrapolate(small, large, 64)["disk_gb"]
    assert round(rsna[299], 1) == 201.9 and round(rsna[224], 1) == 113.3  # the README's figures
