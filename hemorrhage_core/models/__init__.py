"""Models: STN, backbone registry, Model1/Model2 and their builders."""

from hemorrhage_core.models.backbones import BACKBONES, BackboneInfo, backbone_names, get_backbone
from hemorrhage_core.models.net import (
    IN_CHANNELS,
    HemorrhageNet,
    Model1,
    Model2,
    ModelOutput,
    build_model,
    label_scores,
    probabilities,
    stage2_from_stage1,
)
from hemorrhage_core.models.spec import DEFAULT_DROPOUT, DEFAULT_HIDDEN, STN_MODES, ModelSpec
from hemorrhage_core.models.stn import SpatialTransformer

__all__ = [
    "BACKBONES",
    "BackboneInfo",
    "DEFAULT_DROPOUT",
    "DEFAULT_HIDDEN",
    "HemorrhageNet",
    "IN_CHANNELS",
    "Model1",
    "Model2",
    "ModelOutput",
    "ModelSpec",
    "STN_MODES",
    "SpatialTransformer",
    "backbone_names",
    "build_model",
    "get_backbone",
    "label_scores",
    "probabilities",
    "stage2_from_stage1",
]
