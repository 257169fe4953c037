"""Safe reading of weight files: torch.load(weights_only=True) only, finite values, clear refusals."""

from __future__ import annotations

import logging
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hemorrhage_core.errors import CheckpointError

log = logging.getLogger(__name__)


def safe_torch_load(path: str | os.PathLike, *, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; any refusal becomes a ``CheckpointError``.

    weights_only unpickles nothing but tensors and plain containers, so a file that holds a pickled
    object which would run code is refused before that code can run.
    """
    try:
        with warnings.catch_warnings():
            # torch's note on a foreign pickle protocol is for torch's developers; the file is judged below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not an object reference: the bytes are just not a pickle
            raise CheckpointError(
                f"cannot read {what} {os.fspath(path)!r}: not a readable torch file ({_unpickler_detail(exc)})"
            ) from None
        raise CheckpointError(
            f"refusing {what} {os.fspath(path)!r}: it holds Python objects that are not plain weights "
            f"(a pickle payload that could run code), so it was not loaded. Details: {_unpickler_detail(exc)}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"cannot read {what} {os.fspath(path)!r}: not a readable torch file ({_first_line(exc)})"
        ) from None


def _unpickler_detail(exc: BaseException) -> str:
    """The unpickler's own reason (e.g. "Unsupported global: GLOBAL builtins.open ..."), not torch's advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for marker in ("unsupported", "error:"):
        for line in lines:
            if marker in line.lower():
                if marker == "unsupported":
                    line = line[line.lower().find("unsupported"):]
                # torch goes on to explain how to allowlist the global: not advice to pass on.
                return line.split(". Please use")[0][:300]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def nonfinite_tensors(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or Inf."""
    bad = []
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad.append(name)
    return bad


def as_state_dict(obj: Any, *, source: str) -> dict[str, torch.Tensor]:
    """Check that ``obj`` is a mapping of names to finite tensors; refuse with CheckpointError otherwise."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: expected a non-empty state dict (name -> tensor), got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: entries that are not named tensors: {_preview(not_tensors)}")
    bad = nonfinite_tensors(obj)
    if bad:
        raise CheckpointError(f"{source}: non-finite (NaN/Inf) weights in {_preview(bad)}; refusing to load")
    return dict(obj)


def check_compatible(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Refuse (never load partially) when keys, shapes or dtypes differ from the model's own."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    dtypes = [
        f"{k}: {given[k].dtype} vs model {expected[k].dtype}"
        for k in expected
        if k in given and given[k].dtype != expected[k].dtype and not shapes
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} ({_preview(missing)})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} ({_preview(unexpected)})")
    if shapes:
        problems.append(f"mis-shaped {len(shapes)} ({_preview(shapes)})")
    if dtypes:
        problems.append(f"wrong dtype {len(dtypes)} ({_preview(dtypes)})")
    if problems:
        raise CheckpointError(f"{source} does not fit this architecture: " + "; ".join(problems))


def _preview(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... {len(items) - n} more" if len(items) > n else "")


def hub_checkpoint_path(url: str) -> Path:
    """Where torchvision's downloader would cache ``url``: ``torch.hub.get_dir()/checkpoints/<file name>``.

    ``torch.hub.get_dir()`` reads TORCH_HOME at call time, so a changed environment is honoured.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)

