"""What the coordinator tells each organisation per round, as a typed Flower ``ConfigRecord``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ConfigRecord

from ..runtime.round_spec import RoundSpec


@dataclass(frozen=True)
class RoundConfig:
    run: str  # the run the organisation's worker serves calls of
    spec: RoundSpec
    wait_s: float  # how long the organisation's client waits for its part of the round
    addresses: Mapping[str, str]  # every live organisation's data-plane address

    def record(self) -> ConfigRecord:
        s = self.spec
        return ConfigRecord(
            {
                "run": self.run,
                "round": s.round,
                "first-step": s.first_step,
                "steps": s.steps,
                "data-owners": list(s.data_owners),
                "restore-round": s.restore_round,
                "evaluate": s.evaluate,
                "attempt": s.attempt,
                "evaluate-after": s.evaluate_after,
                "wait-s": float(self.wait_s),
                "orgs": list(self.addresses),
                "addresses": list(self.addresses.values()),
            }
        )

    @classmethod
    def of(cls, record: ConfigRecord) -> RoundConfig:
        spec = RoundSpec(
            int(record["round"]),
            int(record["first-step"]),
            int(record["steps"]),
            tuple(str(d) for d in record["data-owners"]),
            int(record["restore-round"]),
            bool(record["evaluate"]),
            int(record["attempt"]),
            bool(record["evaluate-after"]),
        )
        addresses = dict(zip(map(str, record["orgs"]), map(str, record["addresses"])))
        return cls(str(record["run"]), spec, float(record["wait-s"]), addresses)
