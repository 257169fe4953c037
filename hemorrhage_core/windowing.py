"""CT window presets and the multi-channel window stack fed to ImageNet backbones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units: values map linearly from [center - width/2, center + width/2]."""

    name: str
    center: float
    width: float

    def __post_init__(self) -> None:
        if not self.width > 0:
            raise ValueError(f"window {self.name!r}: width must be positive, got {self.width}")

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Map HU to float32 in [0, 1], clipping outside the window."""
        out = (np.asarray(hu, dtype=np.float32) - np.float32(self.low)) / np.float32(self.width)
        return np.clip(out, 0.0, 1.0, out=out)

    def to_dict(self) -> dict:
        return {"name": self.name, "center": float(self.center), "width": float(self.width)}


# Centre/width in HU, as in rsna-notes.md.
PRESETS: Mapping[str, Window] = {
    "brain": Window("brain", 40.0, 80.0),
    "subdural": Window("subdural", 80.0, 200.0),
    "soft_tissue": Window("soft_tissue", 40.0, 380.0),
    "bone": Window("bone", 600.0, 2800.0),
}


@dataclass(frozen=True)
class WindowStack:
    """An ordered tuple of windows; one output channel per window (RGB for three)."""

    windows: tuple[Window, ...]

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a window stack needs at least one window")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(w.name for w in self.windows)

    @property
    def channels(self) -> int:
        return len(self.windows)

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """HU slice (H, W) -> float32 array (C, H, W) in [0, 1]."""
        return np.stack([w.apply(hu) for w in self.windows], axis=0)

    def apply_uint8(self, hu: np.ndarray, *, channels_last: bool = False) -> np.ndarray:
        """HU slice (H, W) -> uint8 array (C, H, W), or (H, W, C) with ``channels_last``.

        One fused scale-and-offset per channel straight to 0..255 (round half up): about 3x faster
        than ``apply`` followed by a multiply, which matters on the uncached training path.
        """
        hu = np.asarray(hu, dtype=np.float32)
        out = np.empty((self.channels, *hu.shape), dtype=np.float32)
        for plane, window in zip(out, self.windows):
            scale = np.float32(255.0 / window.width)
            np.multiply(hu, scale, out=plane)
            np.add(plane, np.float32(0.5) - np.float32(window.low) * scale, out=plane)
            np.clip(plane, 0.0, 255.5, out=plane)
        if channels_last:
            out = np.moveaxis(out, 0, -1)
        return out.astype(np.uint8)

    def to_list(self) -> list[dict]:
        return [w.to_dict() for w in self.windows]

    @classmethod
    def from_list(cls, items: Iterable[Mapping | str]) -> "WindowStack":
        """Build from preset names and/or ``{"name", "center", "width"}`` mappings (run configs, checkpoints)."""
        windows = []
        for item in items:
            if isinstance(item, str):
                windows.append(preset(item))
            else:
                windows.append(Window(str(item["name"]), float(item["center"]), float(item["width"])))
        return cls(tuple(windows))

    def key(self) -> str:
        """A short stable string identifying the stack, used to invalidate caches."""
        return "-".join(f"{w.name}{w.center:g}x{w.width:g}" for w in self.windows)


def preset(name: str) -> Window:
    """Look up a named preset; unknown names fail with the list of known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown window {name!r}; known: {', '.join(PRESETS)}") from None


DEFAULT_STACK = WindowStack((PRESETS["brain"], PRESETS["subdural"], PRESETS["bone"]))
