"""Driving one organisation's worker over its control calls: what its Flower client (or the
coordinator, in ``verify``) does once per round or step, never per micro-batch. Weights travel
as torch tensors, or as NumPy arrays (``payload=ARRAYS``: a ClientApp relaying Flower's arrays,
which then never imports torch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..runtime.round_spec import RoundSpec
from ..transport.channel import DataPlaneChannel
from ..transport.framing import Payload
from ..transport.proto import dataplane_pb2 as pb
from ..transport.protocol import COORDINATOR, Named
from ..transport.security import TLSConfig
from .round_messages import spec_to_proto

__all__ = ["COORDINATOR", "WorkerControl"]


class WorkerControl:
    def __init__(
        self,
        org: str,
        address: str,
        *,
        caller: str,
        run: str,
        tls: TLSConfig | None,
        token: str | None,
        timeout: float = 60.0,
        payload: Payload | None = None,
    ):
        self.org, self.run = org, run
        self.channel = DataPlaneChannel(
            org, address, caller=caller, tls=tls, token=token, timeout=timeout, payload=payload
        )

    def call(
        self, control: pb.Control, tensors: Named = (), timeout: float | None = None
    ) -> tuple[dict[str, float], Named]:
        """One control call: the reply's metrics and tensors."""
        header = pb.CallHeader(run=self.run, phase=pb.CONTROL, control=control)
        reply, out = self.channel.exchange(header, list(tensors), timeout=timeout)
        return dict(reply.metrics), out

    def connect(self, addresses: Mapping[str, str]) -> None:
        self.call(pb.Control(connect=pb.Connect(addresses=dict(addresses))))

    def begin(self, spec: RoundSpec, weights: Mapping[str, Any]) -> None:
        self.call(pb.Control(begin=spec_to_proto(spec)), list(weights.items()))

    def wait(self, timeout: float) -> dict[str, float]:
        """Block until the organisation's part of the round is done; the round's metrics."""
        return self.call(pb.Control(wait=pb.Wait(timeout_s=timeout)), timeout=timeout + self.channel.timeout)[0]

    def train_batch(self, step: int, tokens: Any, labels: Any) -> dict[str, float]:
        """A data owner's batch of ``step`` forward and backward (``verify``); its metrics."""
        control = pb.Control(train_batch=pb.TrainBatch(step=step))
        return self.call(control, [("tokens", tokens), ("labels", labels)])[0]

    def apply_step(self, step: int, timeout: float | None = None) -> dict[str, float]:
        """Apply a step's update; its learning rate (and with clipping, gradient norm and factor)."""
        return self.call(pb.Control(apply_step=pb.ApplyStep(step=step)), timeout=timeout)[0]

    def state(self) -> dict[str, Any]:
        """The worker's trained weights, in the channel's payload (tensors, or arrays)."""
        return {k: self.channel.payload.own(v) for k, v in self.call(pb.Control(read_state=pb.ReadState()))[1]}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.call(pb.Control(load_state=pb.LoadState()), list(state.items()))

    def traffic(self) -> dict[str, float]:
        return self.call(pb.Control(read_traffic=pb.ReadTraffic()))[0]

    def memory(self) -> dict[str, float]:
        """The worker's peak memory: its process's RSS and, on a GPU, what torch allocated there."""
        return self.call(pb.Control(read_memory=pb.ReadMemory()))[0]

    def end_run(self) -> None:
        """Say the run is over: a deployed client then stops serving and exits."""
        self.call(pb.Control(end_run=pb.EndRun()))

    def close(self) -> None:
        self.channel.close()
