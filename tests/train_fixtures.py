"""Tiny RSNA-layout data sets and configs for the training tests (CPU, seconds, no network)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
from data_fixtures import LABEL_CYCLE as DATA_LABEL_CYCLE

from hemorrhage_core.labels import LABELS

# Header text that must never reach a run record.
PATIENT_NAME = "Zyxwvut^Quxbarrow"
PATIENT_PREFIX = "PATSECRET"

# Label rows cycled over the slices: data_fixtures' cycle (every stage-1 class and one two-subtype
# slice) plus a second negative, so training sets keep a realistic share of slices without blood.
LABEL_CYCLE: tuple[tuple[int, ...], ...] = (*DATA_LABEL_CYCLE, (0, 0, 0, 0, 0, 0))


def write_tiny_set(
    root: str | os.PathLike, *, n_patients: int = 10, slices_per_patient: int = 4, size: int = 32, seed: int = 0
) -> pd.DataFrame:
    """Random-HU CT slices with cycling labels; headers carry PATIENT_NAME and PATIENT_PREFIX ids.

    Bright squares mark the positive subtypes so a model has something learnable. Returns the labels.
    """
    from hemorrhage_core.dicom import new_uid, write_ct_slice

    root = Path(root)
    images = root / "stage_2_train"
    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for p in range(n_patients):
        study, series = new_uid(f"t{seed}/study/{p}"), new_uid(f"t{seed}/series/{p}")
        for s in range(slices_per_patient):
            image_id = "ID_" + hashlib.sha256(f"t{seed}/{p}/{s}".encode()).hexdigest()[:9]
            labels = LABEL_CYCLE[(k + p) % len(LABEL_CYCLE)]
            stored = rng.integers(1000, 1100, size=(size, size)).astype(np.int16)  # HU -24..76: brain-ish
            cell = size // 4
            for j, flag in enumerate(labels[:5]):
                if flag:
                    r, c = divmod(j, 3)
                    stored[r * cell + 2 : r * cell + cell, c * cell + 2 : c * cell + cell] = 1024 + 400
            write_ct_slice(
                images / f"{image_id}.dcm",
                stored,
                patient_id=f"{PATIENT_PREFIX}{p:04d}",
                study_uid=study,
                series_uid=series,
                sop_uid=new_uid(f"t{seed}/sop/{image_id}"),
                z=5.0 * s,
                instance_number=s + 1,
                extra={"PatientName": PATIENT_NAME},
            )
            rows.append((image_id, labels))
            k += 1
    long = [(f"{image_id}_{name}", int(v)) for image_id, six in rows for name, v in zip(LABELS, six, strict=True)]
    pd.DataFrame(long, columns=["ID", "Label"]).to_csv(root / "stage_2_train.csv", index=False)
    frame = pd.DataFrame({image_id: six for image_id, six in rows}, index=list(LABELS)).T.astype(np.int8)
    frame.index.name = "image_id"
    return frame


def tiny_config(data: str | os.PathLike, runs: str | os.PathLike, **overrides):
    """A TrainConfig that trains in seconds on write_tiny_set data, single-threaded and deterministic."""
    from training.config import TrainConfig

    values = {
        "data": str(data),
        "runs_dir": str(runs),
        "backbone": "resnet18",
        "stage": 1,
        "epochs": 1,
        "batch_size": 4,
        "lr": 1e-3,
        "image_size": 32,
        "input_size": 32,
        "val_fraction": 0.3,
        "warmup_epochs": 0.0,
        "gallery_size": 8,
        "threads": 1,
        "progress": False,
        "augment": False,
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------ resume and crash tests
KILL_ENV = "HEMORRHAGE_TEST_KILL_AT"
TESTS_DIR = Path(__file__).resolve().parent


def resume_train_args(data: str | os.PathLike, runs: str | os.PathLike, *, epochs: int = 3) -> list[str]:
    """``train`` arguments (after ``python -m training``) of the resume tests' short CPU run.

    Augmentation, dropout and precise BN on, so every RNG state matters; one thread, so float sums repeat.
    """
    return [
        "train", "--data", str(data), "--backbone", "resnet18", "--stage", "1", "--epochs", str(epochs),
        "--batch-size", "4", "--image-size", "32", "--input-size", "32", "--val-fraction", "0.3",
        "--runs-dir", str(runs), "--threads", "1", "--no-progress",
        "--set", "augment=true", "--set", "warmup_epochs=0.5", "--set", "gallery_size=4",
        "--set", "precise_bn_images=8",
    ]


def killing_command(cli_args: list[str]) -> list[str]:
    """``python -m training <cli_args>`` in a process that SIGKILLs itself where ``$HEMORRHAGE_TEST_KILL_AT`` says.

    Run it with ``killing_env(point)``. Points (counted from the process start, so no timing is involved):
    ``step:N`` right after the N-th optimizer step; ``write:N:F`` in the N-th checkpoint save, once the
    fraction F of the file's bytes reached the disk (the temporary file is left behind); ``rename:N``
    in the N-th checkpoint save, complete and fsynced but not yet renamed to its final name.
    """
    import sys

    code = "import sys, train_fixtures; sys.exit(train_fixtures.train_with_kill_point(sys.argv[1:]))"
    return [sys.executable, "-c", code, *cli_args]


def killing_env(point: str) -> dict[str, str]:
    env = dict(os.environ)
    env[KILL_ENV] = point
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def train_with_kill_point(argv: list[str]) -> int:
    """The body of ``killing_command``: install the kill point, then run the command line."""
    import io
    import signal

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from training import cli

    kind, *values = os.environ[KILL_ENV].split(":")
    target = int(values[0])
    count = 0

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kind == "step":
        def after_step(optimizer, args, kwargs) -> None:  # noqa: ARG001
            nonlocal count
            count += 1
            if count == target:
                die()

        register_optimizer_step_post_hook(after_step)
    elif kind in ("write", "rename"):
        real_save = torch.save
        fraction = float(values[1]) if kind == "write" else 1.0

        def save(obj, f, *args, **kwargs):  # only checkpoints are written with torch.save
            nonlocal count
            count += 1
            if count != target:
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: int(len(data) * fraction)])
            f.flush()
            os.fsync(f.fileno())
            die()

        torch.save = save
    else:
        raise ValueError(f"unknown kill point {os.environ[KILL_ENV]!r}")
    return cli.main(argv)


def context_model(spec):
    """A 2.5D model (``spec.context`` > 0) whose first convolution reads the neighbours, as a trained
    one does: ``widen_input`` starts their kernels at zero, so an untrained model would ignore them."""
    import torch

    from hemorrhage_core.models import build_model

    torch.manual_seed(0)
    model = build_model(spec).eval()
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        first.weight.normal_(0.0, 0.1)
    return model
