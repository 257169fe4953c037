"""The torch Dataset over the index: image tensor, target and image id per slice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hemorrhage_core.data.cache import SliceCache
from hemorrhage_core.data.labels_table import describe_ids
from hemorrhage_core.data.neighbours import context_ids
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.preprocess import SlicePrep, stack_context, to_tensor

log = logging.getLogger(__name__)

# Stage-1 target of an unlabeled image: PyTorch's CrossEntropyLoss ignores this index by default.
IGNORE_INDEX = -100


class SliceDataset(Dataset):
    """One item per index row: ``(image (C, S, S) float32 in [0, 1], target, image_id)``.

    Stage 1 (multi-class), ``stage1_multi="drop"`` (the original report): rows with two or more
    subtypes are dropped; the target is the int64 class index in STAGE1_CLASSES (``IGNORE_INDEX`` for
    unlabeled rows). ``stage1_multi="share"`` keeps them, and the target is the six labels as in stage
    2, from which the stage-1 loss builds a class distribution (engine.Stage1Loss). Stage 2
    (multi-label): the target is the float32 tensor of the six labels (NaN for unlabeled rows).

    The deterministic part (decode, crop, window, resize, uint8: ``prep``) comes from ``cache`` when
    given, else from ``read_slice`` + ``prep``; both give identical tensors. ``augment`` runs after it.
    With ``prep.context`` k > 0 the image is the stack of the slice and its k neighbours on each side
    in its series among ``index``'s rows (``neighbours.context_ids``), (C (2k + 1), S, S); a neighbour
    that fails to decode (uncached) is replaced by the slice itself.
    Slices the cache failed to decode are excluded (``excluded_ids``). Without a cache, a slice
    that fails to decode yields ``None`` (``on_error="skip"``, dropped by make_loader's collate)
    or raises DicomReadError (``on_error="raise"``).
    """

    def __init__(
        self,
        index: pd.DataFrame,
        data_dir: str | PathLike,
        *,
        stage: int,
        prep: SlicePrep,
        cache: SliceCache | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_error: Literal["skip", "raise"] = "skip",
        stage1_multi: Literal["drop", "share"] = "drop",
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage1_multi not in ("drop", "share"):
            raise ValueError(f"stage1_multi must be 'drop' or 'share', got {stage1_multi!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.data_dir = Path(data_dir)
        self.stage = stage
        # Six-label targets: stage 2, and stage 1 when it keeps the slices with several subtypes.
        self.label_targets = stage == 2 or stage1_multi == "share"
        self.prep = prep
        self.cache = cache
        self.augment = augment
        self.on_error = on_error
        self._warned: set[str] = set()

        rows = index
        # Neighbours come from every row given, before stage 1 drops the slices with 2+ subtypes:
        # those are still the anatomy next to the slices that stay.
        neighbours = None
        if prep.context:
            usable = index if cache is None else index[~index["image_id"].isin(cache.failed)]
            neighbours = context_ids(usable, prep.context)
        if not self.label_targets:
            # -1 marks 2+ subtypes; unlabeled rows (NA) stay, with an ignored target.
            classes = pd.to_numeric(rows["stage1_class"], errors="coerce").astype("float64")
            rows = rows[(classes != -1).to_numpy()]
        self.excluded_ids: tuple[str, ...] = ()
        self._positions: np.ndarray | None = None
        if cache is not None:
            rows = self._match_cache(rows, cache)
        self.index = rows.reset_index(drop=True)
        self.image_ids = self.index["image_id"].astype(str).to_numpy()
        self.paths = self.index["path"].astype(str).to_numpy()
        self.targets = self._targets(self.index)
        self.context_ids: list[tuple[str, ...]] | None = None
        self._context_positions: np.ndarray | None = None
        self._paths_by_id: dict[str, str] = {}
        if neighbours is not None:
            self.context_ids = [neighbours[i] for i in self.image_ids]
            if cache is not None and self.context_ids:
                flat = cache.positions([i for stack in self.context_ids for i in stack])
                self._context_positions = flat.reshape(len(self.context_ids), prep.slices)
                if (flat < 0).any():  # rows absent from the cache were refused above; this is a last guard
                    raise DatasetError("a neighbour slice is not in the cache; build the cache over the whole index")
            else:
                self._paths_by_id = dict(zip(index["image_id"].astype(str), index["path"].astype(str), strict=True))

    def _match_cache(self, rows: pd.DataFrame, cache: SliceCache) -> pd.DataFrame:
        if cache.prep.key() != self.prep.key():  # the key leaves context out: stacks come from per-slice rows
            raise DatasetError(
                f"the cache holds slices prepared as {cache.prep.key()}, but this dataset wants {self.prep.key()}"
            )
        positions = cache.positions(rows["image_id"].astype(str).tolist())
        if (positions < 0).any():
            absent = rows["image_id"].to_numpy()[positions < 0]
            raise DatasetError(
                f"{len(absent)} images are not in the cache (for example {list(absent[:3])}); "
                "build the cache over an index that includes them"
            )
        failed = rows["image_id"].isin(cache.failed).to_numpy()
        if failed.any():
            self.excluded_ids = tuple(rows["image_id"].to_numpy()[failed])
            log.warning(
                "%d slices that failed to decode are excluded: %s",
                len(self.excluded_ids),
                describe_ids(self.excluded_ids),
            )
        self._positions = positions[~failed]
        return rows[~failed]

    def _targets(self, rows: pd.DataFrame) -> np.ndarray:
        if not self.label_targets:
            classes = pd.to_numeric(rows["stage1_class"], errors="coerce").astype("float64")
            return classes.fillna(IGNORE_INDEX).to_numpy().astype(np.int64)
        return rows[list(LABELS)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.image_ids)

    def prepared(self, i: int) -> np.ndarray:
        """The deterministic uint8 model input of item ``i`` (cached or decoded now): (C, S, S), or the
        stack of its neighbours (C (2k + 1), S, S) with ``prep.context`` k."""
        if self._context_positions is not None and self.cache is not None:
            return stack_context([self.cache.read(int(p)) for p in self._context_positions[i]])
        if self._positions is not None and self.cache is not None:
            return self.cache.read(int(self._positions[i]))
        centre = self._decode(str(self.image_ids[i]), self.paths[i])
        if self.context_ids is None:
            return centre
        return stack_context([centre if other == self.image_ids[i] else self._neighbour(other, centre)
                              for other in self.context_ids[i]])

    def _decode(self, image_id: str, path: str) -> np.ndarray:
        from hemorrhage_core.dicom import read_slice

        return self.prep(read_slice(self.data_dir / path, image_id=image_id).hu)

    def _neighbour(self, image_id: str, centre: np.ndarray) -> np.ndarray:
        try:
            return self._decode(image_id, self._paths_by_id[image_id])
        except (DicomReadError, OSError) as exc:  # a missing neighbour must not lose the slice
            if image_id not in self._warned:
                self._warned.add(image_id)
                log.warning("neighbour %s unreadable, the slice is repeated in its place: %s", image_id, exc)
            return centre

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        image_id = str(self.image_ids[i])
        try:
            image = to_tensor(self.prepared(i))
        except (DicomReadError, OSError) as exc:
            if self.on_error == "raise":
                raise
            if image_id not in self._warned:  # once per id and process, not once per epoch
                self._warned.add(image_id)
                log.warning("skipping %s: %s", image_id, exc)
            return None
        if self.augment is not None:
            image = self.augment(image)
        return image, torch.from_numpy(np.array(self.targets[i])), image_id

    def __repr__(self) -> str:
        source = f"cache={self.cache.directory}" if self.cache is not None else "uncached"
        return f"SliceDataset(n={len(self)}, stage={self.stage}, prep={self.prep.key()}, {source})"
