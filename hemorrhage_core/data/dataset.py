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
from hemorrhage_core.errors import DatasetError, DicomReadError
from hemorrhage_core.labels import LABELS
from hemorrhage_core.preprocess import SlicePrep, to_tensor

log = logging.getLogger(__name__)

# Stage-1 target of an unlabeled image: PyTorch's CrossEntropyLoss ignores this index by default.
IGNORE_INDEX = -100


class SliceDataset(Dataset):
    """One item per index row: ``(image (C, S, S) float32 in [0, 1], target, image_id)``.

    Stage 1 (multi-class): rows with two or more subtypes are dropped; the target is the int64
    class index in STAGE1_CLASSES (``IGNORE_INDEX`` for unlabeled rows). Stage 2 (multi-label): the
    target is the float32 tensor of the six labels (NaN for unlabeled rows).

    The deterministic part (decode, crop, window, resize, uint8: ``prep``) comes from ``cache`` when
    given, else from ``read_slice`` + ``prep``; both give identical tensors. ``augment`` runs after it.
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
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.data_dir = Path(data_dir)
        self.stage = stage
        self.prep = prep
        self.cache = cache
        self.augment = augment
        self.on_error = on_error
        self._warned: set[str] = set()

        rows = index
        if stage == 1:
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

    def _match_cache(self, rows: pd.DataFrame, cache: SliceCache) -> pd.DataFrame:
        if cache.prep.key() != self.prep.key():
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
        if self.stage == 1:
            classes = pd.to_numeric(rows["stage1_class"], errors="coerce").astype("float64")
            return classes.fillna(IGNORE_INDEX).to_numpy().astype(np.int64)
        return rows[list(LABELS)].to_numpy(dtype=np.float32)

    def __len__(self) -> int:
        return len(self.image_ids)

    def prepared(self, i: int) -> np.ndarray:
        """The deterministic uint8 (C, S, S) slice of item ``i`` (cached or decoded now)."""
        if self._positions is not None and self.cache is not None:
            return self.cache.read(int(self._positions[i]))
        from hemorrhage_core.dicom import read_slice

        ct = read_slice(self.data_dir / self.paths[i], image_id=str(self.image_ids[i]))
        return self.prep(ct.hu)

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
