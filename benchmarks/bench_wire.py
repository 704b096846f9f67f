#!/usr/bin/env python
"""Side-by-side loopback throughput: raw TCP socket vs the fedsplit gRPC data plane.

    .venv/bin/python benchmarks/bench_wire.py [--sizes 4 16 64] [--trials 7] [--quick]

Two processes on 127.0.0.1: this one (the client) and a server child that it starts with
``subprocess`` (``python bench_wire.py --serve ...``) and always stops (stdin EOF, then
terminate, then kill). The server child also exits by itself when this process dies,
because its stdin closes.

Each *transport* (raw TCP, the data plane with and without the finite check, and later e.g.
a same-host shared-memory path) is a :class:`Transport` in ``TRANSPORTS``: ``start_server``
runs in the server process and returns a JSON-able address; ``connect`` runs in the client
process and returns an object with ``oneway(t)`` and ``roundtrip(t)``. Every transport is run
with both patterns:

* one-way:    the client sends an fp32 tensor; the server receives all of it and answers
              with a tiny reply (raw: 1 byte; data plane: a 1-element tensor).
* round trip: the server sends back a tensor of the same size (the received one).

Trials are interleaved (transport A trial 1, B trial 1, ..., A trial 2, ...) after one
warm-up call per variant, so machine noise hits all variants alike. A trial is ``calls``
back-to-back calls (enough to move ``--bytes-per-trial`` payload, at least 1); its throughput
is payload bytes (x2 for a round trip) / wall time. Ratios against the baseline transport
(raw TCP) are computed per trial pair and reported as median (min-max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Keep intra-op threads at 1 in both processes (set before torch is imported, and again below).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402
from report import fmt_stats, loadavg, proc_cpu, provenance  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
HOST = "127.0.0.1"
ONEWAY, ROUNDTRIP = "one-way", "round-trip"
PATTERNS = (ONEWAY, ROUNDTRIP)


# --------------------------------------------------------------------------------------------
# Registry of transports
# --------------------------------------------------------------------------------------------


class Client(Protocol):
    def oneway(self, t: torch.Tensor) -> None: ...
    def roundtrip(self, t: torch.Tensor) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Transport:
    name: str
    start_server: Callable[[dict], Any]  # (options) -> JSON-able address; runs in the server process
    connect: Callable[[Any, dict], Client]  # (address, options) -> client; runs in the client process
    description: str = ""


TRANSPORTS: dict[str, Transport] = {}
BASELINE = "raw-tcp"


def register(t: Transport) -> Transport:
    TRANSPORTS[t.name] = t
    return t


# ---- raw TCP socket -------------------------------------------------------------------------

_RAW_HDR = struct.Struct("<QB")  # payload bytes, mode (0 = one-way, 1 = echo)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (recv_into with MSG_WAITALL, looping on short reads)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _raw_serve_conn(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(0)
    hdr = bytearray(_RAW_HDR.size)
    try:
        while True:
            try:
                _recv_exact(conn, memoryview(hdr))
            except ConnectionError:
                return
            n, mode = _RAW_HDR.unpack(hdr)
            if len(buf) < n:  # grows once per new size; the warm-up call pays the first touch
                buf = bytearray(n)
            view = memoryview(buf)[:n]
            _recv_exact(conn, view)
            t = torch.frombuffer(view, dtype=torch.float32)  # zero-copy, like the reference
            if mode == 0:
                conn.sendall(b"\x01")
            else:
                conn.sendall(_tensor_bytes(t))
    finally:
        conn.close()


def _raw_start_server(opts: dict) -> Any:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(8)

    def accept_loop() -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=_raw_serve_conn, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return [HOST, lsock.getsockname()[1]]


class _RawClient:
    def __init__(self, address: Any, opts: dict):
        self.sock = socket.create_connection((address[0], address[1]))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack = bytearray(1)
        self.reply: dict[int, bytearray] = {}  # preallocated reply buffers, one per size

    def oneway(self, t: torch.Tensor) -> None:
        data = _tensor_bytes(t)
        self.sock.sendall(_RAW_HDR.pack(len(data), 0))
        self.sock.sendall(data)
        _recv_exact(self.sock, memoryview(self.ack))

    def roundtrip(self, t: torch.Tensor) -> torch.Tensor:
        data = _tensor_bytes(t)
        n = len(data)
        buf = self.reply.get(n)
        if buf is None:
            buf = self.reply[n] = bytearray(n)
        self.sock.sendall(_RAW_HDR.pack(n, 1))
        self.sock.sendall(data)
        _recv_exact(self.sock, memoryview(buf))
        return torch.frombuffer(buf, dtype=t.dtype).reshape(t.shape)

    def close(self) -> None:
        self.sock.close()


register(
    Transport(
        "raw-tcp",
        _raw_start_server,
        _RawClient,
        "sendall(memoryview) / recv_into(preallocated, MSG_WAITALL), TCP_NODELAY, no validation",
    )
)


# ---- fedsplit data plane --------------------------------------------------------------------

_KEEP_ALIVE: list[Any] = []  # server objects that must outlive start_server() (stopped at exit)


def _tls_config(opts: dict, name: str):
    from fedsplit.transport.security import TLSConfig

    return TLSConfig.load(opts["tls_dir"], name)


def _dp_limits(opts: dict, require_finite: bool):
    from fedsplit.transport.wire import Limits

    return Limits(max_tensor_bytes=opts["max_tensor_bytes"], require_finite=require_finite)


class _BenchHandler:
    def __init__(self, codec: str = "none") -> None:
        from fedsplit.transport.proto import dataplane_pb2 as pb

        self.pb = pb
        self.tiny = torch.zeros(1)
        self.codec = codec

    def handle(self, header, tensors):
        from fedsplit.transport.service import Reply

        if header.phase == self.pb.FORWARD:  # one way: a tiny acknowledgement
            out = [("ack", self.tiny)]
        elif header.phase == self.pb.BACKWARD:  # a round trip: the received tensor itself, same size
            out = [("y", tensors[0][1])]
        else:
            raise ValueError(f"unknown phase {header.phase}")
        return Reply(out, self.codec)


def _dp_start_server(require_finite: bool, tls: bool = False, codec: str = "none"):
    def start(opts: dict) -> Any:
        from fedsplit.transport.service import Credentials, DataPlaneServer

        kw = {"tls": _tls_config(opts, "bench-server") if tls else None}
        if tls:
            from fedsplit.transport.security import load_verifiers

            kw["credentials"] = Credentials(load_verifiers(opts["tls_dir"]))
        server = DataPlaneServer(
            _BenchHandler(codec), HOST, 0, limits=_dp_limits(opts, require_finite), shared_memory=True, **kw
        ).start()
        _KEEP_ALIVE.append(server)
        return server.address

    return start


class _DPClient:
    def __init__(
        self, address: Any, opts: dict, require_finite: bool, tls: bool = False, codec: str = "none", shm: bool = False
    ):
        from fedsplit.transport.channel import DataPlaneChannel
        from fedsplit.transport.proto import dataplane_pb2 as pb

        self.pb = pb
        kw = {"tls": _tls_config(opts, "bench-client") if tls else None, "shared_memory": shm}
        if tls:
            from fedsplit.transport.security import load_token

            kw["token"] = load_token(opts["tls_dir"], "bench-client")
            address = address.replace("127.0.0.1", "localhost")  # the certificate names both
        self.chan = DataPlaneChannel(
            "bench-server", address, caller="bench-client", limits=_dp_limits(opts, require_finite), timeout=120.0, **kw
        )
        self.step = 0
        self.call_kw = {} if codec == "none" else {"codec": codec}

    def _call(self, phase, t: torch.Tensor):
        self.step += 1
        header = self.pb.CallHeader(run="bench_wire", phase=phase, step=self.step)
        return self.chan.call(header, [("x", t)], **self.call_kw)

    def oneway(self, t: torch.Tensor) -> None:
        out = self._call(self.pb.FORWARD, t)
        if len(out) != 1 or out[0][1].numel() != 1:
            raise RuntimeError(f"unexpected one-way reply {out!r}")

    def roundtrip(self, t: torch.Tensor) -> torch.Tensor:
        out = self._call(self.pb.BACKWARD, t)
        return out[0][1]

    def close(self) -> None:
        self.chan.close()


register(
    Transport(
        "dataplane",
        _dp_start_server(True),
        lambda a, o: _DPClient(a, o, True),
        "DataPlaneServer/DataPlaneChannel, Limits(require_finite=True) on both ends (the real path)",
    )
)
register(
    Transport(
        "dataplane-nofinite",
        _dp_start_server(False),
        lambda a, o: _DPClient(a, o, False),
        "same, Limits(require_finite=False) on both ends (shows the cost of the finite check)",
    )
)

# Not in the default set (run them with e.g. --transports raw-tcp dataplane dataplane-tls):
register(
    Transport(
        "dataplane-tls",
        _dp_start_server(True, tls=True),
        lambda a, o: _DPClient(a, o, True, tls=True),
        "same as dataplane, plus mutual TLS and a bearer token (throw-away certs in a temp dir)",
    )
)
register(
    Transport(
        "dataplane-bf16",
        _dp_start_server(True, codec="bf16"),
        lambda a, o: _DPClient(a, o, True, codec="bf16"),
        "same as dataplane, bf16 wire codec both ways (lossy; GB/s counts the fp32 payload)",
    )
)
register(
    Transport(
        "dataplane-shm",
        _dp_start_server(True),
        lambda a, o: _DPClient(a, o, True, shm=True),
        "same as dataplane, tensors through /dev/shm segments, only control frames over gRPC",
    )
)
register(
    Transport(
        "dataplane-shm-nofinite",
        _dp_start_server(False),
        lambda a, o: _DPClient(a, o, False, shm=True),
        "same as dataplane-shm without the finite check (it is the only pass over the bytes on arrival)",
    )
)
DEFAULT_TRANSPORTS = ["raw-tcp", "dataplane", "dataplane-nofinite", "dataplane-shm", "dataplane-shm-nofinite"]
FINITE_PAIRS = [("dataplane", "dataplane-nofinite"), ("dataplane-shm", "dataplane-shm-nofinite")]

# --------------------------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------------------------


def serve(names: list[str], opts: dict) -> None:
    torch.set_num_threads(1)
    code = 0
    try:
        addresses = {name: TRANSPORTS[name].start_server(opts) for name in names}
        sys.stdout.write(json.dumps({"pid": os.getpid(), "addresses": addresses}) + "\n")
        sys.stdout.flush()
        sys.stdin.read()  # returns at EOF: the parent closed our stdin or died
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for obj in _KEEP_ALIVE:
            try:
                obj.stop(None)
            except Exception:
                pass
        sys.stderr.flush()
        os._exit(code)


class ServerProcess:
    """The server child: started in ``__enter__``, always stopped in ``__exit__``."""

    def __init__(self, names: list[str], opts: dict, start_timeout: float = 120.0):
        self.names, self.opts, self.start_timeout = names, opts, start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> dict:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            ",".join(self.names),
            "--opts",
            json.dumps(self.opts),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], self.start_timeout)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                raise RuntimeError(f"server process did not start (exit code {code})")
            return json.loads(line)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            p.stdin.close()  # polite: the child exits at stdin EOF
            p.wait(timeout=10)
        except Exception:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------------
# Client / measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Variant:
    transport: str
    pattern: str
    client: Client
    results: dict[int, list[float]] = field(default_factory=dict)  # size MiB -> GB/s per trial
    cpu: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # size -> (client, server) CPU-s/GB
    server_pid: int | None = None

    @property
    def label(self) -> str:
        return f"{self.transport} {self.pattern}"

    def run(self, t: torch.Tensor, calls: int) -> None:
        """``calls`` back-to-back calls; records GB/s of payload (x2 for a round trip) and CPU-s/GB."""
        fn = self.client.oneway if self.pattern == ONEWAY else self.client.roundtrip
        size = t.numel() * t.element_size() // MiB
        srv0, cpu0 = proc_cpu(self.server_pid), time.process_time()
        start = time.perf_counter()
        for _ in range(calls):
            fn(t)
        elapsed = time.perf_counter() - start
        cpu1, srv1 = time.process_time(), proc_cpu(self.server_pid)
        gb = t.numel() * t.element_size() * calls * (2 if self.pattern == ROUNDTRIP else 1) / 1e9
        self.results.setdefault(size, []).append(gb / elapsed)
        self.cpu.setdefault(size, []).append(
            ((cpu1 - cpu0) / gb, (srv1 - srv0) / gb if srv0 is not None else float("nan"))
        )


def activation_shape(size_mib: int) -> tuple[int, ...]:
    """An fp32 activation of ``size_mib`` MiB shaped (8, 256, h) like the transport notes (4 MiB: h=512)."""
    numel = size_mib * MiB // 4
    return (8, 256, numel // 2048) if numel % 2048 == 0 else (numel,)


def header_lines(args) -> list[str]:
    return [
        *provenance("fedsplit/transport"),
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')!r}",
        f"sizes MiB {args.sizes}  trials {args.trials}  bytes/trial >= {args.bytes_per_trial} MiB  "
        f"transports {args.transports}  baseline {BASELINE}",
        f"load average at start: {loadavg()}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="fp32 tensor sizes in MiB (default 4 16 64)")
    ap.add_argument("--trials", type=int, default=None, help="interleaved trials (default 7)")
    ap.add_argument("--quick", action="store_true", help="sizes 4 16, 3 trials")
    ap.add_argument(
        "--bytes-per-trial",
        type=int,
        default=128,
        help="payload MiB per variant per trial; calls/trial = max(1, this / size) (default 128)",
    )
    ap.add_argument(
        "--transports",
        nargs="+",
        default=list(DEFAULT_TRANSPORTS),
        choices=list(TRANSPORTS),
        help=f"default: {' '.join(DEFAULT_TRANSPORTS)}",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's default malloc settings instead of the ones fedsplit's worker processes use",
    )
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--opts", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if not args.default_malloc and "GLIBC_TUNABLES" not in os.environ and args.serve is None:
        # Measure what fedsplit's worker processes run with (both benchmark processes inherit it).
        from fedsplit.hosting.processes import _worker_env

        os.execve(sys.executable, [sys.executable, *sys.argv], _worker_env())

    if args.serve is not None:
        serve(args.serve.split(","), json.loads(args.opts))
        return 0

    if args.sizes is None:
        args.sizes = [4, 16] if args.quick else [4, 16, 64]
    if args.trials is None:
        args.trials = 3 if args.quick else 7
    if BASELINE not in args.transports:
        args.transports.insert(0, BASELINE)
    torch.set_num_threads(1)

    for line in header_lines(args):
        if line:
            print(line)
    for name in args.transports:
        print(f"  {name}: {TRANSPORTS[name].description}")
    sys.stdout.flush()

    opts: dict[str, Any] = {"max_tensor_bytes": max(2 * max(args.sizes) * MiB, 1 << 30)}
    with contextlib.ExitStack() as stack:
        if any(name.endswith("-tls") for name in args.transports):
            from fedsplit.transport.security import generate_credentials

            opts["tls_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_wire_tls_"))
            generate_credentials(["bench-server", "bench-client"], opts["tls_dir"])
        return _run(args, opts)


def _run(args: argparse.Namespace, opts: dict) -> int:
    t0 = time.perf_counter()
    with ServerProcess(args.transports, opts) as info:
        print(f"server pid {info['pid']} (client pid {os.getpid()}), started in {time.perf_counter() - t0:.1f} s")
        clients = {name: TRANSPORTS[name].connect(info["addresses"][name], opts) for name in args.transports}
        try:
            variants = [
                Variant(name, pattern, clients[name], server_pid=info["pid"])
                for pattern in PATTERNS
                for name in args.transports
            ]
            gen = torch.Generator().manual_seed(0)
            for size in args.sizes:
                t = torch.randn(activation_shape(size), generator=gen, dtype=torch.float32)
                calls = max(1, args.bytes_per_trial // size)
                for v in variants:  # warm-up: one call each, and a correctness check
                    if v.pattern == ROUNDTRIP:
                        back = v.client.roundtrip(t)
                        lossy = v.transport.endswith("-bf16")
                        if back.shape != t.shape or not (
                            torch.allclose(back, t, rtol=1e-2, atol=1e-2) if lossy else torch.equal(back, t)
                        ):
                            raise RuntimeError(f"{v.label}: echoed tensor differs from the one sent")
                    else:
                        v.client.oneway(t)
                for _ in range(args.trials):
                    for v in variants:
                        v.run(t, calls)
                print(
                    f"  {size} MiB done ({calls} calls/variant/trial) at {time.perf_counter() - t0:.1f} s, "
                    f"load {loadavg()}"
                )
                sys.stdout.flush()
                del t
        finally:
            for c in clients.values():
                try:
                    c.close()
                except Exception:
                    pass
    elapsed = time.perf_counter() - t0

    print()
    base = {(v.pattern): v for v in variants if v.transport == BASELINE}
    cols = [
        "variant",
        "pattern",
        "MiB",
        "calls",
        "GB/s median (min-max)",
        f"x {BASELINE} paired median (min-max)",
        "CPU-s/GB client / server",
    ]
    rows = []
    for pattern in PATTERNS:
        for size in args.sizes:
            for v in (v for v in variants if v.pattern == pattern):
                gbs = v.results[size]
                ratio = (
                    "1"
                    if v.transport == BASELINE
                    else fmt_stats([a / b for a, b in zip(gbs, base[pattern].results[size])], 3)
                )
                cpu = v.cpu[size]
                rows.append(
                    [
                        v.transport,
                        pattern,
                        str(size),
                        str(max(1, args.bytes_per_trial // size)),
                        fmt_stats(gbs),
                        ratio,
                        f"{statistics.median(c for c, _ in cpu):.2f} / {statistics.median(s for _, s in cpu):.2f}",
                    ]
                )
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(r):
        return "| " + " | ".join(x.ljust(w) for x, w in zip(r, widths)) + " |"

    print(line(cols))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))

    for checked, unchecked in FINITE_PAIRS:
        if checked not in args.transports or unchecked not in args.transports:
            continue
        print()
        print(f"cost of require_finite: {checked} / {unchecked} throughput, paired per trial")
        pair = {(v.transport, v.pattern): v for v in variants if v.transport in (checked, unchecked)}
        for pattern in PATTERNS:
            for size in args.sizes:
                r = [
                    a / b for a, b in zip(pair[checked, pattern].results[size], pair[unchecked, pattern].results[size])
                ]
                print(f"  {pattern:10s} {size:3d} MiB: {fmt_stats(r, 3)}")

    print()
    print("GB = 1e9 B. Throughput = payload bytes (x2 for round trip) / wall time of the calls in a trial;")
    print(f"median (min-max) over {args.trials} interleaved trials after 1 warm-up call per variant and size.")
    print("CPU-s/GB: medians; client = this process (time.process_time), server = the server process")
    print("(/proc/PID/stat, 10 ms ticks); per GB of payload moved (x2 for round trip). Less sensitive to a busy")
    print("machine than GB/s, which includes time spent waiting for a core.")
    print(f"total {elapsed:.1f} s; load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
