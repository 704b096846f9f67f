"""Executes training steps of the whole model across partitions, through one peer interface
whether the partitions are in this process or across the network."""

from .batches import synthetic_batches
from .calls import CallKey
from .inprocess import InProcessFederation
from .path import segments
from .protocols import Federation, Peer
from .reference import MonolithicTrainer
from .weights import initial_weights
from .worker import Worker

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
