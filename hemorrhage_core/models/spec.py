"""The architecture of a model as data: what a checkpoint stores and ``build_model`` reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

STN_MODES: tuple[str, ...] = ("similarity", "affine", "none")

# Sizes of the added fully connected layers before the 6-way output layer. hidden[0] is the "first
# added layer" Model2 inherits from Model1, so both defaults share it. Stage 1: 2 added layers
# (hidden[0] + output); stage 2: Model1's first layer + 3 added layers (hidden[1], hidden[2], output).
DEFAULT_HIDDEN: Mapping[int, tuple[int, ...]] = {1: (256,), 2: (256, 128, 64)}
DEFAULT_DROPOUT = 0.3


@dataclass(frozen=True)
class ModelSpec:
    """Backbone, stage, backbone input size, STN kind, head sizes and 2.5D context of one model.

    ``context`` k: the input stacks the slice and k neighbours on each side (``SlicePrep.context``), so
    the model takes ``in_channels`` = 3 (2k + 1) channels; 0 is the original report's one slice.

    ``input_size`` None means the backbone's registry default (224, or 299 for inception_v3);
    ``hidden`` None means ``DEFAULT_HIDDEN[stage]``. Both are resolved on construction, so two specs
    describing the same model compare equal and ``to_dict`` is explicit.
    """

    backbone: str
    stage: int
    input_size: int | None = None
    stn: str = "similarity"
    hidden: tuple[int, ...] | None = None
    dropout: float = DEFAULT_DROPOUT
    context: int = 0

    def __post_init__(self) -> None:
        # Imported here: the registry imports torchvision, and spec must stay cheap for the CLI.
        from hemorrhage_core.models.backbones import get_backbone

        info = get_backbone(self.backbone)
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 (multi-class) or 2 (multi-label), got {self.stage!r}")
        if self.stn not in STN_MODES:
            raise ValueError(f"unknown STN mode {self.stn!r}; known: {', '.join(STN_MODES)}")
        size = info.default_size if self.input_size is None else int(self.input_size)
        if size < info.min_size:
            raise ValueError(
                f"{self.backbone} needs an input of at least {info.min_size} px, got {size} px"
            )
        hidden = DEFAULT_HIDDEN[self.stage] if self.hidden is None else tuple(int(h) for h in self.hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must hold at least one positive layer size, got {self.hidden!r}")
        if self.stage == 2 and len(hidden) < 2:
            raise ValueError("a stage-2 head needs Model1's first layer plus at least one more: len(hidden) >= 2")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        from hemorrhage_core.preprocess import MAX_CONTEXT

        if isinstance(self.context, bool) or int(self.context) != self.context or not 0 <= int(self.context) <= MAX_CONTEXT:
            raise ValueError(f"context must be a whole number of slices from 0 to {MAX_CONTEXT}, got {self.context!r}")
        object.__setattr__(self, "context", int(self.context))
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "stage", int(self.stage))

    @property
    def slices(self) -> int:
        """Slices in one input: the slice and ``context`` neighbours on each side."""
        return 2 * self.context + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (lists, ints, floats, strings): what checkpoints and run records store."""
        out = asdict(self)
        out["hidden"] = list(self.hidden or ())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``; unknown keys fail so a newer file is not silently misread."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        kwargs = dict(data)
        if kwargs.get("hidden") is not None:
            kwargs["hidden"] = tuple(kwargs["hidden"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
