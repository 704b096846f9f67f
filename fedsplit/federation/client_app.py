"""The client: a Flower ClientApp that drives its organisation's long-lived worker.

The worker (``fedsplit.hosting.host``) holds the partitions, optimizer state and data-plane
server for as long as the organisation takes part; this app only hands it each round's weights
and settings, and later returns what it trained: Flower's NumPy arrays relayed as they are, so
the app never imports torch (deployed, Flower starts a process for every message). Two messages per round in simulation:

* ``train.begin``: load the round's weights, connect to the other organisations, start
  (a data owner starts training on its own and the message returns at once);
* ``train``: wait for the round to end and reply with the trained weights and metrics;

and one in deployment, ``train.round``, which does both; ``query.end`` at the end of a
deployed run tells the worker that the run is over (its client then exits).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..hosting.control import WorkerControl
from ..transport.arrays import ARRAYS
from ..transport.protocol import PeerError
from .records import RoundConfig
from .settings import ClientSite

app = ClientApp()

# Replies carry a status: the coordinator treats "worker-down" as this organisation gone and
# "round-failed" as a round that failed elsewhere (the message names where).
OK, ROUND_FAILED, WORKER_DOWN = "ok", "round-failed", "worker-down"


def _control(site: ClientSite, run: str) -> WorkerControl:
    return WorkerControl(
        site.org, site.worker, caller=site.org, run=run, tls=site.tls, token=site.token, payload=ARRAYS
    )


def _reply(msg: Message, status: str, reason: str = "", **records) -> Message:
    return Message(RecordDict({**records, "status": ConfigRecord({"status": status, "reason": reason})}), reply_to=msg)


def _failure(msg: Message, site: ClientSite, e: PeerError) -> Message:
    own_worker_gone = e.org == site.org and e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return _reply(msg, WORKER_DOWN if own_worker_gone else ROUND_FAILED, str(e))


# What a virtual client keeps in its node's Context from registering on: the simulation's registry.
SITE_STATE = "fedsplit-site"


def _site(context: Context) -> ClientSite:
    registry = context.state[SITE_STATE]["registry"] if SITE_STATE in context.state else None
    return ClientSite.of(context.node_config, str(registry) if registry is not None else None)


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    if "simulation" in msg.content:
        context.state[SITE_STATE] = ConfigRecord({"registry": str(msg.content["simulation"]["registry"])})
    site = _site(context)
    return _reply(
        msg,
        OK,
        info=ConfigRecord({"org": site.org, "address": site.address, "token": site.token or "", "layout": site.layout}),
    )


def _begin(control: WorkerControl, msg: Message) -> None:
    config = RoundConfig.of(msg.content["config"])
    control.connect(config.addresses)
    control.begin(config.spec, {name: array.numpy() for name, array in msg.content["arrays"].items()})


def _trained(control: WorkerControl, msg: Message, arrived: float) -> Message:
    """The round's trained weights and metrics, with ``flower_in_s``: how long the message took
    from the coordinator to this handler (SuperLink, SuperNode, ClientApp process start)."""
    metrics = control.wait(RoundConfig.of(msg.content["config"]).wait_s)
    metrics["flower_in_s"] = arrived - msg.metadata.created_at
    return _reply(
        msg,
        OK,
        arrays=ArrayRecord(array_dict={name: Array(ndarray=a) for name, a in control.state().items()}),
        metrics=MetricRecord({"num-examples": int(metrics.get("tokens", 0)), **metrics}),
    )


def _drive(msg: Message, context: Context, act: Callable[[WorkerControl], Message]) -> Message:
    """``act`` on this organisation's worker for ``msg``'s run; a data-plane failure becomes the
    reply that says whose it was."""
    site = _site(context)
    control = _control(site, str(msg.content["config"]["run"]))
    try:
        return act(control)
    except PeerError as e:
        return _failure(msg, site, e)
    finally:
        control.close()


@app.train("begin")
def begin(msg: Message, context: Context) -> Message:
    def act(control: WorkerControl) -> Message:
        _begin(control, msg)
        return _reply(msg, OK)

    return _drive(msg, context, act)


@app.train()
def collect(msg: Message, context: Context) -> Message:
    arrived = time.time()
    return _drive(msg, context, lambda control: _trained(control, msg, arrived))


@app.train("round")
def whole_round(msg: Message, context: Context) -> Message:
    """Begin and collect in one message, for deployment: every SuperNode runs its own ClientApp
    processes, so all organisations' rounds run at once and one message wave per round is enough
    (in simulation a few Ray actors serve every organisation, hence the two-message form)."""
    arrived = time.time()

    def act(control: WorkerControl) -> Message:
        _begin(control, msg)
        return _trained(control, msg, arrived)

    return _drive(msg, context, act)


@app.query("end")
def end(msg: Message, context: Context) -> Message:
    def act(control: WorkerControl) -> Message:
        control.end_run()
        return _reply(msg, OK)

    return _drive(msg, context, act)
