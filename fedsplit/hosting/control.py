"""Driving one organisation's worker over its control operations: what its Flower client (or
the coordinator, in ``verify``) does once per round, never per batch."""

from __future__ import annotations

import json
from collections.abc import Mapping

from torch import Tensor

from ..runtime.rounds import RoundSpec
from ..transport.proto import dataplane_pb2 as pb
from ..transport.security import TLSConfig
from ..transport.service import DataPlaneChannel, Named

COORDINATOR = "coordinator"  # the caller name of the coordinator (and of verify) on the data plane


class WorkerControl:
    """Drives one organisation's worker over its control operations: what that organisation's
    Flower client (or the coordinator, in ``verify``) does once per round, never per batch."""

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
    ):
        self.org, self.run = org, run
        self.channel = DataPlaneChannel(org, address, caller=caller, tls=tls, token=token, timeout=timeout)

    def call(self, op: str, tensors: Named = (), timeout: float | None = None) -> Named:
        """One control operation (``op`` with its argument) and its reply tensors."""
        return self.channel.call(pb.CallHeader(run=self.run, op=op, phase=pb.CONTROL), list(tensors), timeout=timeout)

    def connect(self, addresses: Mapping[str, str]) -> None:
        self.call("connect/" + json.dumps(dict(addresses)))

    def begin(self, spec: RoundSpec, weights: Mapping[str, Tensor]) -> None:
        self.call("begin/" + spec.to_json(), list(weights.items()))

    def wait(self, timeout: float) -> dict[str, float]:
        return {k: float(v) for k, v in self.call(f"wait/{timeout}", timeout=timeout + self.channel.timeout)}

    def state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.call("state")}

    def close(self) -> None:
        self.channel.close()
