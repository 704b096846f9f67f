"""Where one organisation's parameter gradients accumulate during a step, and how they are
combined before its optimizer steps.

* **Scaling.** A replica's gradient is the mean over the data owners whose batches it serves;
  a replica kept in step with others takes its share of the whole group's mean, so that adding
  up the group's gradients gives that mean. Each backward's gradients are scaled for the data
  owner whose batch it carries.
* **Order.** Gradients arrive in the order backwards do. With ``training.deterministic``, those
  of partitions that several data owners train are kept per data owner and added up in
  data-owner order, so that a run repeats bitwise.
* **Replicas kept in step** (``aggregation.replica_sync: step``): before each step the holders
  of a replicated partition send each other its gradients, and each adds them up holder by
  holder in name order, so that every replica takes the same step: the one centralised training
  would take on all their batches.
* **The global norm** (``training.grad_clip``): every organisation on a live data owner's path
  (the step's *participants*) sends the reducer (the first of them by name) its squared norm,
  replicated pieces counted once (kept in step: by their first holder; else each replica with
  its share of the data owners), and gets back the sum, added up in name order, so that all of
  them clip by the same factor.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..plan import Partition, Plan
from .optim import squared_norm
from .protocols import Peer


class GradientBook:
    def __init__(self, plan: Plan, org: str, params: Mapping[str, nn.Parameter], device: torch.device):
        """``params``: the master weights, by name: where gradients accumulate (in their dtype)."""
        self.plan, self.org, self.params, self.device = plan, org, params, device
        self.partitions = [p for p in plan.partitions if org in p.holders]
        self._scale: dict[str, dict[str, float]] = {}  # data owner -> key -> factor on its gradients
        self._sync_keys: dict[str, list[str]] = {}  # co-holder -> keys whose gradients we add up with it each step
        self._ordered: set[str] = (
            set()
        )  # keys several data owners train: with training.deterministic, added up in owner order
        self._owner_grads: dict[str, dict[str, Tensor]] = {}  # data owner -> its gradients on those keys this step
        self._replica_grads: dict[int, dict[str, dict[str, Tensor]]] = {}  # step -> co-holder -> its gradients
        self._lock = threading.Lock()  # micro-batches' backwards may arrive concurrently
        self._arrived = threading.Condition()
        self._norm_share: dict[str, float] = {}  # key -> the share of its squared norm this organisation counts
        self._norms: dict[int, dict[str, float]] = {}  # (reducer) step -> participant -> squared norm
        self.participants: list[str] = []
        self.arrange(plan.data_owners)

    def arrange(self, live: Sequence[str]) -> None:
        """Scale and order gradients for the data owners that train (all of them unless some are gone)."""
        plan, live = self.plan, set(live)
        self._scale = {d: {} for d in plan.data_owners}
        self._sync_keys, self._ordered, self._norm_share = {}, set(), {}
        self.participants = sorted(set().union(*(plan.path_orgs(d) for d in live)))
        for p in self.partitions:
            keys = [s.key for s in plan.trained_slices(p.units)]
            group = self._sync_group(p, live)
            users = plan.users(p, self.org)
            if plan.training.deterministic and len([d for d in users if d in live]) > 1:
                self._ordered.update(keys)
            averaged_over = len([d for h in group for d in plan.users(p, h) if d in live]) if group else len(users)
            for d in users:
                self._scale[d].update(dict.fromkeys(keys, 1.0 / averaged_over))
            for holder in group:
                if holder != self.org:
                    self._sync_keys.setdefault(holder, []).extend(keys)
            if group:
                share = 1.0 if self.org == group[0] else 0.0
            else:
                everyone = [d for h in p.holders for d in plan.users(p, h) if d in live]
                share = len([d for d in users if d in live]) / len(everyone) if everyone else 0.0
            self._norm_share.update(dict.fromkeys(keys, share))

    def _sync_group(self, partition: Partition, live: set[str]) -> list[str]:
        """The holders of ``partition`` that add up their gradients every step, this organisation
        among them; empty when it does not take part."""
        if self.plan.aggregation.replica_sync != "step" or self.org in partition.local_holders:
            return []
        group = [
            h
            for h in partition.holders
            if h not in partition.local_holders and any(d in live for d in self.plan.users(partition, h))
        ]
        return group if self.org in group and len(group) > 1 else []

    # -- during the step -----------------------------------------------------------------------

    def add(self, data_owner: str, grads: Mapping[str, Tensor]) -> None:
        """One backward's gradients of ``data_owner``'s batch, by parameter name."""
        scale = self._scale.get(data_owner, {})
        with self._lock:
            for name, grad in grads.items():
                factor = scale.get(name, 1.0)
                if grad.dtype != self.params[name].dtype:  # bf16 compute: accumulate in the masters' fp32
                    grad = grad.to(self.params[name].dtype)
                grad = grad if factor == 1.0 else grad * factor
                if name in self._ordered:
                    mine = self._owner_grads.setdefault(data_owner, {})
                    mine[name] = grad if name not in mine else mine[name].add_(grad)
                else:
                    param = self.params[name]
                    param.grad = grad if param.grad is None else param.grad.add_(grad)

    def settle(self) -> None:
        """Add up the data owners' gradients kept apart, in owner order."""
        with self._lock:
            for owner in self.plan.data_owners:
                for name, grad in self._owner_grads.pop(owner, {}).items():
                    param = self.params[name]
                    param.grad = grad if param.grad is None else param.grad.add_(grad)

    # -- replicas kept in step -----------------------------------------------------------------

    def share(self, step: int, peers: Mapping[str, Peer]) -> None:
        """Send this step's gradients of the replicas kept in step to their other holders."""
        for org, keys in self._sync_keys.items():
            grads = [(k, self.params[k].grad) for k in keys]
            peers[org].add_replica_grads(self.org, step, [(k, g) for k, g in grads if g is not None])

    def receive(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        """A co-holder's gradients for ``step``, kept until :meth:`gather`. Checked first
        (PermissionError, ValueError); nothing is kept from a call that fails the check."""
        allowed = set(self._sync_keys.get(org, ()))
        if not allowed:
            raise PermissionError(f"{org!r} holds no replica that {self.org} keeps in step with it")
        for k, g in grads:
            if k not in allowed:
                raise PermissionError(f"{org!r} and {self.org} do not keep {k!r} in step")
            param = self.params[k]  # values are finite: the data plane checks every tensor it receives
            if g.shape != param.shape or g.dtype != param.dtype:
                raise ValueError(
                    f"gradient of {k} must be {tuple(param.shape)} {param.dtype}, got {tuple(g.shape)} {g.dtype}"
                )
        copies = {k: g.to(self.device, copy=True) for k, g in grads}
        with self._arrived:
            self._replica_grads.setdefault(step, {})[org] = copies
            self._arrived.notify_all()

    def gather(self, step: int, timeout: float) -> None:
        """Wait for every co-holder's gradients of ``step`` and add them up with ours, holder by
        holder in name order, so that every holder ends with the same sum."""
        if not self._sync_keys:
            return
        with self._arrived:
            arrived = lambda: set(self._replica_grads.get(step, {})) >= set(self._sync_keys)  # noqa: E731
            if not self._arrived.wait_for(arrived, timeout):
                missing = sorted(set(self._sync_keys) - set(self._replica_grads.get(step, {})))
                raise TimeoutError(
                    f"{self.org}: step {step} has no replica gradients from {', '.join(missing)} after {timeout:.0f} s"
                )
            received = self._replica_grads.pop(step)
        for k in sorted({k for keys in self._sync_keys.values() for k in keys}):
            param = self.params[k]
            parts = {org: g[k] for org, g in received.items() if k in g}
            if param.grad is not None:
                parts[self.org] = param.grad
            total = None
            for org in sorted(parts):
                total = parts[org].clone() if total is None else total.add_(parts[org])
            if total is not None:
                param.grad = total

    def drop_before(self, step: int) -> None:
        """Forget co-holders' gradients and participants' norms of steps before ``step`` (an aborted
        round's)."""
        with self._arrived:
            for s in [s for s in self._replica_grads if s < step]:
                del self._replica_grads[s]
            for s in [s for s in self._norms if s < step]:
                del self._norms[s]

    # -- the global norm ----------------------------------------------------------------------

    @property
    def reducer(self) -> str:
        return self.participants[0]

    def squared_norm(self) -> float:
        """This organisation's share of the whole model's squared gradient norm."""
        keys = [k for k, p in self.params.items() if p.grad is not None and self._norm_share.get(k, 1.0)]
        return squared_norm((self.params[k].grad for k in keys), (self._norm_share.get(k, 1.0) for k in keys))

    def reduce_norm(self, org: str, step: int, squared: float, timeout: float) -> float:
        """(The reducer) ``org``'s squared norm of ``step``; returns the sum over every participant
        once all have sent theirs, added up in name order."""
        if org not in self.participants:
            raise PermissionError(
                f"{org!r} takes no part in the steps of this round ({', '.join(self.participants)} do)"
            )
        with self._arrived:
            self._norms.setdefault(step, {})[org] = squared
            self._arrived.notify_all()
            if not self._arrived.wait_for(lambda: len(self._norms.get(step, {})) >= len(self.participants), timeout):
                missing = sorted(set(self.participants) - set(self._norms.get(step, {})))
                raise TimeoutError(
                    f"{self.org}: step {step} has no gradient norm from {', '.join(missing)} after {timeout:.0f} s"
                )
            parts = self._norms[step]
            # Every participant of step - 2 has its total: it sent step - 1's norm (or this one).
            for old in [s for s in self._norms if s < step - 1]:
                del self._norms[old]
        return sum(parts[o] for o in sorted(parts))

    @property
    def pending_replica_steps(self) -> list[int]:
        return sorted(self._replica_grads)

    def clear(self) -> None:
        """Drop what a failed step left: gradients kept apart and on the parameters."""
        with self._lock:
            self._owner_grads.clear()
            for p in self.params.values():
                p.grad = None
