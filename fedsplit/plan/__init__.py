"""Partition plans: YAML schema, loading and validation, and slicing the model by plan."""

from .errors import PlanError, Problem
from .loading import load_plan, resolved, resolved_model, resolved_owned_experts, write_resolved
from .plan import Entry, Org, Partition, Plan
from .slicing import ReassemblyError, TensorSlice, reassemble, select, unit_slices
from .units import SelectorError, Unit, parse_selector

__all__ = [
    "Entry",
    "Org",
    "Partition",
    "Plan",
    "PlanError",
    "Problem",
    "ReassemblyError",
    "SelectorError",
    "TensorSlice",
    "Unit",
    "load_plan",
    "parse_selector",
    "reassemble",
    "resolved",
    "resolved_model",
    "resolved_owned_experts",
    "select",
    "unit_slices",
    "write_resolved",
]
