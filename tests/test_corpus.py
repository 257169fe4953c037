"""The DICOM regression corpus (``tests/corpus/``) through every door a file can come in by.

Each file's expected outcome is declared once, in ``tests/corpus/make_corpus.py``: the reader (path and
bytes) returns exactly the expected HU or refuses with the expected reason and nothing but a
DicomReadError, within a memory bound; ``inspect`` and ``predict`` (one subprocess each) give one
record per file in order, clear messages, exit code 2 and no traceback; the dashboard's upload path
gives a message per bad file, results for the good ones, and never raises.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hemorrhage_core.dashboard.predict_panel import read_uploads
from hemorrhage_core.dashboard.predictors import PredictorCache, analyse_uploads
from hemorrhage_core.dashboard.safety import GENERIC_ERROR
from hemorrhage_core.dicom import CtSlice, DicomRefusal, SliceMeta, read_header, read_slice
from hemorrhage_core.errors import DicomReadError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.preprocess import SlicePrep

REPO = Path(__file__).resolve().parents[1]
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
_spec = importlib.util.spec_from_file_location("make_corpus", CORPUS_DIR / "make_corpus.py")
corpus = sys.modules.setdefault("make_corpus", importlib.util.module_from_spec(_spec))
if not hasattr(corpus, "CASES"):  # registered first: dataclasses look their module up while it loads
    _spec.loader.exec_module(corpus)  # type: ignore[union-attr]

CASES = corpus.CASES
MEMORY_BOUND = 64 * 1024**2  # tracemalloc peak of one read; the largest corpus file is 20 KB
RSS_BOUND = 64 * 1024**2  # growth of the process's peak RSS over reading the whole corpus, twice
MAX_FILE_BYTES = 32 * 1024
MAX_CORPUS_BYTES = 256 * 1024


def _corpus_files() -> list[Path]:
    """The corpus in the order inspect and predict expand the folder: sorted by name."""
    return sorted(CORPUS_DIR.glob("*.dcm"))


def _case(path: str | Path) -> Any:
    return next(c for c in CASES if c.name == Path(path).name)


def _refusal(path: Path) -> DicomRefusal:
    with pytest.raises(DicomRefusal) as info:
        read_slice(path)
    return info.value


# -------------------------------------------------------------------------------------------- corpus
def _comparable(data: bytes) -> bytes:
    """The file's bytes, with a deflated data set inflated: zlib builds may compress differently."""
    if data[128:132] != b"DICM" or b"1.2.840.10008.1.2.1.99" not in data[132:512]:
        return data
    (group_length,) = struct.unpack_from("<I", data, 140)  # (0002,0000) UL, the first meta element
    start = 144 + group_length
    return data[:start] + zlib.decompress(data[start:], -zlib.MAX_WBITS)


def test_corpus_is_small_complete_and_regenerates_byte_for_byte(tmp_path):
    written = corpus.write_corpus(tmp_path)
    assert [p.name for p in _corpus_files()] == sorted(c.name for c in CASES)  # none missing, none stray
    for path in written:
        assert _comparable(path.read_bytes()) == _comparable((CORPUS_DIR / path.name).read_bytes()), (
            f"{path.name} differs from make_corpus.py's output: rerun python tests/corpus/make_corpus.py"
        )
    assert (tmp_path / "README.md").read_text() == (CORPUS_DIR / "README.md").read_text()
    sizes = [p.stat().st_size for p in _corpus_files()]
    assert max(sizes) <= MAX_FILE_BYTES and sum(sizes) <= MAX_CORPUS_BYTES
    readme = (CORPUS_DIR / "README.md").read_text()
    assert all(f"| `{c.name}` |" in readme for c in CASES)


# -------------------------------------------------------------------------------------------- reader
def _traced(read: Any, source: Path | bytes) -> tuple[Any, int]:
    """``read(source)`` under tracemalloc: (result or DicomReadError, peak bytes). Other errors propagate."""
    tracemalloc.start()
    try:
        try:
            result: Any = read(source)
        except DicomReadError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reader_reads_exactly_or_refuses_with_the_expected_reason(case):
    path = CORPUS_DIR / case.name
    for source in (path, path.read_bytes()):
        for read, expected in ((read_slice, case.reader), (read_header, case.header)):
            result, peak = _traced(read, source)
            where = f"{read.__name__}({type(source).__name__})"
            assert peak < MEMORY_BOUND, f"{where} peaked at {peak / 1024**2:.0f} MiB"
            if expected == "ok":
                assert isinstance(result, CtSlice | SliceMeta), f"{where} refused: {result}"
                meta = result.meta if isinstance(result, CtSlice) else result
                assert (meta.rows, meta.columns) == (corpus.SIZE, corpus.SIZE)
            else:
                assert isinstance(result, DicomRefusal), f"{where} accepted a file it must refuse"
                assert result.reason == expected, f"{where}: {result.reason} ({result})"
                assert str(result) and "\n" not in str(result)
                if case.says and read is read_slice:
                    assert case.says in str(result), f"{where}: {result}"
                assert result.__cause__ is None  # nothing chained that a log could print
    if case.accepted:
        hu = read_slice(path).hu
        assert hu.dtype == np.float32
        np.testing.assert_array_equal(hu, case.hu.apply(corpus.head_hu().astype(np.float32)))


