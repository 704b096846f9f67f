"""The process that holds organisations' workers for as long as their clients live.

``python -m fedsplit.hosting.host PLAN --orgs A [B ...]`` builds each organisation's worker (its
partitions, optimizer, step barrier and, for a data owner, its batches) and serves it on its own
data-plane port. A deployed organisation runs one of these beside its Flower client; a simulation
runs one for all organisations (one process, one CUDA context) or one per organisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..data import DataError
from ..plan import Plan, load_plan
from ..runtime.batches import batches_for, eval_batches_for
from ..runtime.privacy import noise_key
from ..runtime.rounds import Rounds
from ..runtime.weights import LazyWeights, initial_weights_of, selection
from ..runtime.worker import Worker
from ..transport.framing import Limits
from ..transport.security import TLSConfig, load_token, load_verifiers
from ..transport.service import Credentials, DataPlaneServer
from .handler import WorkerHandler

# Intra-op threads of a worker process: several workers share a small host, and one thread per
# process avoided the slowdowns of copies oversubscribing two cores (a 2-thread copy on a busy
# 2-core machine dropped from 55 to 0.5 GB/s when the other core was taken).
WORKER_THREADS = 1


class WorkerHost:
    """Organisations' workers, each behind its own data-plane server. Organisations hosted
    together call each other in memory (:class:`~fedsplit.runtime.local.LocalPeer`), on their
    device, with the same checks and byte counts as calls over the data plane."""

    def __init__(
        self,
        plan: Plan,
        orgs: Sequence[str],
        *,
        run: str | None,
        credentials: Path | None,
        weights: Mapping[str, Tensor] | None = None,
        host: str = "127.0.0.1",
        ports: Mapping[str, int] | None = None,
        device: str | None = None,
        state_dir: Path | None = None,
    ):
        """``credentials=None`` serves in plaintext without tokens (ask for it explicitly).
        Without ``weights`` the partitions hold zeros until a round's weights arrive."""
        unknown = sorted(set(orgs) - set(plan.orgs))
        if unknown:
            raise ValueError(f"plan {plan.name!r} has no organisation {', '.join(map(repr, unknown))}")
        callers = Credentials(load_verifiers(credentials)) if credentials else None  # what servers check tokens against
        limits = Limits(max_tensor_bytes=plan.transport.max_tensor_mib << 20)
        self.handlers: dict[str, WorkerHandler] = {}
        self.servers: dict[str, DataPlaneServer] = {}
        self.workers: dict[str, Worker] = {}
        for org in orgs:
            if weights is not None:
                mine = selection(weights, plan.slices_of(org))
            else:  # a frozen base is loaded here, once; the rounds bring only what trains
                mine = initial_weights_of(plan, org) if plan.frozen else None
            worker = Worker(plan, org, mine, device)
            owner = org in plan.data_owners
            if owner:
                worker.data_owner.noise_key = noise_key(state_dir / org if state_dir else None)
            Rounds(
                worker,
                batches_for(plan, org) if owner else None,
                state_dir / org if state_dir else None,
                eval_batches=eval_batches_for(plan, org) if owner and plan.training.eval_tokens else (),
            )
            self.workers[org] = worker
            tls = TLSConfig.load(credentials, org) if credentials else None
            token = load_token(credentials, org) if credentials else None
            self.handlers[org] = WorkerHandler(worker, run, tls, token, co_hosted=self.workers)
            self.servers[org] = DataPlaneServer(
                self.handlers[org],
                host,
                (ports or {}).get(org, 0),
                tls=tls,
                credentials=callers,
                limits=limits,
                callers=len(plan.orgs) + 1,  # and the coordinator
                shared_memory=plan.transport.shared_memory,
            ).start()

    @property
    def addresses(self) -> dict[str, str]:
        return {org: s.address for org, s in self.servers.items()}

    @property
    def began_a_round(self) -> bool:
        """Whether any of its organisations has been sent a round (it has joined a run)."""
        return any(w.rounds is not None and w.rounds.spec is not None for w in self.workers.values())

    @property
    def run_ended(self) -> bool:
        """Whether the coordinator said the run its organisations served is over."""
        return any(h.run_ended.is_set() for h in self.handlers.values())

    def stop(self) -> None:
        for org, server in self.servers.items():
            server.stop(None)
            self.handlers[org].close()

    def wait(self) -> None:
        for server in self.servers.values():
            server.wait()


def load_tensor(path: str, name: str) -> Tensor:
    """One tensor of a safetensors file (memory-mapped: only its bytes are read)."""
    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


REFUSED, REFUSED_EXIT = "fedsplit: cannot start: ", 3  # how a host says it refuses to start, and why


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsplit.hosting.host", description=__doc__)
    parser.add_argument(
        "plan", help="the run's resolved plan (plan.json of its run directory) or a federation YAML file"
    )
    parser.add_argument("--orgs", nargs="+", required=True, help="the organisations to host")
    parser.add_argument("--run", help="run id; calls of any other run are refused (default: the first round's)")
    parser.add_argument(
        "--weights", help="safetensors file of the full initial model (default: zeros until a round begins)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=0, help="data-plane port (one organisation only; default: any free one)"
    )
    parser.add_argument("--ready-file", required=True, help="where to write {org: host:port} as JSON once serving")
    parser.add_argument("--device")
    parser.add_argument("--state-dir", type=Path, help="where each organisation keeps its optimizer state per round")
    parser.add_argument("--credentials", type=Path, help="directory of `fedsplit certs` output (TLS and tokens)")
    parser.add_argument("--insecure", action="store_true", help="plaintext and no tokens (tests on loopback only)")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when standard input closes")
    args = parser.parse_args(argv)
    if not args.credentials and not args.insecure:
        parser.error("give --credentials DIR, or --insecure explicitly")
    if args.port and len(args.orgs) > 1:
        parser.error("--port needs exactly one organisation")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(WORKER_THREADS)
    plan = load_plan(args.plan)
    weights = None
    if args.weights:  # read tensor by tensor as each organisation loads its share, never all at once
        with safe_open(args.weights, "pt") as f:
            names = list(f.keys())
        weights = LazyWeights(names, lambda name: load_tensor(args.weights, name))
    try:
        host = WorkerHost(
            plan,
            args.orgs,
            run=args.run,
            credentials=args.credentials,
            weights=weights,
            host=args.host,
            ports={args.orgs[0]: args.port},
            device=args.device,
            state_dir=args.state_dir,
        )
    except DataError as e:  # the user's to fix, not a crash: one line that says what and where
        print(f"{REFUSED}{e}", file=sys.stderr, flush=True)
        sys.exit(REFUSED_EXIT)
    signal.signal(signal.SIGTERM, lambda signum, frame: host.stop())
    if args.exit_with_parent:  # the parent holds our stdin: its end (even a SIGKILL) ends us too
        threading.Thread(target=lambda: (sys.stdin.read(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    tmp = args.ready_file + ".tmp"
    Path(tmp).write_text(json.dumps(host.addresses))
    os.replace(tmp, args.ready_file)
    host.wait()


if __name__ == "__main__":
    main()
