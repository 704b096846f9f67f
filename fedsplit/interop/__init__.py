"""Checkpoints in and out: Hugging Face MoE (and Llama) directories, fedsplit model directories,
reading only the slices an organisation holds, and dense-to-MoE upcycling.

Depends on the model alone (no plans, no networks) and never imports ``transformers``.
"""

from .directory import (
    TASK_HEADS_FILE,
    ModelCheckpoint,
    is_model_directory,
    open_checkpoint,
    save_fedsplit,
    save_hf,
    save_hf_classifier,
)
from .errors import CheckpointError
from .hf_config import ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "ModelCheckpoint",
    "is_model_directory",
    "open_checkpoint",
    "save_fedsplit",
    "save_hf",
    "save_hf_classifier",
    "TASK_HEADS_FILE",
]