def _proc_status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset"
)
def test_reading_the_whole_corpus_keeps_the_process_peak_rss_bounded():
    # tracemalloc sees Python and numpy allocations only; the peak RSS also sees decoders' malloc calls.
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    for path in _corpus_files():
        for source in (path, path.read_bytes()):
            for read in (read_slice, read_header):
                try:
                    read(source)
                except DicomReadError:
                    pass
    growth = (_proc_status_kib("VmHWM") - before) * 1024
    assert growth < RSS_BOUND, f"reading the corpus raised the peak RSS by {growth / 1024**2:.0f} MiB"


# -------------------------------------------------------------------------------- inspect (1 process)
def _run(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m training ARGS`` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )


def test_inspect_gives_one_clear_record_per_file_in_order():
    done = _run(["inspect", "--json", str(CORPUS_DIR)])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.strip() == ""
    records = json.loads(done.stdout)
    assert [Path(r["file"]).name for r in records] == [p.name for p in _corpus_files()]
    for record in records:
        case = _case(record["file"])
        if case.accepted:
            hu = case.hu.apply(corpus.head_hu().astype(np.float64))
            assert record["ok"] is True and record["error"] is None
            assert (record["hu_min"], record["hu_max"]) == (hu.min(), hu.max())
            assert record["hu_mean"] == pytest.approx(hu.mean(), abs=1e-4)
        else:
            # the reader's own sentence, word for word: no wrapper, no exception name alone
            assert record["ok"] is False and record["hu_min"] is None
            assert record["error"] == str(_refusal(CORPUS_DIR / case.name))


# -------------------------------------------------------------------------------- predict (1 process)
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory holding a tiny untrained stage-2 model (what predict needs; no training)."""
    import torch

    from hemorrhage_core.checkpoint import save_checkpoint
    from hemorrhage_core.models import ModelSpec, build_model
    from hemorrhage_core.runs import RunWriter

    torch.manual_seed(0)
    spec = ModelSpec(backbone="mobilenet_v3_small", stage=2, input_size=32, hidden=(16, 8))
    model = build_model(spec, weights="none")
    writer = RunWriter.create(tmp_path_factory.mktemp("runs"), backbone=spec.backbone, stage=2, config={})
    save_checkpoint(writer.checkpoint_path("best"), model, prep=SlicePrep(32))
    writer.finish()
    return writer.path


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[str, float]:
    """The in-process Predictor's probabilities for the phantom (every clean accepted file holds it)."""
    from hemorrhage_core.inference import Predictor

    predictor = Predictor.from_checkpoint(run_dir / "checkpoints" / "best.pt")
    return predictor.predict(CORPUS_DIR / "ok-baseline.dcm").probabilities


def _expected_error(case: Any) -> str:
    if case.accepted:  # read, then refused by the Predictor (not CT)
        return "is not CT"
    return str(_refusal(CORPUS_DIR / case.name))


def test_predict_predicts_the_good_flags_the_odd_and_names_each_refusal(run_dir, reference):
    done = _run(["predict", "--run", str(run_dir), "--json", str(CORPUS_DIR)])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    rows = json.loads(done.stdout)
    assert [Path(r["file"]).name for r in rows] == [p.name for p in _corpus_files()]
    refused = 0
    for row in rows:
        case = _case(row["file"])
        if case.predict == "refuse":
            refused += 1
            assert row["probabilities"] is None and row["flags"] == []
            assert _expected_error(case) in row["error"], row["error"]
            continue
        assert row["error"] is None
        assert list(row["probabilities"]) == list(LABELS)
        assert [f.split(":")[0] for f in row["flags"]] == case.expected_flags
        if case.predict == "ok":  # same HU, same model: the in-process Predictor's numbers
            assert row["probabilities"] == pytest.approx(reference, abs=1e-5)
    assert f"{refused} of {len(rows)} inputs could not be predicted" in done.stderr
    flagged = sum(bool(c.expected_flags) for c in CASES)
    assert f"warning: {flagged} of {len(rows)} predicted inputs do not look like a head CT" in done.stderr


# ------------------------------------------------------------------------------- dashboard upload path
def test_dashboard_upload_path_answers_every_file_and_never_raises(run_dir, reference, tmp_path, caplog):
    # Shiny hands the app temporary copies; read_uploads deletes them, so copy the corpus first.
    infos = []
    for path in _corpus_files():
        copy = tmp_path / path.name
        shutil.copyfile(path, copy)
        infos.append({"name": path.name, "datapath": str(copy)})
    predictor = PredictorCache().get("corpus-run", run_dir / "checkpoints" / "best.pt")
    with caplog.at_level(logging.INFO, logger="hemorrhage_core"):
        uploads, problems = read_uploads(infos, max_bytes=1024**2, max_files=len(infos))
        results = analyse_uploads(predictor, uploads, saliency_label="any")
    assert list(tmp_path.glob("*.dcm")) == []  # every temporary copy deleted
    assert problems == ["bad-empty.dcm: the file is empty."]  # refused before decoding
    assert sorted(r.name for r in results) == sorted(u.name for u in uploads)
    assert len(uploads) + len(problems) == len(CASES)
    for result in results:
        case = _case(result.name)
        if case.predict == "refuse":
            assert not result.ok and result.error != GENERIC_ERROR
            assert _expected_error(case) in result.error, result.error
            assert result.probabilities == {} and result.hu is None
            continue
        assert result.ok, result.error
        assert [f.split(":")[0] for f in result.flags] == case.expected_flags
        np.testing.assert_array_equal(result.hu, case.hu.apply(corpus.head_hu().astype(np.float32)))
        assert result.heatmap is not None
        if case.predict == "ok":
            assert result.probabilities == pytest.approx(reference, abs=1e-5)
    # every refusal was expected: nothing logged as an unexpected error
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
