"""The deterministic slice preprocessing shared by the Dataset, its cache and the Predictor.

HU slice -> window stack -> resize to ``image_size`` -> uint8 (C, S, S). Quantising to uint8 in both
the cached and the uncached path makes them return identical tensors; the model then resamples
(through the STN) to its backbone's input size and normalises inside itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hemorrhage_core.windowing import DEFAULT_STACK, WindowStack


def prepare_slice(hu: np.ndarray, image_size: int, windows: WindowStack = DEFAULT_STACK) -> np.ndarray:
    """HU slice (H, W) -> uint8 array (C, image_size, image_size), windowed then resized.

    Windowing first keeps the resize from blending air and bone into brain-window values.
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D HU slice, got shape {hu.shape}")
    stacked = windows.apply(hu)  # (C, H, W) float32 in [0, 1]
    if stacked.shape[1:] != (image_size, image_size):
        t = torch.from_numpy(stacked).unsqueeze(0)
        # antialias matters when shrinking 512 -> 128: without it thin SAH lines alias away.
        t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        stacked = t.squeeze(0).numpy()
    return np.rint(np.clip(stacked, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_tensor(prepared: np.ndarray) -> torch.Tensor:
    """uint8 (C, S, S) -> float32 tensor in [0, 1], the model's input contract."""
    return torch.from_numpy(np.ascontiguousarray(prepared)).float().div_(255.0)
