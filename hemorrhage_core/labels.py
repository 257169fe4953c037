"""Label names and order: the single source for every module, file and plot."""

from __future__ import annotations

# RSNA 2019 order of meaning; ``any`` is the OR of the five subtypes.
SUBTYPES: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
LABELS: tuple[str, ...] = SUBTYPES + ("any",)

# The abbreviations radiologists write (epidural -> EDH), for table headers and tiles.
SHORT_NAMES: dict[str, str] = {"epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
                               "subarachnoid": "SAH", "subdural": "SDH", "any": "any"}

# Stage 1 is multi-class: no hemorrhage, or exactly one subtype.
STAGE1_CLASSES: tuple[str, ...] = ("none",) + SUBTYPES

# Weights of the RSNA challenge metric (weighted multi-label log loss): ``any`` counts twice.
LABEL_WEIGHTS: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 2.0)


def stage1_class(label_row: dict[str, int] | list[int] | tuple[int, ...]) -> int | None:
    """Return the stage-1 class index for one image's six labels, or None if it has 2+ subtypes.

    ``label_row`` is a mapping by label name or a sequence in ``LABELS`` order.
    """
    if isinstance(label_row, dict):
        flags = [int(label_row[name]) for name in SUBTYPES]
    else:
        flags = [int(v) for v in list(label_row)[: len(SUBTYPES)]]
    positives = [i for i, v in enumerate(flags) if v]
    if not positives:
        return 0
    if len(positives) == 1:
        return positives[0] + 1
    return None


def consistent_labels(probabilities):
    """(N, 6) or (6,) probabilities in ``LABELS`` order -> a copy with every subtype at most ``any``.

    The six outputs are independent sigmoids, so a model can say epidural 0.9 and any 0.1, which no
    reader can act on. ``any`` is the OR of the subtypes, so no subtype is likelier than it; the rule
    keeps ``any`` and lowers a subtype above it to its value (``subtype = min(subtype, any)``), the
    hierarchy constraint of coherent multi-label classifiers. ``any`` is the one output trained on every
    bleed slice, and the better one in every measurement (docs/model-card.md); raising it to the
    subtypes instead (``any = max(any, subtypes)``, this rule before) let a subtype's false alarms on
    slices without blood raise ``any``. Applied after calibration, to what a prediction reports.
    """
    import numpy as np

    out = np.array(probabilities, dtype=np.float64, copy=True)
    any_col = LABELS.index("any")
    n = len(SUBTYPES)
    out[..., :n] = np.minimum(out[..., :n], out[..., any_col : any_col + 1])
    return out
