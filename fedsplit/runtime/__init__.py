"""Executes training steps of the whole model across partitions, through one peer interface
whether the partitions are in this process or across the network.

The names below are imported on first use (PEP 562), not with the package: a module of it that
needs no torch (:mod:`.round_spec`) can then be imported by a process that has none loaded."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_WHERE = {
    "CallKey": ".calls",
    "Federation": ".protocols",
    "InProcessFederation": ".inprocess",
    "MonolithicTrainer": ".reference",
    "Peer": ".protocols",
    "Worker": ".worker",
    "initial_weights": ".weights",
    "segments": ".path",
    "synthetic_batches": ".batches",
}

__all__ = [
    "CallKey",
    "Federation",
    "InProcessFederation",
    "MonolithicTrainer",
    "Peer",
    "Worker",
    "initial_weights",
    "segments",
    "synthetic_batches",
]

if TYPE_CHECKING:
    from .batches import synthetic_batches
    from .calls import CallKey
    from .inprocess import InProcessFederation
    from .path import segments
    from .protocols import Federation, Peer
    from .reference import MonolithicTrainer
    from .weights import initial_weights
    from .worker import Worker


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
