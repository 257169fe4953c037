"""torchrun support: environment detection, process group set-up, samplers, gathering, rank-0 writes.

Under ``torchrun --nproc_per_node N`` every process runs the same command; ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` come from the environment. Without them this is a world of one and every helper is a
no-op, so the trainer has one code path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sized
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

log = logging.getLogger(__name__)

# Rank 0 alone writes checkpoints and records; a slow epoch end must not time the others out.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=60)


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


def init(device_type: str) -> DistEnv:
    """Join the process group when launched by torchrun: NCCL on CUDA, gloo on CPU."""
    env = detect()
    if not env.enabled or (dist.is_available() and dist.is_initialized()):
        return env
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    log.info("joined the process group: rank %d of %d (%s)", env.rank, env.world_size, backend)
    return env


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(env: DistEnv, requested: str) -> torch.device:
    """The device this rank trains on: ``cuda:LOCAL_RANK`` when CUDA is asked for (or auto and present)."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but no CUDA device is available")
    return torch.device(f"cuda:{env.local_rank}") if use_cuda else torch.device("cpu")


def wrap_model(model: torch.nn.Module, env: DistEnv, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job; the model itself otherwise."""
    if not env.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Frozen trunks leave parameters without gradients; DDP must then not wait for them.
    has_frozen = any(not p.requires_grad for p in model.parameters())
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=has_frozen)


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


def gather_rows(arrays: dict[str, np.ndarray], env: DistEnv) -> dict[str, np.ndarray]:
    """Concatenate each rank's arrays (same keys, rows on axis 0) on every rank, rank order."""
    if not env.enabled:
        return arrays
    parts: list[Any] = [None] * env.world_size
    dist.all_gather_object(parts, arrays)
    return {key: np.concatenate([p[key] for p in parts], axis=0) for key in arrays}


def all_mean(value: float, env: DistEnv) -> float:
    """Mean of a scalar over ranks."""
    if not env.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def all_true(flag: bool, env: DistEnv) -> bool:
    """True when ``flag`` holds on every rank (a NaN on one rank stops them all together)."""
    if not env.enabled:
        return bool(flag)
    t = torch.tensor([0 if flag else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t)
    return int(t.item()) == 0


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.enabled:
        return obj
    box = [obj if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()
