"""A data owner's path through the split model: the organisations its micro-batches visit."""

from __future__ import annotations

from ..plan import Plan
from .ops import SegmentOp


def segments(plan: Plan, data_owner: str) -> list[tuple[str, SegmentOp]]:
    """The data owner's path (:meth:`.Plan.path`) as the operation each organisation on it runs."""
    task = plan.orgs[data_owner].task
    return [(org, SegmentOp(blocks, task if "task_head" in blocks else None)) for org, blocks in plan.path(data_owner)]
