"""Imported at start-up by every Python process that has this folder on PYTHONPATH: the DDP tests put it
there for their torchrun workers, so the commands they run stay exactly the README's.

In a torchrun worker (``RANK`` set):
- ``HEMORRHAGE_TEST_WATCH=DIR``: every file write, rename, directory creation and removal under ``DIR``
  is appended to ``HEMORRHAGE_TEST_WRITES_LOG.<rank>`` (``event<TAB>path`` lines), via an audit hook.
- ``HEMORRHAGE_TEST_FAIL=RANK:raise``: that rank raises ``injected failure on rank RANK`` as its first
  training epoch starts; ``RANK:hang``: that rank never arrives at the barrier that ends the epoch.
"""

from __future__ import annotations

import os
import sys

_RANK = os.environ.get("RANK")


def _watch(root: str, log_path: str) -> None:
    root = os.path.realpath(root)
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # opened before the hook: not recorded
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(path) -> str | None:
        if isinstance(path, int):
            return None
        try:
            full = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        return full if full == root or full.startswith(root + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            wants = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & writing
            )
            targets = [path] if wants else []
        elif event == "os.rename":
            targets = [args[1]]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            targets = [args[0]]
        else:
            return
        for target in targets:
            full = under(target)
            if full is not None:
                log.write(f"{event}\t{full}\n")

    sys.addaudithook(hook)


def _inject(spec: str) -> None:
    rank, _, kind = spec.partition(":")
    if rank != _RANK:
        return
    import time

    if kind == "raise":
        from training import trainer

        def failing_epoch(self, epoch):
            raise RuntimeError(f"injected failure on rank {_RANK}")

        trainer.Loop.train_epoch = failing_epoch
    elif kind == "hang":
        from training import distributed

        real_barrier = distributed.barrier

        def hung_barrier(env, what="a barrier", **kwargs):
            if what.startswith("the end of epoch"):
                time.sleep(3600)
            return real_barrier(env, what, **kwargs)

        distributed.barrier = hung_barrier
    else:
        raise ValueError(f"HEMORRHAGE_TEST_FAIL={spec!r}: use RANK:raise or RANK:hang")


if _RANK is not None:
    if os.environ.get("HEMORRHAGE_TEST_WATCH"):
        _watch(os.environ["HEMORRHAGE_TEST_WATCH"], f"{os.environ['HEMORRHAGE_TEST_WRITES_LOG']}.{_RANK}")
    if os.environ.get("HEMORRHAGE_TEST_FAIL"):
        _inject(os.environ["HEMORRHAGE_TEST_FAIL"])
