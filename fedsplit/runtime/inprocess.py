"""Split training of the whole federation in one process: every organisation's worker, wired
to the others through in-process peers. The gRPC runtime wires the same workers over the wire."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..plan import Partition, Plan, reassemble, select
from .worker import Worker


class InProcessFederation:
    """Every organisation in this process. Micro-batches run one after another by default
    (``schedule="sequential"``): with all organisations sharing one process, a pipelined schedule
    gains nothing, and torch's intra-op thread pools in concurrent threads would make rounding
    depend on timing. Pass ``schedule`` to exercise another one."""

    def __init__(
        self, plan: Plan, weights: Mapping[str, Tensor], device: str | None = None, schedule: str = "sequential"
    ):
        self.plan, self.schedule = plan, schedule
        self.workers = {org: Worker(plan, org, select(weights, plan.slices_of(org)), device) for org in plan.orgs}
        for w in self.workers.values():
            w.connect(self.workers)

    def train_step(self, step: int, batches: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
        """One optimizer step: every data owner's batch forward and backward, then every
        organisation steps its partitions."""
        metrics = {
            d: self.workers[d].train_batch(step, *batches[d], schedule=self.schedule) for d in self.plan.data_owners
        }
        for w in self.workers.values():
            w.share_replica_grads(step)
        for w in self.workers.values():
            w.gather_replica_grads(step)
            w.step()
        return metrics

    def replicas(self, partition: Partition) -> dict[str, dict[str, Tensor]]:
        return {org: self.workers[org].partition_state(partition) for org in partition.holders}

    def load_partition(self, partition: Partition, state: Mapping[str, Tensor]) -> None:
        for org in partition.holders:
            self.workers[org].load_state(state)

    def reassembled(self) -> dict[str, Tensor]:
        """The full model, taking each partition from its first holder (so average replicas
        first when the replicas' own weights matter)."""
        return reassemble(
            self.plan.model, [self.workers[p.holders[0]].partition_state(p) for p in self.plan.partitions]
        )
