"""One organisation's share of the model, built by transforming the monolithic model's blocks.

For every layer an organisation *owns* (holds its router) it builds the model's own
:class:`~fedsplit.model.Block` and swaps two containers for ones with the same call signature:

* ``attention`` becomes :class:`HeadGroups`: the sum of each head group's partial output,
  computed locally or by the organisation that serves that group;
* ``moe.experts`` becomes :class:`SplitExperts`: local experts run here, remote experts get
  their tokens' rows in one call per serving organisation.

Pieces it holds in layers it does not own (carve-outs) are served to the layer's owner.
Every parameter is bound to its monolithic name (or slice name, see :mod:`fedsplit.plan.slicing`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..model import (
    TASK_HEADS,
    Attention,
    Block,
    LoraDropout,
    ModelConfig,
    RMSNorm,
    SharedExperts,
    SwiGLU,
    chunked_cross_entropy,
    correct_labels,
    cross_entropy,
    expert,
    lora_code,
    lora_dropout,
    lora_update,
    rope_tables,
    run_block,
)
from ..plan import Partition, Plan, Unit
from ..plan.slicing import head_run_slices, hub_adapter_slices, kv_runs
from .calls import CallKey, current_call, remote_call, remote_calls
from .ops import ExpertsOp, HeadsOp, Op, SegmentOp, SharedOp
from .protocols import Peer

# Given a partition, the peer serving it for the current call's data owner, or None when it is
# this organisation itself.
Resolver = Callable[[Partition], Peer | None]


class HeadGroup(nn.Module):
    """The query heads that read a run of KV heads: :class:`~fedsplit.model.Attention` of those
    heads (its rows of q/k/v, its columns of o_proj), plus their share of the attention adapters.

    LoRA's ``A`` of q/k/v and ``B`` of o_proj act on all of a layer's heads at once, so the layer's
    block holds them (:class:`HeadGroups`): it sends ``codes``, ``[A_q x, A_k x, A_v x]`` (those
    adapted), with ``x``; the group adds its rows of ``B_q codes_q`` (...) to its projections and
    returns, besides its partial output, ``z``: its columns of ``A_o`` times its heads' output. The
    block sums both over the groups and adds ``B_o z``. That is the monolith's maths regrouped:
    ``W_o y + s B_o A_o y = sum_g W_o[:, g] y_g + s B_o (sum_g A_o[:, g] y_g)``, and with one
    group it is :class:`~fedsplit.model.LoRALinear`'s own arithmetic, in its order."""

    def __init__(self, cfg: ModelConfig, num_heads: int, num_kv_heads: int, first_head: int = 0):
        super().__init__()
        self.attention = Attention(cfg.base, num_heads, num_kv_heads)
        # Its columns of o_proj's input, of all the layer's heads': where it reads LoRA dropout's mask.
        self.columns = (
            first_head * cfg.head_dim,
            (first_head + num_heads) * cfg.head_dim,
            cfg.num_heads * cfg.head_dim,
        )
        lora = cfg.lora
        self.adapted = cfg.adapted_qkv
        self.scaling = lora.scaling if lora is not None else 1.0
        self.lora_B = nn.ModuleDict(
            {p: nn.Linear(lora.rank, getattr(self.attention, p).out_features, bias=False) for p in self.adapted}
        )
        self.o_lora_A = nn.Linear(num_heads * cfg.head_dim, lora.rank, bias=False) if cfg.adapts("o_proj") else None

    def parameter(self, name: str) -> nn.Parameter:
        """A parameter by its name in the monolith's :class:`~fedsplit.model.Attention`."""
        if name == "o_proj.lora_A.weight":
            return self.o_lora_A.weight
        if name.endswith(".lora_B.weight"):
            return self.lora_B[name.split(".")[0]].weight
        return self.attention.get_parameter(name)

    def forward(
        self,
        x: Tensor,
        code: Callable[[str], Tensor],
        rope: tuple[Tensor, Tensor],
        dropout: LoraDropout | None = None,
    ) -> tuple[Tensor, ...]:
        """``code(p)``: the code ``A_p x`` of adapted projection ``p`` (LoRA dropout applied by the
        block), asked for in the order the monolith computes it (so that a group in the block's
        own process adds up gradients in the monolith's order). ``dropout``: o_proj's, on this
        group's columns of the mask of the whole layer's heads' output."""
        a = self.attention
        q, k, v = (
            getattr(a, p)(x) + lora_update(self.lora_B[p], code(p), x.dtype, self.scaling)
            if p in self.lora_B
            else getattr(a, p)(x)
            for p in ("q_proj", "k_proj", "v_proj")
        )
        y = a.mix(q, k, v, rope)
        if self.o_lora_A is None:
            return (a.o_proj(y),)
        read = y
        if dropout is not None:
            start, stop, width = self.columns
            read = y * dropout.mask("o_proj", (*y.shape[:-1], width), y.device, y.dtype)[..., start:stop]
        return a.o_proj(y), lora_code(self.o_lora_A, read)


