"""The coordinator: a Flower ServerApp that runs a federation's rounds.

    register every organisation's node          query.register
    for each round:
        send each organisation its weights      train.begin   (its partitions only)
        collect what each one trained           train         (deployment: both in one train.round)
        average replicas within their groups, keep local pieces apart
        reassemble the full model, checkpoint it, log the round and the held-out evaluation

An organisation that fails is reported by name with the reason; the round is rerun from the
last good weights without it when every partition still has a holder, and the run stops with
a clear error otherwise.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import json
import time
from collections.abc import Iterable
from contextlib import ExitStack
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ..plan import Plan, select
from ..runtime.round_spec import RoundSpec
from ..runtime.rounds import AFTER
from ..runtime.weights import base_identity, trained_weights
from ..transport.security import load_verifiers, token_verifier
from .aggregate import aggregate_round, make_aggregator, unchanged_after_rounds
from .checkpoint import CHECKPOINTS, check_base, latest_checkpoint, layout_hash, plan_hash, write_checkpoint
from .exchange import FederationError, Outcome, exchange, register
from .records import RoundConfig
from .rundir import MetricsLog, TaskHeldOut, evaluation_record, skipped_checkpoint_record
from .settings import CoordinatorSettings

app = ServerApp()
RESULT_FILE = "result.json"
RELEASE_TIMEOUT_S = 60.0  # how long the end of a run waits for the clients to hear it


def run_result(run_dir: Path) -> dict | None:
    """How the run's coordinator said it ended (``result.json``); None if it never said."""
    result = Path(run_dir) / RESULT_FILE
    return json.loads(result.read_text()) if result.exists() else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = CoordinatorSettings.find(context.run_config)
    if settings is not None:  # fedsplit simulate or fedsplit coordinator started the workers
        coordinate(grid, settings)
        return
    from .app_run import STARTUP_ERRORS, app_simulation  # a bare `flwr run .`: this app starts them

    with ExitStack() as stack:
        try:
            settings = stack.enter_context(app_simulation(context.run_config, len(list(grid.get_node_ids()))))
        except STARTUP_ERRORS as e:  # a bad plan or run config: one line that says what to change
            log(ERROR, "fedsplit: cannot start: %s", e)
            return
        coordinate(grid, settings)


def coordinate(grid: Grid, settings: CoordinatorSettings) -> None:
    """Run every round, and say in the run's ``result.json`` how the run ended."""
    result = Path(settings.run_dir) / RESULT_FILE
    try:
        Coordinator(grid, settings).run()
    except Exception as e:
        result.write_text(json.dumps({"status": "failed", "error": str(e)}))
        log(WARNING, "fedsplit: the run stopped: %s", e)
        raise
    result.write_text(json.dumps({"status": "finished"}))


def expert_load(metrics: dict[str, dict[str, float]], num_experts: int) -> dict[str, list[float]]:
    """Per layer, the fraction of routed (token, slot) rows each expert received this round,
    summed over the organisations that route that layer for some data owner."""
    counts: dict[str, list[float]] = {}
    for m in metrics.values():
        for key, n in m.items():
            if key.startswith("expert_load/"):
                _, layer, e = key.split("/")
                counts.setdefault(layer, [0.0] * num_experts)[int(e)] += n
    return {layer: [n / (sum(c) or 1.0) for n in c] for layer, c in sorted(counts.items(), key=lambda kv: int(kv[0]))}


