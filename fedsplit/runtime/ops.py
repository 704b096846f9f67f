"""Data-plane operations: what one call asks of the organisation it reaches, as typed values.

A caller builds one of these per call; :mod:`fedsplit.hosting.messages` encodes it as the
``Operation`` message of ``protos/fedsplit/v1/dataplane.proto`` and parses it back once, where
the call arrives. Nothing downstream reads text. Each operation also says which tensors it takes
(:meth:`inputs`), so that a callee checks a call before computing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..model import ModelConfig

End = Literal["embed", "final_norm", "lm_head", "task_head"]
Block = int | End  # a layer index, or one of the model's ends


@dataclass(frozen=True)
class Shape:
    """What a micro-batch looks like in a run: the sizes every tensor of a call is checked against."""

    model: ModelConfig
    micro_batch: int  # sequences per micro-batch
    seq_len: int  # the longest sequence
    activations: torch.dtype = torch.float32  # dtype of hidden states and of their gradients

    @property
    def rows(self) -> int:
        """Token rows of one micro-batch (its sequences times the longest length)."""
        return self.micro_batch * self.seq_len


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor of an operation: its dtype and, per dimension, its size (an int) or the
    inclusive range it may take."""

    what: str
    dtype: torch.dtype
    dims: tuple[int | tuple[int, int], ...]

    def admits(self, t: torch.Tensor) -> bool:
        if t.dtype != self.dtype or t.dim() != len(self.dims):
            return False
        return all(n == d if isinstance(d, int) else d[0] <= n <= d[1] for n, d in zip(t.shape, self.dims))

    def __str__(self) -> str:
        dims = ", ".join(
            str(d) if isinstance(d, int) else (f"<= {d[1]}" if d[0] <= 1 else f"{d[0]}-{d[1]}") for d in self.dims
        )
        return f"{self.what} ({dims}) of {self.dtype}"


def _hidden(shape: Shape) -> TensorSpec:
    return TensorSpec(
        "hidden states", shape.activations, (shape.micro_batch, (1, shape.seq_len), shape.model.hidden_size)
    )


@dataclass(frozen=True)
class SegmentOp:
    """Consecutive blocks of a data owner's path (``embed``, layers, ``final_norm``, then
    ``lm_head`` or ``task_head``) that one organisation computes: returns the hidden state after
    them (or the loss, with a head) and their summed load-balancing loss. ``task`` names the
    task head of ``task_head``."""

    blocks: tuple[Block, ...]
    task: str | None = None

    def __post_init__(self) -> None:
        if ("task_head" in self.blocks) != (self.task is not None):
            raise ValueError("a segment names its task exactly when it ends with the task head")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(b for b in self.blocks if isinstance(b, int))

    @property
    def takes_labels(self) -> bool:
        return "lm_head" in self.blocks or "task_head" in self.blocks

    def inputs(self, shape: Shape) -> list[TensorSpec]:
        if self.blocks[0] == "embed":
            first = TensorSpec("token ids", torch.int64, (shape.micro_batch, (1, shape.seq_len)))
        else:
            first = _hidden(shape)
        labels = [TensorSpec("labels", torch.int64, first.dims[:2])] if self.takes_labels else []
        return [first, *labels]

    def __str__(self) -> str:
        blocks = (f"tasks.{self.task}" if b == "task_head" else str(b) for b in self.blocks)
        return "segment/" + ",".join(blocks)


@dataclass(frozen=True)
class HeadsOp:
    """The query heads that read KV heads ``kv_heads`` (half-open) of a layer: returns their
    partial ``o_proj`` output, which the layer's owner adds to the other groups'. With attention
    adapters it also takes the codes ``A x`` of the adapted q/k/v and, with o_proj adapted,
    returns ``z``, its share of ``A_o y`` (see :class:`~fedsplit.runtime.partial.HeadGroup`)."""

    layer: int
    kv_heads: tuple[int, int]

    def inputs(self, shape: Shape) -> list[TensorSpec]:
        cfg, hidden = shape.model, _hidden(shape)
        if not cfg.adapted_qkv:
            return [hidden]
        width = len(cfg.adapted_qkv) * cfg.lora.rank
        return [hidden, TensorSpec("adapter codes", shape.activations, (*hidden.dims[:2], width))]

    def __str__(self) -> str:
        return f"heads/{self.layer}/{self.kv_heads[0]}-{self.kv_heads[1]}"


@dataclass(frozen=True)
class ExpertsOp:
    """Routed experts of a layer, with the number of token rows routed to each: one call per
    organisation per layer and micro-batch, its experts' rows concatenated in the order given."""

    layer: int
    rows: tuple[tuple[int, int], ...]  # (expert, rows)

    @property
    def experts(self) -> tuple[int, ...]:
        return tuple(e for e, _ in self.rows)

    @property
    def total_rows(self) -> int:
        return sum(n for _, n in self.rows)

    def inputs(self, shape: Shape) -> list[TensorSpec]:
        return [TensorSpec("rows", shape.activations, (self.total_rows, shape.model.hidden_size))]

    def __str__(self) -> str:
        return f"experts/{self.layer}/" + ",".join(f"{e}:{n}" for e, n in self.rows)


@dataclass(frozen=True)
class SharedOp:
    """The always-active shared experts of a layer, on every token row of the micro-batch."""

    layer: int

    def inputs(self, shape: Shape) -> list[TensorSpec]:
        return [TensorSpec("token rows", shape.activations, ((1, shape.rows), shape.model.hidden_size))]

    def __str__(self) -> str:
        return f"shared/{self.layer}"


Op = SegmentOp | HeadsOp | ExpertsOp | SharedOp