def received_codes(adapted: tuple[str, ...], codes: Tensor | None) -> Callable[[str], Tensor]:
    """The code of each adapted projection out of the ``codes`` a :class:`HeadsOp` carries (the
    adapted ones' side by side, in q, k, v order)."""
    parts = dict(zip(adapted, codes.chunk(len(adapted), dim=-1))) if codes is not None else {}
    return parts.__getitem__


class HeadGroups(nn.Module):
    """Stands in for ``Block.attention``: sums the partial outputs of the layer's head groups,
    and applies the attention adapters' factors that act on all heads (see :class:`HeadGroup`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        runs: list[tuple[tuple[int, int], Partition]],
        local: Mapping[str, HeadGroup],
        resolve: Resolver,
    ):
        super().__init__()
        self.layer = layer
        self.runs = runs
        self.local = nn.ModuleDict(local)
        self.resolve = resolve
        lora, d = cfg.lora, cfg.hidden_size
        self.lora_A = nn.ModuleDict({p: nn.Linear(d, lora.rank, bias=False) for p in cfg.adapted_qkv})
        self.o_lora_B = nn.Linear(lora.rank, d, bias=False) if cfg.adapts("o_proj") else None
        self.scaling = lora.scaling if lora is not None else 1.0

    def hub_parameter(self, target: str) -> nn.Parameter:
        """The factor of ``target``'s adapter held here (q/k/v: ``A``; o_proj: ``B``)."""
        return self.o_lora_B.weight if target == "o_proj" else self.lora_A[target].weight

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], dropout: LoraDropout | None = None) -> Tensor:
        peers = [(run, self.resolve(partition)) for run, partition in self.runs]
        key = current_call()
        remote = [(run, peer) for run, peer in peers if peer is not None]

        def code(p: str) -> Tensor:
            return lora_code(self.lora_A[p], x if dropout is None else dropout.of(p)(x))

        inputs = [x]
        if remote and len(self.lora_A):
            inputs.append(torch.cat([code(p) for p in self.lora_A], dim=-1))
        results = remote_calls([(peer, key, HeadsOp(self.layer, run), inputs) for run, peer in remote])
        partial = {
            run: self.local[f"{run[0]}-{run[1]}"](x, code, rope, dropout) for run, peer in peers if peer is None
        }  # while the remote ones work
        partial.update((run, out) for (run, _), out in zip(remote, results()))
        total = z = None
        for run, _ in peers:
            total = partial[run][0] if total is None else total + partial[run][0]
            if self.o_lora_B is not None:
                z = partial[run][1] if z is None else z + partial[run][1]
        if self.o_lora_B is not None:
            total = total + lora_update(self.o_lora_B, z, total.dtype, self.scaling)
        return total


class SplitExperts(nn.Module):
    """Stands in for ``MoE.experts``: one call per serving organisation, not one per expert."""

    def __init__(
        self, layer: int, partition_of: Mapping[int, Partition], local: Mapping[int, SwiGLU], resolve: Resolver
    ):
        super().__init__()
        self.layer = layer
        self.partition_of = partition_of
        self.local = nn.ModuleDict({str(e): m for e, m in local.items()})
        self.resolve = resolve

    def forward(self, rows: dict[int, Tensor], dropout: LoraDropout | None = None) -> dict[int, Tensor]:
        """``dropout``: the local experts' (a remote one draws its own, from the call)."""
        local: list[int] = []
        remote: dict[str, tuple[Peer, list[int]]] = {}
        for e in rows:
            peer = self.resolve(self.partition_of[e])
            if peer is None:
                local.append(e)
            else:
                remote.setdefault(peer.name, (peer, []))[1].append(e)
        key = current_call()
        counts = [{e: rows[e].shape[0] for e in experts} for _, experts in remote.values()]
        results = remote_calls(
            [
                (peer, key, ExpertsOp(self.layer, tuple(c.items())), [torch.cat([rows[e] for e in c])])
                for (peer, _), c in zip(remote.values(), counts)
            ]
        )
        out = {e: self.local[str(e)](rows[e], None if dropout is None else dropout.at(e)) for e in local}
        for c, (y,) in zip(counts, results()):
            out.update(zip(c, y.split(list(c.values()))))
        return out


