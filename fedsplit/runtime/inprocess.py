"""Split training of the whole federation in one process: every organisation's worker, wired to
the others through :class:`~.local.LocalPeer`. :class:`~fedsplit.hosting.processes.ProcessFederation`
runs the same workers in processes of their own, over the data plane."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..plan import Partition, Plan, reassemble, select
from .local import LocalPeer
from .privacy import fresh_noise_keys
from .protocols import Batches
from .threads import compute_pool
from .worker import Worker


class InProcessFederation:
    """Every organisation in this process. Micro-batches run one after another by default
    (``schedule="sequential"``): with all organisations sharing one process, a pipelined schedule
    gains nothing. Pass ``schedule`` to exercise another one."""

    def __init__(
        self,
        plan: Plan,
        weights: Mapping[str, Tensor],
        device: str | None = None,
        schedule: str = "sequential",
        noise_keys: Mapping[str, int] | None = None,
    ):
        """``noise_keys``: each data owner's secret for privacy.activations (default: fresh ones)."""
        self.plan, self.schedule = plan, schedule
        self.frozen = plan.frozen_part(weights)  # never changes
        self.workers = {org: Worker(plan, org, select(weights, plan.slices_of(org)), device) for org in plan.orgs}
        keys = noise_keys if noise_keys is not None else fresh_noise_keys(plan)
        for d in plan.data_owners:
            self.workers[d].data_owner.noise_key = keys[d]
        for w in self.workers.values():
            w.connect({org: LocalPeer(other, caller=w.name) for org, other in self.workers.items()})
        # Holders of replicas kept in step wait for each other's gradients while applying a step,
        # and with clipping every organisation waits for the whole model's gradient norm.
        replicas_wait = plan.aggregation.replica_sync == "step" and any(p.replicated for p in plan.partitions)
        self._steps_wait = replicas_wait or plan.training.grad_clip is not None

    def train_step(self, step: int, batches: Batches) -> dict[str, dict[str, float]]:
        """One optimizer step: every data owner's batch forward and backward, then every
        organisation applies the step."""
        metrics = {
            d: self.workers[d].data_owner.train_batch(step, *batches[d], schedule=self.schedule)
            for d in self.plan.data_owners
        }
        if self._steps_wait:
            with compute_pool(len(self.workers), "fedsplit-step") as pool:
                for done in [pool.submit(w.apply_step, step) for w in self.workers.values()]:
                    done.result()
        else:
            for w in self.workers.values():
                w.apply_step(step)
        for d, m in metrics.items():
            m.update(self.workers[d].last_step)
        return metrics

    def replicas(self, partition: Partition) -> dict[str, dict[str, Tensor]]:
        return {org: self.workers[org].partition_state(partition) for org in partition.holders}

    def load_partition(self, partition: Partition, state: Mapping[str, Tensor]) -> None:
        for org in partition.holders:
            self.workers[org].load_state(state)

    def reassembled(self) -> dict[str, Tensor]:
        """The full model, taking each partition from its first holder (so average replicas
        first when the replicas' own weights matter)."""
        parts = [self.workers[p.holders[0]].partition_state(p) for p in self.plan.partitions]
        return reassemble(self.plan.model, [*parts, self.frozen])

    def close(self) -> None:
        pass
