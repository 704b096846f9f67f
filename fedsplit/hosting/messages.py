"""Typed values to data-plane messages and back: the one encoder and the one parser of operations
(round specs: :mod:`.round_messages`). A malformed message is a :class:`MessageError`
(``INVALID_ARGUMENT`` for the caller), raised here, before a worker sees the call."""

from __future__ import annotations

from ..runtime.ops import ExpertsOp, HeadsOp, Op, SegmentOp, SharedOp
from ..transport.proto import dataplane_pb2 as pb
from .round_messages import MessageError

MAX_TASK_NAME = 64  # as a plan's task names


def op_to_proto(op: Op) -> pb.Operation:
    if isinstance(op, SegmentOp):
        return pb.Operation(
            segment=pb.Segment(
                embed="embed" in op.blocks,
                layers=list(op.layers),
                final_norm="final_norm" in op.blocks,
                lm_head="lm_head" in op.blocks,
                task=op.task or "",
            )
        )
    if isinstance(op, HeadsOp):
        return pb.Operation(heads=pb.HeadGroup(layer=op.layer, kv_start=op.kv_heads[0], kv_stop=op.kv_heads[1]))
    if isinstance(op, ExpertsOp):
        return pb.Operation(
            experts=pb.ExpertRows(layer=op.layer, experts=list(op.experts), rows=[n for _, n in op.rows])
        )
    return pb.Operation(shared=pb.SharedExperts(layer=op.layer))


def op_from_proto(msg: pb.Operation) -> Op:
    """The operation a call carries, checked for what holds whatever the model: non-negative
    indices, ascending consecutive layers, non-empty head ranges, each expert once with rows."""
    kind = msg.WhichOneof("kind")
    if kind == "segment":
        s = msg.segment
        layers = tuple(s.layers)
        if any(a < 0 for a in layers) or any(b != a + 1 for a, b in zip(layers, layers[1:])):
            raise MessageError(f"a segment's layers must be ascending and consecutive, got {_cut(layers)}")
        blocks = (("embed",) if s.embed else ()) + layers + (("final_norm",) if s.final_norm else ())
        if s.lm_head and s.task:
            raise MessageError("a segment ends with the LM head or a task head, not both")
        if len(s.task) > MAX_TASK_NAME:
            raise MessageError(f"a task name has at most {MAX_TASK_NAME} characters, got {len(s.task)}")
        blocks += ("lm_head",) if s.lm_head else ("task_head",) if s.task else ()
        if not blocks:
            raise MessageError("a segment must name at least one block")
        return SegmentOp(blocks, s.task or None)
    if kind == "heads":
        h = msg.heads
        if h.layer < 0 or not 0 <= h.kv_start < h.kv_stop:
            raise MessageError(
                f"a head group needs a layer >= 0 and KV heads 0 <= start < stop, got {h.layer}, "
                f"{h.kv_start}-{h.kv_stop}"
            )
        return HeadsOp(h.layer, (h.kv_start, h.kv_stop))
    if kind == "experts":
        x = msg.experts
        if x.layer < 0 or len(x.experts) != len(x.rows) or not x.experts:
            raise MessageError("an expert call needs a layer >= 0 and as many row counts as experts (at least one)")
        if len(set(x.experts)) != len(x.experts) or min(x.experts) < 0:
            raise MessageError(f"an expert call must name distinct experts >= 0, got {_cut(tuple(x.experts))}")
        if min(x.rows) <= 0:
            raise MessageError("every expert of an expert call must receive at least one row")
        return ExpertsOp(x.layer, tuple(zip(x.experts, x.rows)))
    if kind == "shared":
        if msg.shared.layer < 0:
            raise MessageError(f"layer {msg.shared.layer} is negative")
        return SharedOp(msg.shared.layer)
    raise MessageError("the call names no operation")


def _cut(values: tuple) -> str:
    text = ", ".join(map(str, values[:16]))
    return text + (", ..." if len(values) > 16 else "")
