"""torchrun support: environment detection, process group set-up, samplers, gathering, rank-0 writes.

Under ``torchrun --nproc_per_node N`` every process runs the same command; ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` come from the environment. Without them this is a world of one and every helper is a
no-op, so the trainer has one code path.

The default process group (NCCL on CUDA, gloo on CPU) carries DDP's gradients; gloo groups carry the
rest (barriers, the NaN flag, the loss for the log, gathered predictions, broadcast objects), so none
of that takes GPU memory, and a rank whose process ends closes its sockets, which its peers see at
once. Every wait is bounded: ``HEMORRHAGE_DIST_TIMEOUT`` seconds (default 600) for collectives and
barriers, ``HEMORRHAGE_DIST_PREPARE_TIMEOUT`` (default 14400) while rank 0 alone builds the index and
the slice cache (``broadcast(..., prepare=True)``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from training.exits import EXIT_FAILED, CommandError

log = logging.getLogger(__name__)

TIMEOUT_ENV = "HEMORRHAGE_DIST_TIMEOUT"
PREPARE_TIMEOUT_ENV = "HEMORRHAGE_DIST_PREPARE_TIMEOUT"
# Rank 0 writes a checkpoint, the predictions and the gallery at each epoch end while the others wait:
# seconds on a local disk, a minute on a slow shared one; 10 minutes is NCCL's own default.
DEFAULT_TIMEOUT_S = 600.0
# The first run over a data set reads every file once (index, then the slice cache) on rank 0 alone.
DEFAULT_PREPARE_TIMEOUT_S = 4 * 3600.0
# Spacing of per-rank seeds: a large prime, as hemorrhage_core.data.loader's, so nearby seeds never collide.
RANK_SEED_STRIDE = 1_000_003

_control: Any = None  # gloo group of barriers and Python objects (None: the default group, when it is gloo)
_prepare: Any = None  # gloo group of the waits for rank 0's data preparation (the long timeout)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistEnv:
    """Read torchrun's environment variables (a world of one when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RuntimeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers when set") from None
    return DistEnv(rank=rank, world_size=max(1, world), local_rank=local)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={text!r} must be a number of seconds > 0")
    return value


