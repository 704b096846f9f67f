"""Rounds that the workers run among themselves, in step with one another.

The coordinator only starts a round and later collects it (two messages per organisation per
round), so the order in which Flower delivers those messages cannot deadlock training: a data
owner's worker drives its steps on its own thread, and every worker applies its optimizer for
step ``s`` once each data owner whose batches pass through it has reported step ``s`` finished
(the step barrier). A data owner starts only when every organisation on its path has begun the
round, i.e. holds the round's weights.

A round may begin with a held-out evaluation: each data owner runs its held-out batches through
the split model with the weights just received (the previous round's reassembled model) before
its first step. A round of zero steps only evaluates (the final model's evaluation).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .driver import held_out_metrics
from .optim import OptimizerStates, make_optimizer
from .privacy import epsilon, mechanisms
from .protocols import RoundControl, Traffic
from .round_spec import RoundSpec
from .threads import align_threads, compute_pool
from .worker import Worker

log = logging.getLogger(__name__)

# How often a step barrier that is still waiting checks that the data owners it waits for are alive.
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
PROBES_BEFORE_GIVING_UP = 3
MAX_REASON = 1024  # characters of an abort's reason that are kept
MAX_EARLY_ABORTS = 16  # aborts of rounds not yet begun that are kept (the oldest go first)


AFTER = "after/"  # the prefix of metrics of the weights after a round's last step (evaluate_after)


class RoundFailed(RuntimeError):
    pass


class Rounds:
    """One organisation's side of the rounds: its step barrier and, for a data owner, the thread
    that drives its batches. ``state_dir`` keeps the optimizer state of each complete round, so
    that a restarted worker resumes exactly."""

    def __init__(
        self,
        worker: Worker,
        batches: Callable[[int], tuple[Tensor, Tensor]] | None = None,
        state_dir: Path | None = None,
        eval_batches: Sequence[tuple[Tensor, Tensor]] = (),
    ):
        self.worker, self.batches, self.eval_batches = worker, batches, list(eval_batches)
        self.saved = OptimizerStates(state_dir) if state_dir else None
        self.timeout = worker.plan.transport.step_timeout_s
        self.spec: RoundSpec | None = None
        self.last_finished = 0
        self._cond = threading.Condition()
        self._arrived: dict[int, set[str]] = {}
        self._expected: frozenset[str] = frozenset()
        self._completed = -1
        self._error: str | None = None
        self._driver: threading.Thread | None = None
        self._metrics: dict[str, float] = {}
        self._traffic_at_begin = Traffic()
        self._unreachable: dict[str, int] = {}  # failed probes in a row, per data owner
        self._early_aborts: dict[int, str] = {}  # aborts of a round that reached us before it began
        worker.rounds = self

    # -- the coordinator's side (through this organisation's client) ---------------------------

    def begin(self, spec: RoundSpec, weights: Mapping[str, Tensor]) -> None:
        """Load the round's weights and start it; returns at once (a data owner trains on)."""
        w = self.worker
        missing = sorted(set(w.weights.master) - set(weights))  # what trains (a frozen base stays)
        if missing:
            raise ValueError(f"{w.name}: the weights of round {spec.round} lack {', '.join(missing[:5])}")
        if self._driver is not None and self._driver.is_alive():
            raise RuntimeError(f"{w.name}: round {self.spec.round} is still running")
        with self._cond:
            w.reset_pending()
            w.set_live_owners(spec.data_owners)
            w.grads.drop_before(spec.first_step)
            w.expert_load.clear()
            w.assignments.clear()
            w.load_state(weights)
            self._traffic_at_begin = w.traffic()
            self._restore_optimizer(spec.restore_round)
            w.anchor_proximal()
            self.spec, self._error, self._metrics, self._arrived = (
                spec,
                self._early_aborts.pop(spec.id, None),
                {},
                {},
            )
            self._expected = frozenset(d for d in spec.data_owners if w.name in w.plan.path_orgs(d))
            self._completed = spec.first_step - 1 if self._expected else spec.last_step
            self._cond.notify_all()
        if w.name in spec.data_owners and self._error is None:
            self._driver = threading.Thread(
                target=self._drive, args=(spec,), name=f"fedsplit-round-{w.name}", daemon=True
            )
            self._driver.start()

    def wait(self, timeout: float) -> dict[str, float]:
        """Block until this organisation's part of the round is done; its metrics."""
        spec = self.spec
        if spec is None:
            raise RuntimeError(f"{self.worker.name}: no round was begun")
        deadline = time.monotonic() + timeout
        if self._driver is not None:
            self._driver.join(timeout)
            if self._driver.is_alive():
                raise TimeoutError(f"{self.worker.name}: round {spec.round} still training after {timeout:.0f} s")
        with self._cond:
            progress, last_progress = self._completed, time.monotonic()
            while not (self._completed >= spec.last_step or self._error):
                now = time.monotonic()
                if self._completed != progress:
                    progress, last_progress = self._completed, now
                waiting = sorted(self._expected - self._arrived.get(self._completed + 1, set()))
                if now > deadline or now - last_progress > self.timeout:
                    raise TimeoutError(
                        f"{self.worker.name}: round {spec.round} stuck after step {self._completed} "
                        f"of {spec.last_step}, waiting for {', '.join(waiting)}"
                    )
                if not self._cond.wait(PROBE_INTERVAL_S):
                    self._fail_if_unreachable(waiting)
            if self._error:
                raise RoundFailed(self._error)
        if self.saved is not None and self.worker.optimizer is not None:
            self.saved.save(self.worker.optimizer, list(self.worker.model.bindings), spec.round)
        self.last_finished = spec.round
        load = {
            f"expert_load/{layer}/{e}": float(n)
            for layer, counts in self.worker.expert_load.items()
            for e, n in enumerate(counts)
        }
        if self.worker.cfg.router.capacity_factor is not None:  # what was routed, dropped by capacity or not
            load.update({f"assignments/{layer}": float(n) for layer, n in self.worker.assignments.items()})
        # Every organisation's calls, not only the data owners': a middle layer's calls to the
        # holders of its experts and head groups are part of the round's traffic too.
        moved: Traffic = self.worker.traffic() - self._traffic_at_begin
        traffic = {"bytes_sent": float(moved.sent), "bytes_received": float(moved.received)}
        return {**self._metrics, **load, **traffic}

    # -- what data owners ask (RoundControl) -----------------------------------------------------

    def await_round(self, round: int, attempt: int) -> None:
        """Returns once this organisation began attempt ``attempt`` of ``round`` (a rerun of a
        round must not find the organisation still holding the failed attempt)."""
        wanted = (round, attempt)
        with self._cond:
            if not self._cond.wait_for(lambda: self.spec is not None and self.spec.id >= wanted, self.timeout):
                raise TimeoutError(f"{self.worker.name} has not begun round {round} after {self.timeout:.0f} s")
            if self.spec.id != wanted:
                raise RoundFailed(f"{self.worker.name} is in round {self.spec.id}, not {wanted} (round, attempt)")

    def finish_step(self, data_owner: str, step: int) -> None:
        """``data_owner`` finished ``step`` here; returns once this worker has applied the step."""
        with self._cond:
            spec = self.spec
            if spec is None or not spec.first_step <= step <= spec.last_step:
                raise ValueError(f"{self.worker.name}: step {step} is not part of the current round")
            if data_owner not in self._expected:
                raise PermissionError(f"{self.worker.name} does not expect steps from {data_owner!r} this round")
            if step > self._completed:  # a retried report of a step already applied changes nothing
                self._arrived.setdefault(step, set()).add(data_owner)
                if step == self._completed + 1 and self._arrived[step] >= self._expected:
                    self.worker.apply_step(step)
                    self._completed = step
                    self._cond.notify_all()
            deadline = time.monotonic() + self.timeout
            while not (self._completed >= step or self._error):
                left = deadline - time.monotonic()
                missing = sorted(self._expected - self._arrived.get(step, set()))
                if left <= 0:
                    raise TimeoutError(
                        f"{self.worker.name}: step {step} still waits for {', '.join(missing)} after "
                        f"{self.timeout:.0f} s"
                    )
                if not self._cond.wait(min(left, PROBE_INTERVAL_S)):
                    self._fail_if_unreachable(missing)
            if self._error:
                raise RoundFailed(self._error)

    def _fail_if_unreachable(self, data_owners: list[str]) -> None:
        """A data owner whose worker cannot be reached will never finish the step: fail the
        round now rather than at the step timeout. Called with the lock held."""
        for d in data_owners:
            peer = self.worker.peers.get(d)
            if peer is None or peer.reachable(timeout=PROBE_TIMEOUT_S):
                self._unreachable.pop(d, None)
                continue
            self._unreachable[d] = self._unreachable.get(d, 0) + 1
            if self._unreachable[d] >= PROBES_BEFORE_GIVING_UP:  # a busy host can miss one probe
                self._error = f"{self.worker.name}: data owner '{d}' is unreachable mid-round"
                self._cond.notify_all()
                return

    def check_step(self, step: int, current: bool) -> None:
        """ValueError unless ``step`` is the step this worker is in (``current``) or, if not, one
        of its round's steps that it has not applied yet. Calls for any other step would be
        kept for a step that never comes. Before its first round a worker is driven step by step
        by the coordinator (``verify``), which names the step; the stage's bound on what it keeps
        holds there, and beginning a round drops it."""
        spec, next_step = self.spec, self._completed + 1
        if spec is None:
            return
        if next_step > spec.last_step:
            raise ValueError(f"{self.worker.name}: a call for step {step}, but this worker is in no step")
        if not next_step <= step <= (next_step if current else spec.last_step):
            raise ValueError(
                f"{self.worker.name}: a call for step {step}, but this worker is in step {next_step} "
                f"of round {spec.round}"
            )

    def abort(self, round: int, attempt: int, reason: str) -> None:
        wanted = (round, attempt)
        with self._cond:
            if self.spec is not None and self.spec.id == wanted:
                self._error = self._error or reason[:MAX_REASON]
                self._cond.notify_all()
            elif self.spec is None or self.spec.id < wanted:
                self._early_aborts[wanted] = reason[:MAX_REASON]
                while len(self._early_aborts) > MAX_EARLY_ABORTS:
                    del self._early_aborts[min(self._early_aborts)]

    # -- internals -----------------------------------------------------------------------------

    def _drive(self, spec: RoundSpec) -> None:
        align_threads()
        w = self.worker
        controls = {org: w.peer(org) for org in sorted(w.plan.path_orgs(w.name))}
        try:
            self._metrics = run_round(w, spec, controls, self.batches, self.eval_batches)
        except Exception as e:
            reason = f"{w.name}: round {spec.round} failed: {e}"
            log.warning("%s", reason)
            for c in controls.values():
                try:
                    c.abort(spec.round, spec.attempt, reason)
                except Exception:
                    pass  # that organisation may be the one that is gone
            with self._cond:
                self._error = self._error or reason[:MAX_REASON]
                self._cond.notify_all()

    def _restore_optimizer(self, round: int) -> None:
        """Make the optimizer state that of the end of ``round`` (0: fresh), unless it is already."""
        w = self.worker
        if round == self.last_finished or w.optimizer is None:
            return
        w.optimizer = make_optimizer(w.model.bindings.values(), w.plan.training.optimizer)
        if round > 0:
            if self.saved is None:
                raise RuntimeError(f"{w.name}: cannot resume after round {round}: it keeps no optimizer state")
            self.saved.load(w.optimizer, list(w.model.bindings), round, w.name)
        self.last_finished = round


