"""The MoE transformer: configuration and maths, with no knowledge of plans or networks."""

from .config import ModelConfig
from .moe import (
    Attention,
    Block,
    Experts,
    MoE,
    MoETransformer,
    RMSNorm,
    SharedExperts,
    SwiGLU,
    cross_entropy,
    parameter_count,
    parameter_shapes,
    rope_tables,
    training_loss,
)

__all__ = [
    "Attention",
    "Block",
    "Experts",
    "MoE",
    "MoETransformer",
    "ModelConfig",
    "RMSNorm",
    "SharedExperts",
    "SwiGLU",
    "cross_entropy",
    "parameter_count",
    "parameter_shapes",
    "rope_tables",
    "training_loss",
]
