"""Executes training steps of the whole model across partitions, through one peer interface
whether the partitions are in this process or across the network."""

from .batches import synthetic_batches
from .calls import CallKey, Peer
from .reference import MonolithicTrainer
from .split import InProcessFederation
from .worker import Worker, segments

__all__ = ["CallKey", "InProcessFederation", "MonolithicTrainer", "Peer", "Worker", "segments", "synthetic_batches"]
