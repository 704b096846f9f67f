"""The partition worker of one organisation: serves its partitions and drives its own batches.

A worker lives as long as its organisation's process. It answers four kinds of calls
(``segment``, ``heads``, ``experts``, ``shared``) with a forward and a backward each, keeps each
forward's autograd graph until its backward, accumulates parameter gradients scaled for the
replica it is (in the order backwards arrive, or, with ``training.deterministic``, kept per data
owner and added up in data-owner order), and steps its optimizer when the step is complete.

When the plan keeps replicas in step (``aggregation.replica_sync: step``), the holders of a
replicated partition first send each other that step's gradients of it and each adds them up in
the same order, so every replica takes the same step: the step centralised training would take
on all their batches.

As a data owner it drives its batches: micro-batch by micro-batch through the path of segments
its plan gives it (consecutive blocks computed by one organisation), then backward in reverse.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import Tensor

from ..model import cross_entropy, rope_tables
from ..plan import Partition, Plan, Unit
from ..plan.slicing import unit_slices
from .calls import CallKey, Peer, calling, current_call, remote_call
from .optim import make_optimizer
from .partial import PartialModel

EVAL_STEP = -1  # the step of held-out evaluation calls (training steps count from 0)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def segments(plan: Plan, data_owner: str) -> list[tuple[str, tuple]]:
    """The data owner's path: (organisation, blocks) for each run of consecutive blocks that one
    organisation computes. Blocks are ``"embed"``, layer indices, ``"final_norm"``, ``"lm_head"``."""
    route = plan.route(data_owner)
    blocks = [("embed", route[Unit("embed")])]
    blocks += [(i, route[Unit("router", i)]) for i in range(plan.model.num_layers)]
    blocks += [("final_norm", route[Unit("final_norm")]), ("lm_head", route[Unit("lm_head")])]
    path: list[tuple[str, list]] = []
    for block, org in blocks:
        if path and path[-1][0] == org:
            path[-1][1].append(block)
        else:
            path.append((org, [block]))
    return [(org, tuple(b)) for org, b in path]


def run_schedule(schedule: str, n: int, max_in_flight: int, forward, backward) -> None:
    """Run ``forward(i)`` and ``backward(i)`` for micro-batches ``0..n-1`` on threads.

    ``gpipe``: every forward in flight at once, then the backwards. ``1f1b``: at most
    ``max_in_flight`` micro-batches hold activations; a micro-batch's backward starts as soon as
    its forward is done, while later forwards run. Backwards run one at a time in micro-batch
    order, so every partition adds up its gradients in the same order as the monolithic model
    (no reassociation: layer and expert partitions stay bitwise exact). The first exception
    propagates."""
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown schedule {schedule!r}")
    limit = n if schedule == "gpipe" else max(1, min(n, max_in_flight))
    with ThreadPoolExecutor(max_workers=limit + 1, thread_name_prefix="fedsplit-mb") as pool:
        forwards: dict[Future, int] = {}
        forwarded: set[int] = set()
        running_backward: Future | None = None
        started = finished = 0
        while finished < n:
            while started < n and started - finished < limit:
                forwards[pool.submit(forward, started)] = started
                started += 1
            ready = finished in forwarded and (schedule == "1f1b" or len(forwarded) == n)
            if running_backward is None and ready:
                running_backward = pool.submit(backward, finished)
            pending = [*forwards, *([running_backward] if running_backward else [])]
            for future in wait(pending, return_when=FIRST_COMPLETED).done:
                future.result()
                if future is running_backward:
                    running_backward = None
                    finished += 1
                else:
                    forwarded.add(forwards.pop(future))


def segment_op(blocks: Sequence) -> str:
    return "segment/" + ",".join(str(b) for b in blocks)


@dataclass
class _Record:
    inputs: list[Tensor]
    outputs: list[Tensor]


class Worker:
    """One organisation's partitions, optimizer and saved graphs. Implements :class:`Peer`."""

    remote = False

    def __init__(self, plan: Plan, org: str, weights: Mapping[str, Tensor] | None, device: str | None = None):
        """``weights=None``: zeros until :meth:`load_state` (a round's weights) fills them."""
        self.plan, self.name, self.cfg = plan, org, plan.model
        self.device = resolve_device(device or plan.orgs[org].device)
        self.peers: dict[str, Peer] = {}
        self.model = PartialModel(plan, org, self.device, self.serving)
        if weights is not None:
            self.model.load_selection(weights)
        else:
            with torch.no_grad():
                for p in self.model.bindings.values():
                    p.zero_()
        self.model.train()
        self.partitions = [p for p in plan.partitions if org in p.holders]
        self.optimizer = (
            make_optimizer(self.model.bindings.values(), plan.training.optimizer) if self.model.bindings else None
        )
        self.owner_index = {d: i for i, d in enumerate(plan.data_owners)}
        self._grad_scale: dict[str, dict[str, float]] = {}
        self._sync_keys: dict[str, list[str]] = {}  # co-holder -> keys whose gradients we add up with it each step
        self._ordered: set[str] = (
            set()
        )  # keys several data owners train: with training.deterministic, added up in owner order
        self._owner_grads: dict[str, dict[str, Tensor]] = {}  # data owner -> its gradients on those keys this step
        self.set_live_owners(plan.data_owners)
        self._replica_grads: dict[int, dict[str, dict[str, Tensor]]] = {}  # step -> co-holder -> its gradients
        self._sync_cond = threading.Condition()
        self._records: dict[tuple[CallKey, str], _Record] = {}
        self._done: dict[tuple[CallKey, str], list[Tensor | None]] = {}
        self._grad_lock = threading.Lock()  # micro-batches' backwards may arrive concurrently
        self.rounds = None  # a Rounds, when this worker runs rounds on its own
        self.expert_load: dict[int, Tensor] = {}  # per layer this worker routes: training rows sent to each expert
        for layer, block in self.model.blocks.items():
            block.moe.experts.register_forward_pre_hook(self._count_routed(int(layer)))

    def _count_routed(self, layer: int):
        def hook(module, args) -> None:
            if not torch.is_grad_enabled():  # evaluation is not load
                return
            counts = torch.zeros(self.cfg.num_experts)
            for e, rows in args[0].items():
                counts[e] = rows.shape[0]
            with self._grad_lock:
                self.expert_load[layer] = self.expert_load.get(layer, torch.zeros(self.cfg.num_experts)) + counts

        return hook

    def connect(self, peers: Mapping[str, Peer]) -> None:
        self.peers = dict(peers)

    def serving(self, partition: Partition) -> Peer | None:
        org = self.plan.route(current_call().data_owner)[next(iter(partition.units))]
        if org == self.name:
            return None
        if org not in self.peers:
            raise RuntimeError(f"{self.name} is not connected to '{org}', which serves {partition.name}")
        return self.peers[org]

    def set_live_owners(self, data_owners: Sequence[str]) -> None:
        """Arrange gradients for the data owners that train (all of them unless some are gone).

        Per data owner, the factor applied to its gradient on each of our parameters: a replica
        averages the gradients of the data owners whose batches it serves; a replica kept in step
        with others takes its share of the whole group's average, so that adding up the group's
        gradients gives that average."""
        plan, live = self.plan, set(data_owners)
        self._grad_scale = {d: {} for d in plan.data_owners}
        self._sync_keys = {}
        self._ordered = set()
        for p in self.partitions:
            keys = [s.key for s in unit_slices(self.cfg, p.units)]
            group = self._sync_group(p, live)
            users = plan.users(p, self.name)
            if plan.training.deterministic and len([d for d in users if d in live]) > 1:
                self._ordered.update(keys)
            averaged_over = len([d for h in group for d in plan.users(p, h) if d in live]) if group else len(users)
            for d in users:
                self._grad_scale[d].update(dict.fromkeys(keys, 1.0 / averaged_over))
            for holder in group:
                if holder != self.name:
                    self._sync_keys.setdefault(holder, []).extend(keys)

    def _sync_group(self, partition: Partition, live: set[str]) -> list[str]:
        """The holders of ``partition`` that add up their gradients every step, this worker
        among them; empty when it does not take part."""
        if self.plan.aggregation.replica_sync != "step" or self.name in partition.local_holders:
            return []
        group = [
            h
            for h in partition.holders
            if h not in partition.local_holders and any(d in live for d in self.plan.users(partition, h))
        ]
        return group if self.name in group and len(group) > 1 else []

    # -- serving -------------------------------------------------------------------------------

    def forward(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        done = self._records.get((key, op))
        if done is not None:  # a retried call: answer it again, compute nothing
            return [o.detach() for o in done.outputs]
        leaves = [t.to(self.device).detach().requires_grad_(t.is_floating_point()) for t in inputs]
        with calling(key), torch.enable_grad():
            outputs = list(self._run(key, op, leaves))
        self._records[(key, op)] = _Record(leaves, outputs)
        return [o.detach() for o in outputs]

    def evaluate(self, key: CallKey, op: str, inputs: Sequence[Tensor]) -> list[Tensor]:
        """A forward for held-out evaluation: no graph is kept, nothing waits for a backward."""
        with calling(key), torch.no_grad():
            return list(self._run(key, op, [t.to(self.device) for t in inputs]))

    def backward(self, key: CallKey, op: str, grads: Sequence[Tensor | None]) -> list[Tensor | None]:
        if (key, op) in self._done:
            return self._done[(key, op)]
        record = self._records.get((key, op))
        if record is None:
            raise KeyError(f"{self.name}: backward of {op} for {key} without a forward")
        if len(grads) != len(record.outputs) or any(
            g is not None and (g.shape != o.shape or g.dtype != o.dtype) for g, o in zip(grads, record.outputs)
        ):
            got = [None if g is None else (tuple(g.shape), str(g.dtype)) for g in grads]
            want = [(tuple(o.shape), str(o.dtype)) for o in record.outputs]
            raise ValueError(f"{self.name}: gradients for {op} must match its outputs {want}, got {got}")
        del self._records[(key, op)]
        pairs = [(o, g.to(self.device)) for o, g in zip(record.outputs, grads) if o.requires_grad and g is not None]
        wrt_inputs = [t for t in record.inputs if t.requires_grad]
        names = list(self.model.bindings)
        params = [self.model.bindings[n] for n in names]
        with calling(key):
            result = (
                torch.autograd.grad(
                    [o for o, _ in pairs], wrt_inputs + params, [g for _, g in pairs], allow_unused=True
                )
                if pairs
                else [None] * (len(wrt_inputs) + len(params))
            )
        scale = self._grad_scale.get(key.data_owner, {})
        with self._grad_lock:
            for name, param, grad in zip(names, params, result[len(wrt_inputs) :]):
                if grad is None:
                    continue
                factor = scale.get(name, 1.0)
                grad = grad if factor == 1.0 else grad * factor
                if name in self._ordered:
                    mine = self._owner_grads.setdefault(key.data_owner, {})
                    mine[name] = grad if name not in mine else mine[name].add_(grad)
                else:
                    param.grad = grad if param.grad is None else param.grad.add_(grad)
        it = iter(result[: len(wrt_inputs)])
        input_grads = [next(it) if t.requires_grad else None for t in record.inputs]
        self._done[(key, op)] = input_grads
        return input_grads

    # -- what a caller may ask -----------------------------------------------------------------

    def check_call(self, caller: str, key: CallKey, op: str, inputs: Sequence[Tensor] | None = None) -> None:
        """Refuse a call the plan does not allow (PermissionError) or whose tensors do not fit
        the partition and the declared micro-batch (ValueError). Nothing is touched before."""
        plan, cfg, t = self.plan, self.cfg, self.plan.training
        if key.data_owner not in self.owner_index:
            raise ValueError(f"{key.data_owner!r} is not a data owner of plan {plan.name!r}")
        if not 0 <= key.micro_batch < t.micro_batches:
            raise ValueError(f"micro-batch {key.micro_batch} outside 0-{t.micro_batches - 1}")
        route = plan.route(key.data_owner)
        kind, _, rest = op.partition("/")
        if kind == "segment":
            blocks = tuple(int(b) if b.isdigit() else b for b in rest.split(","))
            if (self.name, blocks) not in segments(plan, key.data_owner):
                raise PermissionError(f"{self.name} computes no segment {rest!r} for {key.data_owner}'s batches")
            expected_caller = key.data_owner
            units = []
        elif kind in ("heads", "experts", "shared"):
            layer_text, _, arg = rest.partition("/")
            layer = int(layer_text)
            if not 0 <= layer < cfg.num_layers:
                raise ValueError(f"layer {layer} outside the model")
            expected_caller = route[Unit("router", layer)]
            if kind == "heads":
                g0, g1 = map(int, arg.split("-"))
                units = [Unit("kv", layer, g) for g in range(g0, g1)]
            elif kind == "experts":
                units = [Unit("expert", layer, int(item.split(":")[0])) for item in arg.split(",")]
            else:
                units = [Unit("shared_experts", layer)]
        else:
            raise ValueError(f"unknown operation {op!r}")
        if caller != expected_caller:
            raise PermissionError(
                f"{caller!r} may not call {op} for {key.data_owner}'s batches (only {expected_caller!r} may)"
            )
        not_mine = [str(u) for u in units if route.get(u) != self.name]
        if not_mine:
            raise PermissionError(f"{self.name} does not serve {', '.join(not_mine)} for {key.data_owner}'s batches")
        if inputs is not None:
            self._check_inputs(kind, rest, inputs)

    def _check_inputs(self, kind: str, rest: str, inputs: Sequence[Tensor]) -> None:
        cfg, t = self.cfg, self.plan.training
        mb = t.batch_size // t.micro_batches

        def expect(i: int, dtype: torch.dtype, shape_ok, what: str) -> Tensor:
            x = inputs[i]
            if x.dtype != dtype or not shape_ok(tuple(x.shape)):
                raise ValueError(f"input {i} of {kind}: expected {what} of {dtype}, got {tuple(x.shape)} {x.dtype}")
            return x

        seq = lambda s: len(s) >= 2 and s[0] == mb and 1 <= s[1] <= t.seq_len  # noqa: E731
        hidden = lambda s: len(s) == 3 and seq(s) and s[2] == cfg.hidden_size  # noqa: E731
        blocks = rest.split(",") if kind == "segment" else []
        n_inputs = 1 + ("lm_head" in blocks)
        if len(inputs) != n_inputs:
            raise ValueError(f"{kind} takes {n_inputs} input tensors, got {len(inputs)}")
        if kind == "segment" and blocks[0] == "embed":
            tok = expect(0, torch.int64, lambda s: len(s) == 2 and seq(s), f"token ids ({mb}, <= {t.seq_len})")
            if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= cfg.vocab_size):
                raise ValueError(f"token ids must lie in 0-{cfg.vocab_size - 1}")
        elif kind == "experts":
            total = sum(int(item.split(":")[1]) for item in rest.partition("/")[2].split(","))
            expect(0, torch.float32, lambda s: s == (total, cfg.hidden_size), f"rows ({total}, {cfg.hidden_size})")
        elif kind == "shared":
            rows = mb * t.seq_len
            expect(
                0,
                torch.float32,
                lambda s: len(s) == 2 and 1 <= s[0] <= rows and s[1] == cfg.hidden_size,
                f"token rows (<= {rows}, {cfg.hidden_size})",
            )
        else:
            expect(0, torch.float32, hidden, f"hidden states ({mb}, <= {t.seq_len}, {cfg.hidden_size})")
        if "lm_head" in blocks:
            lab = expect(1, torch.int64, lambda s: s == tuple(inputs[0].shape[:2]), "labels shaped like the tokens")
            bad = (lab != -100) & ((lab < 0) | (lab >= cfg.vocab_size))
            if bool(bad.any()):
                raise ValueError(f"labels must be -100 or lie in 0-{cfg.vocab_size - 1}")

    # -- replicas kept in step ------------------------------------------------------------------

    def _add_up_owner_grads(self) -> None:
        """Add the data owners' gradients kept apart (``training.deterministic``) in owner order."""
        with self._grad_lock:
            for owner in self.plan.data_owners:
                for name, grad in self._owner_grads.pop(owner, {}).items():
                    param = self.model.bindings[name]
                    param.grad = grad if param.grad is None else param.grad.add_(grad)

    def share_replica_grads(self, step: int) -> None:
        """Send this step's gradients of the replicas kept in step to their other holders."""
        self._add_up_owner_grads()
        for org, keys in self._sync_keys.items():
            grads = [(k, self.model.bindings[k].grad) for k in keys]
            self.peers[org].add_replica_grads(self.name, step, [(k, g) for k, g in grads if g is not None])

    def add_replica_grads(self, org: str, step: int, grads: Sequence[tuple[str, Tensor]]) -> None:
        """A co-holder's gradients for ``step``, kept until :meth:`gather_replica_grads`. Checked
        first (PermissionError, ValueError); nothing is kept from a call that fails the check."""
        allowed = set(self._sync_keys.get(org, ()))
        if not allowed:
            raise PermissionError(f"{org!r} holds no replica that {self.name} keeps in step with it")
        for k, g in grads:
            if k not in allowed:
                raise PermissionError(f"{org!r} and {self.name} do not keep {k!r} in step")
            param = self.model.bindings[k]  # values are finite: the data plane checks every tensor it receives
            if g.shape != param.shape or g.dtype != param.dtype:
                raise ValueError(
                    f"gradient of {k} must be {tuple(param.shape)} {param.dtype}, got {tuple(g.shape)} {g.dtype}"
                )
        copies = {k: g.to(self.device, copy=True) for k, g in grads}
        with self._sync_cond:
            self._replica_grads.setdefault(step, {})[org] = copies
            self._sync_cond.notify_all()

    def gather_replica_grads(self, step: int) -> None:
        """Wait for every co-holder's gradients of ``step`` and add them up with ours, holder by
        holder in name order, so that every holder ends with the same sum."""
        if not self._sync_keys:
            return
        timeout = self.plan.transport.step_timeout_s
        with self._sync_cond:
            arrived = lambda: set(self._replica_grads.get(step, {})) >= set(self._sync_keys)  # noqa: E731
            if not self._sync_cond.wait_for(arrived, timeout):
                missing = sorted(set(self._sync_keys) - set(self._replica_grads.get(step, {})))
                raise TimeoutError(
                    f"{self.name}: step {step} has no replica gradients from {', '.join(missing)} after {timeout:.0f} s"
                )
            received = self._replica_grads.pop(step)
        keys = {k for keys in self._sync_keys.values() for k in keys}
        for k in sorted(keys):
            param = self.model.bindings[k]
            parts = {org: g[k] for org, g in received.items() if k in g}
            if param.grad is not None:
                parts[self.name] = param.grad
            if parts:
                total = None
                for org in sorted(parts):
                    total = parts[org].clone() if total is None else total.add_(parts[org])
                param.grad = total

    def drop_replica_grads(self, before_step: int) -> None:
        """Forget co-holders' gradients of steps before ``before_step`` (an aborted round's)."""
        with self._sync_cond:
            for step in [s for s in self._replica_grads if s < before_step]:
                del self._replica_grads[step]

    def step(self) -> None:
        """Apply the optimizer after every data owner's batch of this step went through."""
        if self._records:
            raise RuntimeError(f"{self.name}: step with {len(self._records)} calls still waiting for their backward")
        self._add_up_owner_grads()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._done.clear()

    def reset_pending(self) -> None:
        """Drop what a failed step left behind: saved graphs, answered calls, gradients."""
        with self._grad_lock:
            self._records.clear()
            self._done.clear()
            self._owner_grads.clear()
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)

    def traffic(self) -> dict[str, float]:
        """Data-plane bytes this worker's calls to other organisations sent and received."""
        channels = [p.channel for p in self.peers.values() if getattr(p, "remote", False)]
        return {
            "bytes_sent": float(sum(c.sent_bytes for c in channels)),
            "bytes_received": float(sum(c.received_bytes for c in channels)),
        }

    def _run(self, key: CallKey, op: str, x: list[Tensor]) -> tuple[Tensor, ...]:
        kind, _, rest = op.partition("/")
        m = self.model
        if kind == "segment":
            return self._segment(key, rest.split(","), x)
        layer, _, arg = rest.partition("/")
        if kind == "heads":
            rope = rope_tables(self.cfg, x[0].shape[1], self.device)
            return (m.heads[f"{layer}_{arg}"](x[0], rope),)
        if kind == "experts":
            counts = [tuple(map(int, item.split(":"))) for item in arg.split(",")]
            rows = x[0].split([n for _, n in counts])
            return (torch.cat([m.experts[f"{layer}_{e}"](r) for (e, _), r in zip(counts, rows)]),)
        if kind == "shared":
            return (m.shared[layer](x[0]),)
        raise ValueError(f"unknown operation {op!r}")

    def _segment(self, key: CallKey, blocks: list[str], x: list[Tensor]) -> tuple[Tensor, Tensor]:
        m = self.model
        h = m.embed(x[0]) if blocks[0] == "embed" else x[0]
        aux = torch.zeros((), device=self.device)
        layers = [int(b) for b in blocks if b.isdigit()]
        if layers:
            rope = rope_tables(self.cfg, h.shape[1], self.device)
            seed = key.noise_seed(self.plan.training.seed, self.owner_index[key.data_owner])
            for i in layers:
                h, layer_aux = m.blocks[str(i)](h, rope, seed)
                aux = aux + layer_aux
        if "final_norm" in blocks:
            h = m.final_norm(h)
        if "lm_head" in blocks:
            return cross_entropy(m.lm_head(h), x[-1]), aux
        return h, aux

    # -- driving a data owner's batch ------------------------------------------------------

    def peer(self, org: str) -> Peer:
        return self.peers[org]

    def train_batch(self, step: int, tokens: Tensor, labels: Tensor, schedule: str | None = None) -> dict[str, float]:
        """Forward and backward one batch of this data owner through the whole split model.
        Gradients accumulate on every partition; :meth:`step` is called separately.

        Schedules: ``sequential`` runs micro-batches one after another (the deterministic
        reference); ``gpipe`` runs every forward, then every backward, with micro-batches in
        flight across organisations; ``1f1b`` starts a micro-batch's backward as soon as its
        forward is done and keeps at most ``max_in_flight`` micro-batches' activations alive."""
        t = self.plan.training
        schedule = schedule or t.schedule
        path = segments(self.plan, self.name)
        mbs = list(zip(tokens.chunk(t.micro_batches), labels.chunk(t.micro_batches)))
        losses: list = [None] * len(mbs)

        def forward(mb: int) -> None:
            losses[mb] = self._forward_micro_batch(step, mb, *mbs[mb], path)

        def backward(mb: int) -> None:
            with calling(CallKey(self.name, step, mb)):
                losses[mb][0].backward()

        if schedule == "sequential" or len(mbs) == 1:
            for mb in range(len(mbs)):
                forward(mb)
                backward(mb)
        else:
            run_schedule(schedule, len(mbs), t.max_in_flight or len(path), forward, backward)
        ce = sum(loss[1] for loss in losses) / len(mbs)
        aux = sum(loss[2] for loss in losses) / len(mbs)
        return {"loss": ce, "aux_loss": aux, "tokens": float(tokens.numel())}

    def evaluate_batch(self, tokens: Tensor, labels: Tensor) -> float:
        """Mean cross-entropy of this data owner's held-out batch through the split model, with
        the weights as they are (no graph, no gradients, no router noise). Micro-batches are
        shaped as in training, so every organisation checks them as it checks training calls."""
        t = self.plan.training
        path = segments(self.plan, self.name)
        total = 0.0
        with torch.no_grad():
            for mb, (tok, lab) in enumerate(zip(tokens.chunk(t.micro_batches), labels.chunk(t.micro_batches))):
                key = CallKey(self.name, EVAL_STEP, mb)
                with calling(key):
                    x = [tok.to(self.device)]
                    for org, blocks in path:
                        inputs = x + ([lab.to(self.device)] if "lm_head" in blocks else [])
                        out, _ = remote_call(self.peer(org), key, segment_op(blocks), inputs)
                        x = [out]
                total += float(x[0])
        return total / t.micro_batches

    def _forward_micro_batch(self, step: int, mb: int, tok: Tensor, lab: Tensor, path) -> tuple[Tensor, float, float]:
        """(objective of this micro-batch / micro_batches, its cross-entropy, its aux loss)."""
        key = CallKey(self.name, step, mb)
        with calling(key):
            x = [tok.to(self.device)]
            aux = torch.zeros((), device=self.device)
            for org, blocks in path:
                inputs = x + ([lab.to(self.device)] if "lm_head" in blocks else [])
                out, seg_aux = remote_call(self.peer(org), key, segment_op(blocks), inputs)
                x, aux = [out], aux + seg_aux
            ce = x[0]
            objective = (ce + self.cfg.aux_loss_coef * aux) / self.plan.training.micro_batches
        return objective, ce.item(), aux.item()

    # -- weights -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in self.model.bindings.items()}

    def partition_state(self, partition: Partition) -> dict[str, Tensor]:
        return {s.key: self.model.bindings[s.key].detach().clone() for s in unit_slices(self.cfg, partition.units)}

    def load_state(self, state: Mapping[str, Tensor]) -> None:
        """Overwrite some or all of this worker's weights (e.g. with the round's average)."""
        with torch.no_grad():
            for k, v in state.items():
                self.model.bindings[k].copy_(v)
