"""The partition worker of one organisation: its share of the model, its optimizer, and the parts
that serve calls, keep gradients and (for a data owner) drive its batches.

A worker lives as long as its organisation's process. What happens in a step, in order:

1. calls arrive (:class:`~.policy.CallPolicy` admits them, :class:`~.serving.Stage` runs their
   forwards and backwards on :class:`~.partial.PartialModel`), and a data owner's own batch is
   driven by :class:`~.driver.DataOwner`;
2. :meth:`Worker.apply_step` combines the step's gradients (:class:`~.gradients.GradientBook`:
   owner order, replicas kept in step), adds FedProx's proximal term, clips by the global norm,
   sets the scheduled learning rate and steps the optimizer on the master weights
   (:mod:`.precision`).
"""

from __future__ import annotations

import resource
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..plan import Partition, Plan, PlanError, Problem
from .calls import CallKey, current_call
from .driver import DataOwner
from .gradients import GradientBook
from .ops import Op, Shape
from .optim import clip_factor, learning_rate, make_optimizer, scale_grads, set_learning_rate
from .partial import PartialModel
from .policy import CallPolicy
from .precision import MasterWeights, compute_dtype, store_frozen_in
from .protocols import Peer, Traffic
from .serving import Stage


def resolve_device(plan: Plan, org: str, device: str | None = None) -> torch.device:
    """The device ``org`` computes on (``device`` overrides its file's); a plan error naming the
    organisation, its file and line when this host cannot give it."""
    wanted = device or plan.orgs[org].device
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(wanted)
    why = None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = f"device {wanted!r}, but this host has no CUDA device (torch sees none); use auto or cpu"
    elif resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        why = f"device {wanted!r}, but this host has {count} CUDA device(s), 0-{count - 1}"
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        why = f"device {wanted!r}, but this host has no MPS device; use auto or cpu"
    if why:
        o = plan.orgs[org]
        raise PlanError([Problem(why, file=o.file, line=o.device_line, org=org, field="device")])
    return resolved


