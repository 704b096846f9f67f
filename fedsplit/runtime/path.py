"""A data owner's path through the split model: the organisations its micro-batches visit."""

from __future__ import annotations

from ..plan import Plan
from .ops import SegmentOp


def segments(plan: Plan, data_owner: str) -> list[tuple[str, SegmentOp]]:
    """The data owner's path (:meth:`.Plan.path`) as the operation each organisation on it runs."""
    return [(org, SegmentOp(blocks)) for org, blocks in plan.path(data_owner)]
