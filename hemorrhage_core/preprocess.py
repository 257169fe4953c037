"""The deterministic slice preprocessing shared by the Dataset, its cache and the Predictor.

HU slice -> window stack -> uint8 -> resize to ``image_size`` -> uint8 (C, S, S). The cached and the
uncached path both run exactly this, so they return identical tensors; the model then resamples
(through the STN) to its backbone's input size and normalises inside itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hemorrhage_core.windowing import DEFAULT_STACK, WindowStack

# Bump when the output of prepare_slice changes, so preprocessed caches built earlier are rebuilt.
PREPROCESS_VERSION = 2


def prepare_slice(hu: np.ndarray, image_size: int, windows: WindowStack = DEFAULT_STACK) -> np.ndarray:
    """HU slice (H, W) -> uint8 array (C, image_size, image_size), windowed then resized.

    Windowing first keeps the resize from blending air and bone into brain-window values. The resize
    runs on uint8 with the channels interleaved and padded to four, torch's fastest antialiased path
    (about 2x planar uint8, 10x float32); each channel is resized on its own, so the padding changes
    no value.
    """
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D HU slice, got shape {hu.shape}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    channels = windows.channels
    if channels <= 4:
        hwc = windows.apply_uint8_rgba(hu)
    else:
        hwc = np.moveaxis(windows.apply_uint8(hu), 0, -1)
    if hwc.shape[:2] == (image_size, image_size):
        return np.ascontiguousarray(np.moveaxis(hwc[..., :channels], -1, 0))
    x = torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)  # (1, C, H, W), channels-last when padded
    # antialias matters when shrinking 512 -> 128: without it thin SAH lines alias away.
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return np.ascontiguousarray(x[0, :channels].numpy())


def to_tensor(prepared: np.ndarray) -> torch.Tensor:
    """uint8 (C, S, S) -> float32 tensor in [0, 1], the model's input contract."""
    return torch.from_numpy(np.ascontiguousarray(prepared)).float().div_(255.0)