def peak_rss() -> int:
    """This process's peak resident set in bytes. Linux's getrusage peak carries over exec from the
    parent (a worker host started by a large process would report the parent's), so read this
    address space's own high-water mark there."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) << 10


class Worker:
    """One organisation's partitions, optimizer, served calls and gradients."""

    def __init__(self, plan: Plan, org: str, weights: Mapping[str, Tensor] | None, device: str | None = None):
        """``weights=None``: zeros until :meth:`load_state` (a round's weights) fills them."""
        self.plan, self.name, self.cfg = plan, org, plan.model
        self.device = resolve_device(plan, org, device)
        self.peers: dict[str, Peer] = {}
        self.model = PartialModel(plan, org, self.device, self.serving, plan.checkpoints_activations(org))
        store_frozen_in(self.model.bindings, compute_dtype(plan.training.precision), plan.trains)
        if weights is not None:
            self.model.load_selection(weights)
        else:
            with torch.no_grad():
                for p in self.model.bindings.values():
                    p.zero_()
        self.model.train()
        self.partitions = [p for p in plan.partitions if org in p.holders]
        t = plan.training
        self.weights = MasterWeights(self.model.bindings, t.precision, plan.trains)
        params = self.weights.master
        self.optimizer = make_optimizer(params.values(), t.optimizer) if params else None
        shape = Shape(plan.model, t.batch_size // t.micro_batches, t.seq_len, compute_dtype(t.precision))
        self.policy = CallPolicy(plan, org, shape)
        self.grads = GradientBook(plan, org, params, self.device)
        # the most forwards one step can leave waiting here: every data owner's micro-batches,
        # each through every segment, head group, expert call and shared expert of every layer
        calls_per_micro_batch = self.cfg.num_layers * (self.cfg.num_kv_heads + 2) + 1
        self.stage = Stage(
            org,
            self.model.compute,
            self.weights.compute,
            self.grads,
            self.device,
            max_records=len(plan.data_owners) * t.micro_batches * calls_per_micro_batch,
        )
        self.data_owner = DataOwner(plan, org, self.device, self.peer) if org in plan.data_owners else None
        self.rounds = None  # a Rounds, when this worker runs rounds on its own
        self.proximal: tuple[float, dict[str, Tensor]] | None = None  # FedProx: (mu, the round's weights)
        self.last_step: dict[str, float] = {}  # the last applied step's learning rate, gradient norm, clip factor
        self.expert_load: dict[int, Tensor] = {}  # per layer this worker routes: training rows sent to each expert
        self.assignments: dict[int, int] = {}  # per layer: (token, slot) assignments, dropped ones included
        self._counted: set[tuple[CallKey, int, str]] = set()  # (call, layer, what): once, even if recomputed
        self._load_lock = threading.Lock()  # data owners' calls route concurrently
        for layer, block in self.model.blocks.items():
            block.moe.register_forward_pre_hook(self._count_assigned(int(layer)))
            block.moe.experts.register_forward_pre_hook(self._count_routed(int(layer)))

    def _first_count(self, layer: int, what: str) -> bool:
        """Whether this call's ``what`` in ``layer`` is not counted yet (under the lock): a forward
        recomputed by activation checkpointing routes again, and is not load again."""
        key = (current_call(), layer, what)
        if key in self._counted:
            return False
        self._counted.add(key)
        return True

    def _count_assigned(self, layer: int):
        def hook(module, args) -> None:
            if not torch.is_grad_enabled():  # evaluation is not load
                return
            with self._load_lock:
                if self._first_count(layer, "assigned"):
                    tokens = args[0].numel() // self.cfg.hidden_size
                    self.assignments[layer] = self.assignments.get(layer, 0) + tokens * self.cfg.routed_slots

        return hook

    def _count_routed(self, layer: int):
        def hook(module, args) -> None:
            if not torch.is_grad_enabled():
                return
            with self._load_lock:
                if self._first_count(layer, "routed"):
                    counts = torch.zeros(self.cfg.num_experts)
                    for e, rows in args[0].items():
                        counts[e] = rows.shape[0]
                    self.expert_load[layer] = self.expert_load.get(layer, torch.zeros(self.cfg.num_experts)) + counts

        return hook

    # -- the federation around it ---------------------------------------------------------------

    def connect(self, peers: Mapping[str, Peer]) -> None:
        """How this worker reaches every organisation, itself included."""
        self.peers = dict(peers)

    def peer(self, org: str) -> Peer:
        if org not in self.peers:
            raise RuntimeError(f"{self.name} is not connected to '{org}'")
        return self.peers[org]

    def serving(self, partition: Partition) -> Peer | None:
        """Who computes ``partition`` for the current call's data owner; None: this worker."""
        org = self.plan.route(current_call().data_owner)[next(iter(partition.units))]
        if org == self.name:
            return None
        if org not in self.peers:
            raise RuntimeError(f"{self.name} is not connected to '{org}', which serves {partition.name}")
        return self.peers[org]

    def set_live_owners(self, data_owners: Sequence[str]) -> None:
        """Arrange gradients for the data owners that train (all of them unless some are gone)."""
        self.grads.arrange(data_owners)

    def memory(self) -> dict[str, float]:
        """Peak memory so far: this process's resident set, and what torch allocated on the GPU (its
        peak, and what it holds now: the difference is what a step needed only while it ran)."""
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        held = torch.cuda.memory_allocated(self.device) if cuda else 0
        return {"peak_rss_bytes": float(peak_rss()), "peak_device_bytes": float(peak), "device_bytes": float(held)}

    def traffic(self) -> Traffic:
        """Data-plane bytes of this worker's calls to other organisations."""
        return sum((p.traffic() for org, p in self.peers.items() if org != self.name), Traffic())

    # -- serving: what a LocalPeer or the data-plane handler calls for ``caller`` ---------------

    def forward(self, caller: str, key: CallKey, op: Op, inputs: Sequence[Tensor], keep: bool = True) -> list[Tensor]:
        """A forward the plan lets ``caller`` ask for; ``keep=False``: an evaluation (no graph)."""
        self.policy.check(caller, key, op, inputs)
        if not keep:
            return self.stage.evaluate(key, op, inputs)
        self._check_step(key.step, current=True)
        return self.stage.forward(key, op, inputs)

    def backward(self, caller: str, key: CallKey, op: Op, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        self.policy.check(caller, key, op)
        self._check_step(key.step, current=True)
        return self.stage.backward(key, op, grads)

    def add_replica_grads(self, caller: str, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        self.policy.check_replica_sender(caller, org)
        self._check_step(step, current=False)
        self.grads.receive(org, step, grads)

    def reduce_norm(self, caller: str, org: str, step: int, squared: float) -> float:
        self.policy.check_replica_sender(caller, org)
        self._check_step(step, current=False)
        return self.grads.reduce_norm(org, step, squared, self.plan.transport.step_timeout_s)

    def _check_step(self, step: int, current: bool) -> None:
        """A worker that runs rounds takes calls only for the steps of its round that it has not
        applied yet: the step it is in (``current``: data owners start a step only once every
        worker on their path applied the one before) or, from co-holders, any later step."""
        if self.rounds is not None:
            self.rounds.check_step(step, current)

    # -- the step ------------------------------------------------------------------------------

    def apply_step(self, step: int) -> dict[str, float]:
        """Apply ``step`` once every data owner's batch of it went through: add up the gradients
        (in owner order, and with the co-holders of replicas kept in step), add FedProx's
        proximal term, clip by the whole model's gradient norm (``training.grad_clip``), and step
        the optimizer at the scheduled learning rate. The step's learning rate, and with
        clipping the global gradient norm and the clip factor."""
        if self.stage.waiting:
            raise RuntimeError(f"{self.name}: step with {self.stage.waiting} calls still waiting for their backward")
        t, params = self.plan.training, self.weights.master
        self.grads.settle()
        self.grads.share(step, self.peers)
        self.grads.gather(step, self.plan.transport.step_timeout_s)
        if self.proximal is not None:  # the gradient of mu/2 * |w - w_round|^2
            mu, anchor = self.proximal
            for name, p in params.items():
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor[name], alpha=mu)
        stats = {"lr": learning_rate(t, step)}
        if t.grad_clip is not None and self.name in self.grads.participants:
            squared = self.peer(self.grads.reducer).reduce_norm(self.name, step, self.grads.squared_norm())
            stats.update(grad_norm=squared**0.5, clip_factor=clip_factor(t.grad_clip, squared))
            if stats["clip_factor"] < 1.0:
                scale_grads(params.values(), stats["clip_factor"])
        if self.optimizer is not None:
            set_learning_rate(self.optimizer, stats["lr"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.weights.refresh()
        self.stage.end_step()
        self._counted.clear()
        self.last_step = stats
        return stats

    def anchor_proximal(self) -> None:
        """FedProx: pull this round's steps towards the weights the round began with."""
        mu = self.plan.aggregation.proximal_mu
        self.proximal = (mu, {k: p.detach().clone() for k, p in self.weights.master.items()}) if mu > 0 else None

    def reset_pending(self) -> None:
        """Drop what a failed step left behind: saved graphs, answered calls, gradients."""
        self.stage.clear()
        self.grads.clear()
        self._counted.clear()

    # -- weights -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        """Its (master) weights that train, by monolithic name (frozen ones never change)."""
        return {k: p.detach().clone() for k, p in self.weights.master.items()}

    def partition_state(self, partition: Partition) -> dict[str, Tensor]:
        """The weights of ``partition`` that train."""
        return {s.key: self.weights.master[s.key].detach().clone() for s in self.plan.trained_slices(partition.units)}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Overwrite some or all of this worker's weights (e.g. with the round's average)."""
        master = self.weights.master
        wrong = [
            f"{k} {tuple(v.shape)} {v.dtype}" if k in master else f"{k} (not a weight {self.name} trains)"
            for k, v in state.items()
            if k not in master or v.shape != master[k].shape or not v.is_floating_point()
        ]
        if wrong:
            raise ValueError(f"{self.name} cannot load {', '.join(wrong[:5])}" + (", ..." if len(wrong) > 5 else ""))
        with torch.no_grad():
            for k, v in state.items():
                master[k].copy_(v)
        self.weights.refresh()