class RemoteShared(nn.Module):
    """Stands in for ``MoE.shared_experts`` when another organisation holds them."""

    def __init__(self, layer: int, partition: Partition, resolve: Resolver):
        super().__init__()
        self.layer, self.partition, self.resolve = layer, partition, resolve

    def forward(self, x: Tensor, dropout: LoraDropout | None = None) -> Tensor:
        """``dropout`` is the holder's to draw, from the call."""
        (y,) = remote_call(self.resolve(self.partition), current_call(), SharedOp(self.layer), [x])
        return y


class PartialModel(nn.Module):
    """The modules of one organisation, with ``bindings`` from monolithic names to parameters."""

    def __init__(self, plan: Plan, org: str, device: torch.device, resolve: Resolver, recompute: bool = False):
        """``recompute``: activation checkpointing (blocks, served pieces and the loss recompute
        their forward in backward)."""
        super().__init__()
        cfg = self.cfg = plan.model
        self.recompute = recompute
        self.bindings: dict[str, nn.Parameter] = {}
        self.seed = plan.training.seed  # router noise: a function of (seed, step, data owner, micro-batch, layer)
        self.owner_index = {d: i for i, d in enumerate(plan.data_owners)}
        self.blocked = {d: plan.blocked_experts(d) for d in plan.data_owners}  # other owners' experts
        mine = [p for p in plan.partitions if org in p.holders]
        units = {u for p in mine for u in p.units}
        with torch.device("meta"):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if Unit("embed") in units else None
            self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if Unit("final_norm") in units else None
            self.lm_head = (
                nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                if Unit("lm_head") in units and not cfg.tie_embeddings
                else None
            )
            self.task_heads = nn.ModuleDict(
                {
                    u.name: nn.Linear(cfg.hidden_size, len(cfg.task(u.name).labels), bias=False)
                    for u in sorted(units)
                    if u.kind == "task"
                }
            )
            self.heads = nn.ModuleDict()
            self.experts = nn.ModuleDict()
            self.shared = nn.ModuleDict()
            self.blocks = nn.ModuleDict()
            for p in mine:
                self._build_pieces(cfg, p)
            for i in range(cfg.num_layers):
                if Unit("router", i) in units:
                    self.blocks[str(i)] = self._build_block(cfg, plan, i, resolve)
        self.to_empty(device=device)
        if cfg.tie_embeddings and Unit("lm_head") in units:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.embed.weight
        self._bind(units)

    def _build_pieces(self, cfg: ModelConfig, partition: Partition) -> None:
        kv: dict[int, list[int]] = {}
        for u in partition.units:
            if u.kind == "kv":
                kv.setdefault(u.layer, []).append(u.index)
            elif u.kind == "expert":
                self.experts[f"{u.layer}_{u.index}"] = expert(cfg)
            elif u.kind == "shared_experts":
                self.shared[str(u.layer)] = SharedExperts(cfg)
        for layer, groups in kv.items():
            for g0, g1 in kv_runs(groups):
                per = cfg.heads_per_kv_head
                self.heads[f"{layer}_{g0}-{g1}"] = HeadGroup(cfg, (g1 - g0) * per, g1 - g0, g0 * per)

    def _build_block(self, cfg: ModelConfig, plan: Plan, i: int, resolve: Resolver) -> Block:
        """The model's Block for layer ``i`` with its carved-out parts replaced."""
        block = Block(cfg, i)
        runs = []
        for p in plan.partitions:
            groups = [u.index for u in p.units if u.kind == "kv" and u.layer == i]
            runs += [(run, p) for run in kv_runs(groups)]
        runs.sort(key=lambda rp: rp[0])
        local_heads = {f"{a}-{b}": self.heads[f"{i}_{a}-{b}"] for (a, b), _ in runs if f"{i}_{a}-{b}" in self.heads}
        block.attention = HeadGroups(cfg, i, runs, local_heads, resolve)

        partition_of = {e: plan.partition_of(Unit("expert", i, e)) for e in range(cfg.num_experts)}
        local_experts = {e: self.experts[f"{i}_{e}"] for e in range(cfg.num_experts) if f"{i}_{e}" in self.experts}
        block.moe.experts = SplitExperts(i, partition_of, local_experts, resolve)
        if cfg.num_shared_experts:
            shared = plan.partition_of(Unit("shared_experts", i))
            block.moe.shared_experts = (
                self.shared[str(i)] if str(i) in self.shared else RemoteShared(i, shared, resolve)
            )
        return block

    def _bind(self, units: set[Unit]) -> None:
        """Name every parameter by its monolithic name, in model order (this order is also the
        optimizer's, so that two organisations' states line up)."""
        for u in sorted(units, key=lambda u: u.position):
            if u.kind == "embed":
                self.bindings["embed.weight"] = self.embed.weight
            elif u.kind == "final_norm":
                self.bindings["final_norm.weight"] = self.final_norm.weight
            elif u.kind == "lm_head" and not self.cfg.tie_embeddings:
                self.bindings["lm_head.weight"] = self.lm_head.weight
            elif u.kind == "task":
                self.bindings[f"{TASK_HEADS}.{u.name}.weight"] = self.task_heads[u.name].weight
            elif u.kind == "router":
                block = self.blocks[str(u.layer)]
                p = f"layers.{u.layer}"
                self.bindings[f"{p}.attn_norm.weight"] = block.attn_norm.weight
                self.bindings[f"{p}.ffn_norm.weight"] = block.ffn_norm.weight
                self.bindings[f"{p}.moe.router.weight"] = block.moe.router.weight
                if block.moe.group_router is not None:
                    self.bindings[f"{p}.moe.group_router.weight"] = block.moe.group_router.weight
                for target, factor in hub_adapter_slices(self.cfg, u.layer).items():
                    self.bindings[factor.key] = block.attention.hub_parameter(target)
            elif u.kind == "expert":
                self._bind_module(f"layers.{u.layer}.moe.experts.{u.index}", self.experts[f"{u.layer}_{u.index}"])
            elif u.kind == "shared_experts":
                self._bind_module(f"layers.{u.layer}.moe.shared_experts", self.shared[str(u.layer)])
        for name, attn in self.heads.items():
            layer, run = name.split("_")
            g0, g1 = map(int, run.split("-"))
            for param, s in head_run_slices(self.cfg, int(layer), (g0, g1)).items():
                self.bindings[s.key] = attn.parameter(param)

    def _bind_module(self, prefix: str, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            self.bindings[f"{prefix}.{name}"] = param

    @torch.no_grad()
    def load_selection(self, state: Mapping[str, Tensor]) -> None:
        """Copy weights in by monolithic (slice) name; every bound name must be present."""
        missing = sorted(self.bindings.keys() - state.keys())
        if missing:
            raise KeyError(f"weights missing for {', '.join(missing[:5])}")
        for key, param in self.bindings.items():
            param.copy_(state[key])

    def compute(self, key: CallKey, op: Op, x: list[Tensor]) -> tuple[Tensor, ...]:
        """What ``op`` computes on its (checked) inputs ``x`` for ``key``'s micro-batch."""
        if isinstance(op, SegmentOp):
            return self._segment(key, op, x)
        piece = self._piece(key, op)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(piece, *x, use_reentrant=False)
        return piece(*x)

    def _piece(self, key: CallKey, op: HeadsOp | ExpertsOp | SharedOp) -> Callable[..., tuple[Tensor, ...]]:
        """The function of its inputs that a served piece computes (with LoRA dropout drawn for
        ``key``'s micro-batch as the layer's runner and the monolith draw it)."""
        seed = key.noise_seed(self.seed, self.owner_index[key.data_owner])
        dropout = lora_dropout(self.cfg, seed, op.layer, self.training)
        if isinstance(op, HeadsOp):
            group = self.heads[f"{op.layer}_{op.kv_heads[0]}-{op.kv_heads[1]}"]
            return lambda x, codes=None: group(
                x, received_codes(group.adapted, codes), rope_tables(self.cfg, x.shape[1], x.device), dropout
            )
        if isinstance(op, ExpertsOp):
            experts = [(e, self.experts[f"{op.layer}_{e}"]) for e in op.experts]
            return lambda x: (
                torch.cat(
                    [
                        f(r, None if dropout is None else dropout.at(e))
                        for (e, f), r in zip(experts, x.split([n for _, n in op.rows]))
                    ]
                ),
            )
        shared = self.shared[str(op.layer)]
        return lambda x: (shared(x, dropout),)

    def _segment(self, key: CallKey, op: SegmentOp, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        h = self.embed(x[0]) if op.blocks[0] == "embed" else x[0]
        aux = torch.zeros((), device=h.device)
        if op.layers:
            rope = rope_tables(self.cfg, h.shape[1], h.device)
            seed = key.noise_seed(self.seed, self.owner_index[key.data_owner])
            for i in op.layers:
                h, layer_aux = run_block(
                    self.blocks[str(i)], h, rope, seed, self.recompute, self.blocked[key.data_owner]
                )
                aux = aux + layer_aux
        if "final_norm" in op.blocks:
            h = self.final_norm(h)
        if op.takes_labels:
            head = self.lm_head if op.task is None else self.task_heads[op.task]
            if op.task is not None and not torch.is_grad_enabled():  # held out: also how many it gets right
                logits = head(h)
                return cross_entropy(logits, x[-1]), aux, correct_labels(logits, x[-1])
            loss = chunked_cross_entropy(h, head, x[-1]) if self.recompute else cross_entropy(head(h), x[-1])
            return loss, aux
        return h, aux
