"""What the plan lets each caller ask of one organisation's worker, and what each call must carry.

Every check runs before the worker computes or keeps anything, and raises ``PermissionError``
for a caller the plan does not allow or ``ValueError`` for a call that does not fit the model,
the partition or the micro-batch (the data plane answers ``PERMISSION_DENIED`` and
``INVALID_ARGUMENT``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..plan import Plan, Unit
from ..plan.units import describe
from ..transport.protocol import COORDINATOR
from .calls import CallKey
from .ops import ExpertsOp, HeadsOp, Op, SegmentOp, Shape, SharedOp
from .path import segments

EVAL_STEP = -1  # the step of held-out evaluation calls (training steps count from 0)


class CallPolicy:
    """The plan's rules for calls that reach organisation ``org``."""

    def __init__(self, plan: Plan, org: str, shape: Shape | None = None):
        self.plan, self.org = plan, org
        t = plan.training
        self.shape = shape or Shape(plan.model, t.batch_size // t.micro_batches, t.seq_len)
        self._owners = frozenset(plan.data_owners)
        self._segments = {d: {seg for o, seg in segments(plan, d) if o == org} for d in plan.data_owners}

    # -- data-plane calls ----------------------------------------------------------------------

    def check(self, caller: str, key: CallKey, op: Op, inputs: Sequence[Tensor] | None = None) -> None:
        """Refuse a call the plan does not allow, or whose tensors (when given: a forward's) do
        not fit the operation and the declared micro-batch."""
        plan, cfg = self.plan, self.plan.model
        if key.data_owner not in self._owners:
            raise ValueError(f"{key.data_owner!r} is not a data owner of plan {plan.name!r}")
        if not 0 <= key.micro_batch < plan.training.micro_batches:
            raise ValueError(f"micro-batch {key.micro_batch} outside 0-{plan.training.micro_batches - 1}")
        if isinstance(op, SegmentOp):
            if op not in self._segments[key.data_owner]:
                blocks = str(op).removeprefix("segment/")
                raise PermissionError(f"{self.org} computes no segment {blocks!r} for {key.data_owner}'s batches")
            expected, units = key.data_owner, []
        else:
            if not 0 <= op.layer < cfg.num_layers:
                raise ValueError(f"layer {op.layer} outside the model (0-{cfg.num_layers - 1})")
            expected, units = plan.route(key.data_owner)[Unit("router", op.layer)], self._units(op)
        if caller != expected:
            raise PermissionError(
                f"{caller!r} may not call {op} for {key.data_owner}'s batches (only {expected!r} may)"
            )
        if isinstance(op, ExpertsOp):
            blocked = plan.blocked_experts(key.data_owner).get(op.layer, ())
            theirs = sorted(e for e in op.experts if e in blocked)
            if theirs:
                owner = plan.owner_of[Unit("expert", op.layer, theirs[0])]
                raise PermissionError(
                    f"layer {op.layer}'s expert {theirs[0]} is owned by {owner} and trains on its batches only, "
                    f"not {key.data_owner}'s"
                )
        route = plan.route(key.data_owner)
        not_mine = {u for u in units if route.get(u) != self.org}
        if not_mine:
            raise PermissionError(
                f"{self.org} does not serve {describe(not_mine, plan.model)} for {key.data_owner}'s batches"
            )
        if inputs is not None:
            self.check_inputs(op, inputs)

    def _units(self, op: HeadsOp | ExpertsOp | SharedOp) -> list[Unit]:
        cfg = self.plan.model
        if isinstance(op, HeadsOp):
            if op.kv_heads[1] > cfg.num_kv_heads:
                raise ValueError(f"KV heads {op.kv_heads[0]}-{op.kv_heads[1] - 1} outside 0-{cfg.num_kv_heads - 1}")
            return [Unit("kv", op.layer, g) for g in range(*op.kv_heads)]
        if isinstance(op, ExpertsOp):
            if max(op.experts) >= cfg.num_experts:
                raise ValueError(f"expert {max(op.experts)} outside 0-{cfg.num_experts - 1}")
            crowded = [e for e, n in op.rows if n > self.shape.rows]
            if crowded:
                raise ValueError(
                    f"expert {crowded[0]} gets more rows than a micro-batch has tokens ({self.shape.rows})"
                )
            if op.total_rows > self.shape.rows * cfg.routed_slots:
                raise ValueError(
                    f"{op.total_rows} rows are more than a micro-batch routes "
                    f"({self.shape.rows} tokens x {cfg.routed_slots} experts each)"
                )
            return [Unit("expert", op.layer, e) for e in op.experts]
        return [Unit("shared_experts", op.layer)]

    def check_inputs(self, op: Op, inputs: Sequence[Tensor]) -> None:
        specs = op.inputs(self.shape)
        if len(inputs) != len(specs):
            raise ValueError(f"{op} takes {len(specs)} input tensors, got {len(inputs)}")
        for i, (spec, x) in enumerate(zip(specs, inputs)):
            if x is None or not spec.admits(x):
                got = "nothing" if x is None else f"{tuple(x.shape)} {x.dtype}"
                raise ValueError(f"input {i} of {op}: expected {spec}, got {got}")
        vocab = self.plan.model.vocab_size
        if isinstance(op, SegmentOp) and op.blocks[0] == "embed":
            tokens = inputs[0]
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
                raise ValueError(f"token ids must lie in 0-{vocab - 1}")
        if isinstance(op, SegmentOp) and op.takes_labels:
            labels = inputs[1]
            if labels.shape != inputs[0].shape[:2]:
                raise ValueError(
                    f"labels must be shaped like the tokens {tuple(inputs[0].shape[:2])}, got {tuple(labels.shape)}"
                )
            classes = vocab if op.task is None else len(self.plan.model.task(op.task).labels)
            if bool(((labels != -100) & ((labels < 0) | (labels >= classes))).any()):
                raise ValueError(f"labels must be -100 or lie in 0-{classes - 1}")

    # -- control calls -------------------------------------------------------------------------

    def check_owner(self, caller: str) -> None:
        """Control of the worker itself (weights, rounds, connections): its own organisation's
        client, or the coordinator."""
        if caller not in (COORDINATOR, self.org):
            raise PermissionError(f"{caller!r} may not send control operations to {self.org}")

    def check_round_caller(self, caller: str, data_owner: str | None = None) -> None:
        """The step barrier: data owners whose batches pass through this organisation, each
        speaking for itself only."""
        if caller not in self._owners or self.org not in self.plan.path_orgs(caller):
            raise PermissionError(f"{caller!r} has no batches that pass through {self.org}")
        if data_owner is not None and data_owner != caller:
            raise PermissionError(f"{caller!r} cannot report the steps of {data_owner!r}")

    def check_replica_sender(self, caller: str, sender: str) -> None:
        """Gradients of replicas kept in step: each co-holder sends only its own (which keys it
        may send is the gradient book's to check)."""
        if sender != caller:
            raise PermissionError(f"{caller!r} cannot send the gradients of {sender!r}")