def collective_timeout() -> timedelta:
    """The longest a rank waits for the others at a collective or barrier (``HEMORRHAGE_DIST_TIMEOUT``)."""
    return timedelta(seconds=_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def prepare_timeout() -> timedelta:
    """How long the other ranks wait for rank 0's index and cache (``HEMORRHAGE_DIST_PREPARE_TIMEOUT``)."""
    return max(timedelta(seconds=_seconds(PREPARE_TIMEOUT_ENV, DEFAULT_PREPARE_TIMEOUT_S)), collective_timeout())


def init(device_type: str) -> DistEnv:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo on CPU, plus the gloo
    control group."""
    global _control, _prepare
    env = detect()
    if not env.enabled or (dist.is_available() and dist.is_initialized()):
        return env
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    timeout = collective_timeout()
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    _control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    _prepare = dist.new_group(backend="gloo", timeout=prepare_timeout())
    log.info("joined the process group: rank %d of %d (%s, timeout %.0f s)", env.rank, env.world_size,
             backend, timeout.total_seconds())
    return env


def cleanup() -> None:
    global _control, _prepare
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = _prepare = None


def rank_seed(seed: int, rank: int) -> int:
    """This rank's seed for dropout, augmentation and loader workers: ``seed`` itself on rank 0 (a world
    of one is unchanged), offset by ``rank x RANK_SEED_STRIDE`` elsewhere so ranks draw differently."""
    return int(seed) + RANK_SEED_STRIDE * int(rank)


def device_for(env: DistEnv, requested: str) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` when CUDA is asked for (or auto and present)."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but no CUDA device is available")
    return torch.device(f"cuda:{env.local_rank}") if use_cuda else torch.device("cpu")


def wrap_model(
    model: torch.nn.Module, env: DistEnv, device: torch.device, *, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job; the model itself otherwise.

    ``find_unused_parameters`` costs a graph traversal per step: only for a model with trainable
    parameters that a step can leave without a gradient (frozen ones do not count: DDP skips them).
    """
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside DDP (``.module``) and/or a training view (``.net``)."""
    for attr in ("module", "net"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            model = inner
    return model


def train_sampler(dataset: Sized, env: DistEnv, *, seed: int) -> DistributedSampler:
    """Shuffling sampler for every world size (one process too), reseeded by ``set_epoch``.

    The same permutation for any world size means N processes of batch B see exactly the samples one
    process of batch N x B sees, and the order depends on (seed, epoch) only, which makes resume exact.
    """
    return DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed, drop_last=False
    )


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, in order, without padding (evaluation)."""

    def __init__(self, n: int, env: DistEnv):
        self.indices = list(range(env.rank, n, env.world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a world of one)."""
    if not env.enabled:
        return [obj]
    parts: list[Any] = [None] * env.world_size
    with _peers(env, "a gather"):
        dist.all_gather_object(parts, obj, group=_control)
    return parts


def gather_rows(arrays: dict[str, np.ndarray], env: DistEnv) -> dict[str, np.ndarray]:
    """Concatenate each rank's arrays (same keys, rows on axis 0) on every rank, rank order."""
    if not env.enabled:
        return arrays
    parts = gather_objects(arrays, env)
    return {key: np.concatenate([p[key] for p in parts], axis=0) for key in arrays}


def all_sum(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum over ranks of a few host numbers (float64, on the gloo group)."""
    if not env.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    with _peers(env, "a sum over ranks"):
        dist.all_reduce(t, group=_control)
    return t.tolist()


def all_mean(value: float, env: DistEnv) -> float:
    """Mean of a scalar over ranks."""
    return all_sum([value], env)[0] / env.world_size


def all_true(flag: bool, env: DistEnv) -> bool:
    """True when ``flag`` holds on every rank (a NaN on one rank stops them all together)."""
    return all_sum([0.0 if flag else 1.0], env)[0] == 0.0


def broadcast(obj: Any, env: DistEnv, *, prepare: bool = False) -> Any:
    """Rank 0's ``obj`` on every rank. ``prepare``: rank 0 may first work alone for up to
    ``prepare_timeout()`` (the index, the slice cache); otherwise the wait is ``collective_timeout()``."""
    if not env.enabled:
        return obj
    box = [obj if env.is_main else None]
    with _peers(env, "a broadcast from rank 0", prepare=prepare):
        dist.broadcast_object_list(box, src=0, group=_prepare if prepare else _control)
    return box[0]


class PeerError(CommandError):
    """Another rank did not reach a barrier in time, or its process ended: this rank stops too (exit 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=EXIT_FAILED)


def barrier(env: DistEnv, what: str = "a barrier") -> None:
    """Wait until every rank is at ``what`` (words for the error), for at most ``collective_timeout()``.

    A monitored barrier on the gloo group: rank 0 names the ranks that did not arrive, and a rank whose
    process ended is seen at once (its sockets close) instead of at the timeout.
    """
    if not env.enabled:
        return
    with _peers(env, what):
        dist.monitored_barrier(group=_control, timeout=collective_timeout(), wait_all_ranks=True)


@contextmanager
def _peers(env: DistEnv, what: str, *, prepare: bool = False) -> Iterator[None]:
    """A collective's failure (a peer's timeout or closed connection) as one PeerError line."""
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistError and gloo's errors are RuntimeErrors
        limit = prepare_timeout() if prepare else collective_timeout()
        name = PREPARE_TIMEOUT_ENV if prepare else TIMEOUT_ENV
        raise PeerError(
            f"rank {env.rank} stopped at {what}: another rank failed or did not arrive within "
            f"{limit.total_seconds():.0f} s ({name}): {' '.join(str(exc).split())[:300]}"
        ) from exc

