"""Waves of Flower messages: one message per organisation (or node), every reply matched to its
message and judged: a reply, a failure with its reason, or an organisation that is gone."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ..plan import Plan
from .client_app import OK, WORKER_DOWN


class FederationError(RuntimeError):
    pass


@dataclass
class Outcome:
    """Replies of one wave of messages: per organisation, the reply or why there is none."""

    replies: dict[str, Message] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # organisations whose node or worker is gone
    back_s: dict[str, float] = field(default_factory=dict)  # from each reply's making to its arrival here

    def metrics(self) -> dict[str, dict[str, float]]:
        """Each reply's metrics, with ``flower_back_s``: how long the reply took to get here."""
        return {
            org: {**{k: float(v) for k, v in reply.content["metrics"].items()}, "flower_back_s": self.back_s[org]}
            for org, reply in self.replies.items()
        }


def exchange(grid: Grid, msgs: dict[str, Message], timeout: float) -> Outcome:
    """Send one message per organisation (or node, keyed by name) and wait for every reply
    (matched by message id), or for the deadline: an organisation that does not answer in time
    counts as gone."""
    ids = list(grid.push_messages(list(msgs.values())))
    org_of = dict(zip(ids, msgs))
    outcome, pending = Outcome(), set(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            outcome.back_s[org_of[mid]] = time.time() - reply.metadata.created_at
            _judge(org_of[mid], reply, outcome)
        if pending:
            time.sleep(0.2)
    for mid in pending:
        outcome.failed[org_of[mid]] = f"no reply within {timeout:.0f} s"
        outcome.gone.add(org_of[mid])
    return outcome


def _judge(org: str, reply: Message, outcome: Outcome) -> None:
    if reply.has_error():
        outcome.failed[org] = f"Flower error {reply.error.code}: {reply.error.reason}"
        outcome.gone.add(org)  # its node, or its client app, is gone
        return
    status = reply.content["status"]
    if status["status"] == OK:
        outcome.replies[org] = reply
    else:
        outcome.failed[org] = str(status["reason"])
        if status["status"] == WORKER_DOWN:
            outcome.gone.add(org)


def register(
    grid: Grid,
    plan: Plan,
    node_timeout: float,
    message_timeout: float,
    check_identity: Callable[[str, object], None],
    joined: Callable[[int], None] = lambda count: None,
    simulation: str | None = None,
) -> tuple[dict[str, int], dict[str, str]]:
    """Wait for a node per organisation (``joined(count)`` each time the count of connected
    nodes changes) and ask each which organisation it is (checked by ``check_identity``) and
    where its data plane listens: (node of each org, its address). In a simulation each virtual
    node is told the registry of workers (``simulation``) that says which it is."""
    expected = len(plan.orgs)
    deadline = time.monotonic() + node_timeout
    seen = -1
    while len(nodes := list(grid.get_node_ids())) < expected:
        if len(nodes) != seen:
            seen = len(nodes)
            joined(seen)
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} of {expected} organisations connected within {node_timeout:.0f} s")
        time.sleep(0.5)
    joined(len(nodes))

    def content() -> RecordDict:
        return RecordDict({"simulation": ConfigRecord({"registry": simulation})} if simulation else {})

    msgs = {str(nid): Message(content(), dst_node_id=nid, message_type="query.register") for nid in nodes}
    outcome = exchange(grid, msgs, message_timeout)
    if outcome.failed:
        raise FederationError(
            "nodes failed to register: " + "; ".join(f"node {n}: {r}" for n, r in outcome.failed.items())
        )
    node_of: dict[str, int] = {}
    addresses: dict[str, str] = {}
    for nid_text, reply in outcome.replies.items():
        info = reply.content["info"]
        org = str(info["org"])
        if org not in plan.orgs:
            raise FederationError(
                f"node {nid_text} says it is organisation {org!r}, which plan {plan.name!r} does not have"
            )
        if org in node_of:
            raise FederationError(f"two nodes say they are organisation {org!r}")
        check_identity(org, info)
        node_of[org], addresses[org] = int(nid_text), str(info["address"])
    missing = sorted(set(plan.orgs) - set(node_of))
    if missing:
        raise FederationError(f"organisations {', '.join(missing)} of the plan did not connect")
    return node_of, addresses
