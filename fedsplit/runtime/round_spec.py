"""What a round is, as the coordinator tells every organisation: a plain value with nothing to
import, so that a process that only relays it (a deployed ClientApp) starts without torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundSpec:
    round: int
    first_step: int
    steps: int
    data_owners: tuple[str, ...]  # those training this round (live ones)
    restore_round: int  # last complete round: the optimizer state every worker must start from
    evaluate: bool = False  # data owners evaluate the received weights on held-out data first
    attempt: int = 0  # a round rerun without the organisations that are gone is a new attempt of it
    # Data owners also evaluate the weights after the last step: the run's final model when
    # nothing changes them after the round (see federation.aggregate.unchanged_after_rounds).
    evaluate_after: bool = False

    @property
    def id(self) -> tuple[int, int]:
        return (self.round, self.attempt)

    @property
    def last_step(self) -> int:
        return self.first_step + self.steps - 1
