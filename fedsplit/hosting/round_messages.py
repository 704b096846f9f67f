"""Round specs to the ``Begin`` control message and back, the one encoder and parser of them,
without torch (a deployed ClientApp forwards them)."""

from __future__ import annotations

from ..runtime.round_spec import RoundSpec
from ..transport.proto import dataplane_pb2 as pb


class MessageError(ValueError):
    """A message that does not describe a valid operation or control call."""


def spec_to_proto(spec: RoundSpec) -> pb.Begin:
    return pb.Begin(
        round=spec.round,
        first_step=spec.first_step,
        steps=spec.steps,
        data_owners=list(spec.data_owners),
        restore_round=spec.restore_round,
        evaluate=spec.evaluate,
        attempt=spec.attempt,
        evaluate_after=spec.evaluate_after,
    )


def spec_from_proto(msg: pb.Begin) -> RoundSpec:
    if msg.round < 1 or msg.first_step < 0 or msg.steps < 0 or not 0 <= msg.restore_round < msg.round:
        raise MessageError(
            f"round {msg.round} (steps {msg.first_step}+{msg.steps}, restoring round {msg.restore_round}) is "
            "not a valid round"
        )
    return RoundSpec(
        msg.round,
        msg.first_step,
        msg.steps,
        tuple(msg.data_owners),
        msg.restore_round,
        msg.evaluate,
        msg.attempt,
        msg.evaluate_after,
    )
