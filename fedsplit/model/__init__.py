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
    chunked_cross_entropy,
    cross_entropy,
    parameter_count,
    parameter_shapes,
    rope_tables,
    run_block,
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
    "chunked_cross_entropy",
    "cross_entropy",
    "parameter_count",
    "parameter_shapes",
    "rope_tables",
    "run_block",
    "training_loss",
]
