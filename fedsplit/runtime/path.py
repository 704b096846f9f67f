"""A data owner's path through the split model: the organisations its micro-batches visit."""

from __future__ import annotations

from ..plan import Plan, Unit
from .ops import Block, SegmentOp


def segments(plan: Plan, data_owner: str) -> list[tuple[str, SegmentOp]]:
    """The data owner's path: (organisation, segment) for each run of consecutive blocks
    (``embed``, layers, ``final_norm``, ``lm_head``) that one organisation computes."""
    route = plan.route(data_owner)
    blocks: list[tuple[Block, str]] = [("embed", route[Unit("embed")])]
    blocks += [(i, route[Unit("router", i)]) for i in range(plan.model.num_layers)]
    blocks += [("final_norm", route[Unit("final_norm")]), ("lm_head", route[Unit("lm_head")])]
    path: list[tuple[str, list[Block]]] = []
    for block, org in blocks:
        if path and path[-1][0] == org:
            path[-1][1].append(block)
        else:
            path.append((org, [block]))
    return [(org, SegmentOp(tuple(b))) for org, b in path]