def capacity_dropped(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Per layer, the fraction of (token, slot) assignments that expert capacity dropped this
    round, over every organisation that routes that layer."""
    assigned: dict[str, float] = {}
    routed: dict[str, float] = {}
    for m in metrics.values():
        for key, n in m.items():
            if key.startswith("assignments/"):
                layer = key.split("/")[1]
                assigned[layer] = assigned.get(layer, 0.0) + n
            elif key.startswith("expert_load/"):
                layer = key.split("/")[1]
                routed[layer] = routed.get(layer, 0.0) + n
    return {layer: 1.0 - routed.get(layer, 0.0) / n for layer, n in sorted(assigned.items(), key=lambda kv: int(kv[0]))}


STEP_SERIES = ("lr", "grad_norm", "clip_factor")  # per-step metrics: "<name>/<step>" keys of data owners'


def step_series(metrics: dict[str, dict[str, float]], owners) -> dict[str, list[float]]:
    """The round's per-step learning rate (and gradient norm and clip factor, with clipping), as
    the first data owner that reports them saw them: every organisation applies the same ones."""
    for d in owners:
        series = {}
        for name in STEP_SERIES:
            steps = sorted((int(k.split("/")[1]), v) for k, v in metrics.get(d, {}).items() if k.startswith(f"{name}/"))
            if steps:
                series[name] = [v for _, v in steps]
        if series:
            return series
    return {}


class Coordinator:
    """A run's rounds from the coordinator's side. Its ~230 lines keep the algorithm in one place,
    as Flower's own strategies do: registering, each round's messages, the reruns without the
    organisations that are gone, aggregation, checkpoints and evaluation; the message waves
    themselves are :mod:`.exchange`'s."""

    def __init__(self, grid: Grid, settings: CoordinatorSettings):
        self.grid, self.settings = grid, settings
        self.plan: Plan = settings.load_plan()
        self.run_dir = Path(settings.run_dir)
        self.run_id = self.run_dir.name
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.checkpoints = self.run_dir / CHECKPOINTS
        self.hash, self.layout = plan_hash(self.plan), layout_hash(self.plan)
        self.base = base_identity(self.plan) if self.plan.frozen else None
        self.aggregator = make_aggregator(self.plan)
        self.verifiers = load_verifiers(settings.credentials) if settings.credentials else None
        self.weights, self.local, self.first_round = self._starting_point(settings.resume)
        self.evaluates = self.plan.training.eval_tokens > 0
        # The final model is evaluated inside the last round when the round's aggregation leaves it
        # as trained; else in a round of zero steps after it (one more message per organisation).
        self.evaluates_after = self.evaluates and unchanged_after_rounds(self.plan)
        self.final_evaluated = False
        self.node_of: dict[str, int] = {}
        self.addresses: dict[str, str] = {}
        self.alive: set[str] = set()
        self.failures: dict[str, str] = {}  # why each organisation that is gone failed

    def _starting_point(self, resume: bool) -> tuple[dict, dict, int]:
        """(weights, each organisation's local pieces, first round): those of the last complete
        round when resuming, else the plan's initial weights."""
        last = latest_checkpoint(self.checkpoints) if resume else None
        if last is None:
            weights = trained_weights(self.plan)
            local = {
                o: select(weights, self.plan.slices_of(o, local_only=True, trained_only=True)) for o in self.plan.orgs
            }
            return weights, local, 1
        if last.manifest.get("plan_hash") != self.hash:
            raise FederationError(
                f"{last.path} was written for another plan (hash {last.manifest.get('plan_hash')}, "
                f"this plan is {self.hash}); resume with the plan it was started with"
            )
        if self.base is not None:
            check_base(last, self.base)
        try:
            self.aggregator.load_state_dict(last.server_state)
        except ValueError as e:
            raise FederationError(
                f"{last.path}: {e}; resume with the aggregation strategy the run was started with "
                f"(this plan's is {self.plan.aggregation.strategy})"
            ) from None
        record = last.manifest.get("metrics")
        self.metrics.resume_after(last.round, {**record, "checkpoint": str(last.path)} if record else None)
        for skipped in last.skipped:
            log(WARNING, "fedsplit: %s; resuming from round %d", skipped.error, last.round)
            self.metrics.write(skipped_checkpoint_record(skipped, last.round))
        log(INFO, "fedsplit: resuming %s after round %d", self.run_id, last.round)
        return last.weights, last.local, last.round + 1

    # -- the algorithm ---------------------------------------------------------------------------

    def run(self) -> None:
        self.register()
        for r in range(self.first_round, self.plan.training.rounds + 1):
            self.train_round(r)
        if self.evaluates and not self.final_evaluated:
            self.evaluate_final()
        if self.settings.release_clients:
            self.release_clients()

    def register(self) -> None:
        """Learn which node is which organisation and where its data plane listens."""
        expected = len(self.plan.orgs)
        log(
            INFO,
            "fedsplit: waiting up to %.0f s for %d organisations to join: %s",
            self.settings.node_timeout_s,
            expected,
            ", ".join(self.plan.orgs),
        )

        def joined(count: int) -> None:
            log(INFO, "fedsplit: %d of %d organisations joined", count, expected)
            self.metrics.write({"event": "joined", "joined": count, "expected": expected})

        self.node_of, self.addresses = register(
            self.grid,
            self.plan,
            self.settings.node_timeout_s,
            self.settings.message_timeout_s,
            self._check_identity,
            joined,
            self.settings.simulation,
        )
        self.alive = set(self.plan.orgs)
        log(INFO, "fedsplit: %d organisations registered: %s", len(self.alive), ", ".join(sorted(self.alive)))

    def release_clients(self) -> None:
        """Tell every organisation still in the run that it is over, so that its client exits
        instead of waiting for another run; one that does not hear it keeps serving."""
        config = ConfigRecord({"run": self.run_id})
        msgs = {
            org: Message(RecordDict({"config": config}), dst_node_id=self.node_of[org], message_type="query.end")
            for org in sorted(self.alive)
        }
        outcome = exchange(self.grid, msgs, min(self.settings.message_timeout_s, RELEASE_TIMEOUT_S))
        for org, reason in sorted(outcome.failed.items()):
            log(WARNING, "fedsplit: could not tell %s that the run is over (%s): stop its client by hand", org, reason)

    def _check_identity(self, org: str, info) -> None:
        """With credentials, a node proves it is ``org`` by its token; a deployed client also says
        which plan layout its worker was built from, which must be the coordinator's."""
        if self.verifiers is not None and not hmac.compare_digest(
            token_verifier(str(info["token"])), self.verifiers.get(org, "")
        ):
            raise FederationError(
                f"a node says it is organisation {org!r} but does not hold its token; "
                f"give that organisation its credentials from `fedsplit certs`"
            )
        layout = str(info["layout"])
        if layout and layout != self.layout:
            raise FederationError(
                f"organisation {org!r} runs a different plan (layout {layout}, the coordinator's is {self.layout}): "
                f"every organisation needs the same model, partitions and batch settings"
            )

    def train_round(self, r: int) -> None:
        t = self.plan.training
        started = time.monotonic()
        spec, outcome = self._run_round(lambda: self._round_spec(r, t.steps_per_round))
        metrics = outcome.metrics()
        per_step = ("expert_load/", "assignments/", AFTER, *(f"{name}/" for name in STEP_SERIES))
        org_metrics = {org: {k: v for k, v in m.items() if not k.startswith(per_step)} for org, m in metrics.items()}
        self._log_evaluation(r - 1, spec, org_metrics)
        trained = {org: reply.content["arrays"].to_torch_state_dict() for org, reply in outcome.replies.items()}
        self.weights, self.local = aggregate_round(
            self.plan, self.weights, self.local, trained, org_metrics, self.alive, round=r, aggregator=self.aggregator
        )
        seconds = time.monotonic() - started
        owners = spec.data_owners
        tokens = sum(org_metrics[d]["tokens"] for d in owners)
        loss = sum(org_metrics[d]["loss"] * org_metrics[d]["tokens"] for d in owners) / max(tokens, 1)
        record = {
            "round": r,
            "event": "round",
            "steps": t.steps_per_round,
            "seconds": seconds,
            "loss": loss,
            "tokens": tokens,
            "orgs": org_metrics,
            "expert_load": expert_load(metrics, self.plan.model.num_experts),
            **step_series(metrics, spec.data_owners),
            "alive": sorted(self.alive),
        }
        if self.plan.model.router.capacity_factor is not None:
            record["capacity_dropped"] = capacity_dropped(metrics)
        if self.plan.privacy is not None and (self.plan.privacy.activations or self.plan.privacy.gradients):
            record["privacy"] = {
                "delta": self.plan.privacy.delta,
                "epsilon": {d: org_metrics[d]["epsilon"] for d in owners if "epsilon" in org_metrics[d]},
            }
        path = write_checkpoint(
            self.checkpoints,
            r,
            self.weights,
            self.local,
            {
                "plan": self.plan.name,
                "plan_hash": self.hash,
                "run": self.run_id,
                "next_step": spec.last_step + 1,
                "metrics": record,
                "optimizer_state": "kept by each organisation's worker (state dir), per round",
                **({"base": self.base} if self.base else {}),
            },
            server_state=self.aggregator.state_dict(),
        )
        self.metrics.write({**record, "checkpoint": str(path)})
        log(
            INFO,
            "fedsplit: round %d/%d: loss %.4f, %d tokens, %.1f s -> %s",
            r,
            t.rounds,
            loss,
            record["tokens"],
            seconds,
            path,
        )
        if spec.evaluate_after:
            after = {
                org: {k.removeprefix(AFTER): v for k, v in m.items() if k.startswith(AFTER)}
                for org, m in metrics.items()
            }
            self._log_evaluation(r, spec, after)
            self.final_evaluated = True

    def evaluate_final(self) -> None:
        """The last round's model on held-out data: a round of zero steps that only evaluates."""
        last = self.plan.training.rounds
        spec, outcome = self._run_round(lambda: self._round_spec(last + 1, 0))
        metrics = outcome.metrics()
        self._log_evaluation(last, spec, metrics)

    def _log_evaluation(self, r: int, spec: RoundSpec, metrics: dict[str, dict[str, float]]) -> None:
        """Held-out metrics of the model after round ``r`` (0: the initial model), per data owner
        and overall (perplexity, token-weighted; a task's accuracy, example-weighted), as the data
        owners measured them through the split model."""
        measured = {d: metrics[d] for d in spec.data_owners if "eval_loss" in metrics.get(d, {})}
        if not measured:
            return
        lm = {d: (m["eval_loss"], m["eval_tokens"]) for d, m in measured.items() if "eval_tokens" in m}
        tasks = {
            d: TaskHeldOut(self.plan.orgs[d].task, m["eval_loss"], m["eval_accuracy"], m["eval_examples"])
            for d, m in measured.items()
            if "eval_examples" in m
        }
        record = evaluation_record(r, lm, tasks)
        self.metrics.write(record)
        if "ppl" in record:
            log(
                INFO,
                "fedsplit: held-out after round %d: loss %.4f, perplexity %.2f (%d tokens)",
                r,
                record["loss"],
                record["ppl"],
                record["tokens"],
            )
        for name, t in record.get("tasks", {}).items():
            log(INFO, "fedsplit: held-out after round %d: task %s accuracy %.1f%%", r, name, 100 * t["accuracy"])

    def _run_round(self, make_spec) -> tuple[RoundSpec, Outcome]:
        """Begin and collect a round; rerun it (a new attempt) without organisations that are gone,
        or stop."""
        for attempt in itertools.count():
            spec = dataclasses.replace(make_spec(), attempt=attempt)
            if self.settings.one_message_per_round:
                outcome = self._whole_round(spec)
            else:
                outcome = self._begin(spec)
                if outcome.failed:  # the others end this attempt (their replies say nothing new) before it is rerun
                    self._collect(spec, [org for org in self.alive if org not in outcome.failed])
                else:
                    outcome = self._collect(spec)
            if not outcome.failed:
                return spec, outcome
            for org, reason in sorted(outcome.failed.items()):
                log(WARNING, "fedsplit: round %d: organisation %s failed: %s", spec.round, org, reason)
            self.metrics.write(
                {"round": spec.round, "event": "round-failed", "failed": outcome.failed, "gone": sorted(outcome.gone)}
            )
            if not outcome.gone:
                raise FederationError(
                    f"round {spec.round} failed and no organisation is gone to exclude: {outcome.failed}"
                )
            self.alive -= outcome.gone
            self.failures.update({org: outcome.failed[org] for org in outcome.gone})
            log(
                WARNING,
                "fedsplit: round %d: rerunning from the last good weights without %s",
                spec.round,
                ", ".join(sorted(outcome.gone)),
            )

    # -- the messages ------------------------------------------------------------------------

    def _round_spec(self, r: int, steps: int) -> RoundSpec:
        plan = self.plan
        why = "".join(f"; {org} failed: {reason}" for org, reason in sorted(self.failures.items()))
        orphaned = [p.name for p in plan.partitions if not set(p.holders) & self.alive]
        if orphaned:
            raise FederationError(f"no organisation left that holds {', '.join(orphaned)}: cannot go on{why}")
        owners = tuple(d for d in plan.data_owners if plan.path_orgs(d) <= self.alive)
        if not owners:
            raise FederationError(f"no data owner left whose whole path of organisations is alive{why}")
        first = (r - 1) * plan.training.steps_per_round
        last = r == plan.training.rounds and steps > 0
        return RoundSpec(
            r, first, steps, owners, r - 1, evaluate=self.evaluates, evaluate_after=last and self.evaluates_after
        )

    def _weights_of(self, org: str) -> dict:
        """Its partitions' current weights that train (it loads a frozen base itself, once): its own
        version of the pieces it keeps local."""
        return {**select(self.weights, self.plan.slices_of(org, trained_only=True)), **self.local.get(org, {})}

    def _config(self, spec: RoundSpec) -> ConfigRecord:
        addresses = {o: a for o, a in self.addresses.items() if o in self.alive}
        return RoundConfig(self.run_id, spec, self.settings.round_timeout_s, addresses).record()

    def _begin(self, spec: RoundSpec) -> Outcome:
        return exchange(self.grid, self._messages(spec, "train.begin", self.alive), self.settings.message_timeout_s)

    def _whole_round(self, spec: RoundSpec) -> Outcome:
        timeout = self.settings.round_timeout_s + self.settings.message_timeout_s
        return exchange(self.grid, self._messages(spec, "train.round", self.alive), timeout)

    def _collect(self, spec: RoundSpec, orgs: Iterable[str] | None = None) -> Outcome:
        msgs = self._messages(spec, "train", self.alive if orgs is None else orgs)
        return exchange(self.grid, msgs, self.settings.round_timeout_s + self.settings.message_timeout_s)

    def _messages(self, spec: RoundSpec, message_type: str, orgs: Iterable[str]) -> dict[str, Message]:
        """One message of the round per organisation: its config, and the weights of its
        partitions with every message that begins the round."""
        config = self._config(spec)

        def content(org: str) -> RecordDict:
            if message_type == "train":
                return RecordDict({"config": config})
            return RecordDict({"arrays": ArrayRecord(torch_state_dict=self._weights_of(org)), "config": config})

        return {
            org: Message(
                content(org), dst_node_id=self.node_of[org], message_type=message_type, group_id=str(spec.round)
            )
            for org in sorted(orgs)
        }