def run_round(
    worker: Worker,
    spec: RoundSpec,
    controls: Mapping[str, RoundControl],
    batches: Callable[[int], tuple[Tensor, Tensor]],
    eval_batches: Sequence[tuple[Tensor, Tensor]],
) -> dict[str, float]:
    """A data owner's part of a round: once every organisation on its path began it, evaluate the
    weights it received (when asked), then each step's batch, reported finished to the whole path
    (which returns once every organisation on it applied the step). Its metrics."""
    owner = worker.data_owner
    totals = {"loss": 0.0, "aux_loss": 0.0, "tokens": 0.0, "step_s": 0.0}
    per_step: dict[str, float] = {}  # "lr/<step>", "grad_norm/<step>", "clip_factor/<step>"
    for c in controls.values():
        c.await_round(spec.round, spec.attempt)
    evaluated = {}
    if spec.evaluate and eval_batches:
        results = [owner.evaluate_batch(tok, lab, spec.round) for tok, lab in eval_batches]
        evaluated = held_out_metrics(results, eval_batches)
    with compute_pool(len(controls), "fedsplit-finish") as pool:
        for step in range(spec.first_step, spec.last_step + 1):
            start = time.perf_counter()
            m = owner.train_batch(step, *batches(step))
            for f in [pool.submit(c.finish_step, worker.name, step) for c in controls.values()]:
                f.result()
            totals["step_s"] += time.perf_counter() - start
            for k, v in worker.last_step.items():  # this step's learning rate, gradient norm, clip factor
                per_step[f"{k}/{step}"] = v
            for k in ("loss", "aux_loss", "tokens"):
                totals[k] += m[k]
            totals["last_loss"] = m["loss"]
    if spec.evaluate_after and eval_batches:
        # Every organisation on the path has applied the last step (finish_step returned), so this
        # is the model after the round, with the noise the next round's evaluation would draw.
        results = [owner.evaluate_batch(tok, lab, spec.round + 1) for tok, lab in eval_batches]
        evaluated |= {f"{AFTER}{k}": v for k, v in held_out_metrics(results, eval_batches).items()}
    n = max(spec.steps, 1)
    trained = {}
    if spec.steps:
        trained = {
            "loss": totals["loss"] / n,
            "aux_loss": totals["aux_loss"] / n,
            "last_loss": totals["last_loss"],
            "step_s": totals["step_s"] / n,
        }
    spent = {}
    noise = mechanisms(worker.plan, worker.name)
    if noise and all(noise):
        # TrainingBatches know their text's size; any other source counts every position released
        # at every step (q = 1), the bound that assumes nothing.
        spent = {"epsilon": epsilon(worker.plan, worker.name, spec.last_step + 1, getattr(batches, "tokens", None))}
    return {**trained, **per_step, "tokens": totals["tokens"], **evaluated, **spent}
