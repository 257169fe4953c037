"""Synthetic head-CT phantoms written as real DICOM files in the RSNA 2019 layout.

``render_slice`` is the pure part (a patient and a slice index -> HU and labels true to the pixels);
``write_dataset`` renders many patients in parallel and writes the files, the label CSV and synth.json.
"""

from hemorrhage_core.synthetic.dataset import SynthSummary, write_dataset
from hemorrhage_core.synthetic.phantom import (
    PatientPhantom,
    PhantomConfig,
    RenderedSlice,
    render_series,
    render_slice,
    sample_patient,
)

__all__ = [
    "PatientPhantom",
    "PhantomConfig",
    "RenderedSlice",
    "SynthSummary",
    "render_series",
    "render_slice",
    "sample_patient",
    "write_dataset",
]
