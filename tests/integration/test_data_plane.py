"""A real data-plane server on loopback: credentials, permissions, validation of every call
(nothing rejected changes a weight), retries, shared memory, large tensors."""

import os
import subprocess
import sys

import grpc
import pytest
import torch

from fedsplit.hosting.handler import WorkerHandler
from fedsplit.hosting.messages import op_to_proto
from fedsplit.plan import load_plan, select
from fedsplit.runtime import Worker, initial_weights
from fedsplit.runtime.ops import SegmentOp
from fedsplit.transport.channel import DataPlaneChannel
from fedsplit.transport.proto import dataplane_pb2 as pb
from fedsplit.transport.security import TLSConfig, generate_credentials
from fedsplit.transport.service import Credentials, DataPlaneServer, PeerError, Reply
from fedsplit.transport.wire import (
    Limits,
    prepare,
)

from ..conftest import PLANS

RUN = "test-run"
REPLICA_GRADS_OF_STEP_3 = pb.Control(replica_gradients=pb.ReplicaGradients(step=3))


@pytest.fixture
def served():
    """compute-b of the layers plan (layers 1-2), served over gRPC with per-organisation credentials."""
    plan = load_plan(PLANS / "layers" / "federation.yaml")
    weights = initial_weights(plan)
    worker = Worker(plan, "compute-b", select(weights, plan.slices_of("compute-b")), "cpu")
    creds = Credentials.of_tokens({"hospital-a": "secret-a", "compute-c": "secret-c"})
    server = DataPlaneServer(
        WorkerHandler(worker, RUN, tls=None),
        tls=None,
        credentials=creds,
        limits=Limits(max_tensor_bytes=1 << 20),
        shared_memory=True,
        idle_s=1.0,
    ).start()
    yield plan, worker, server
    server.stop(None)


def _forward(server, caller, token, op=SegmentOp((1, 2)), x=None, mb=4, run=None, step=0):
    channel = DataPlaneChannel("compute-b", server.address, caller=caller, tls=None, token=token, timeout=10)
    x = torch.randn(mb, 16, 64) if x is None else x
    header = pb.CallHeader(
        run=run or RUN, data_owner="hospital-a", step=step, micro_batch=0, operation=op_to_proto(op), phase=pb.FORWARD
    )
    try:
        return channel.call(header, [("0", x)])
    finally:
        channel.close()


def _assert_rejected(worker, call, code, text):
    before = {k: v.clone() for k, v in worker.state_dict().items()}
    with pytest.raises(PeerError) as err:
        call()
    assert err.value.code == code and text in err.value.details
    assert all(torch.equal(before[k], v) for k, v in worker.state_dict().items())
    assert not worker.stage.waiting  # nothing half-done is left behind


def test_valid_call_is_served(served):
    plan, worker, server = served
    out = _forward(server, "hospital-a", "secret-a")
    assert out[0][1].shape == (4, 16, 64) and out[1][1].shape == ()


def test_wrong_credential_is_unauthenticated_and_changes_nothing(served):
    _, worker, server = served
    _assert_rejected(
        worker, lambda: _forward(server, "hospital-a", "guess"), grpc.StatusCode.UNAUTHENTICATED, "no valid credential"
    )


def test_calling_a_partition_the_plan_does_not_allow_is_permission_denied(served):
    _, worker, server = served
    # compute-c is a real organisation with a valid credential, but only hospital-a drives its
    # own batch through compute-b's layers.
    _assert_rejected(
        worker, lambda: _forward(server, "compute-c", "secret-c"), grpc.StatusCode.PERMISSION_DENIED, "may not call"
    )
    _assert_rejected(
        worker,
        lambda: _forward(server, "hospital-a", "secret-a", op=SegmentOp((0, 1))),
        grpc.StatusCode.PERMISSION_DENIED,
        "computes no segment",
    )


@pytest.mark.parametrize(
    "x, text",
    [
        (torch.randn(4, 16, 32), "expected hidden states"),
        (torch.randn(3, 16, 64), "expected hidden states"),
        (torch.randn(4, 16, 64).bfloat16(), "expected hidden states"),
        (torch.full((4, 16, 64), float("inf")), "NaN or infinite"),
        (torch.randn(4, 2048, 64), "exceeds the limit"),
    ],
)
def test_inconsistent_tensors_are_invalid_argument_and_the_server_keeps_serving(served, x, text):
    _, worker, server = served
    _assert_rejected(
        worker,
        lambda: _forward(server, "hospital-a", "secret-a", x=x, mb=x.shape[0]),
        grpc.StatusCode.INVALID_ARGUMENT,
        text,
    )
    assert _forward(server, "hospital-a", "secret-a")[0][1].shape == (4, 16, 64)


@pytest.mark.parametrize(
    "operation, text",
    [
        (pb.Operation(), "names no operation"),
        (pb.Operation(segment=pb.Segment(layers=[1, 3])), "ascending and consecutive"),
        (pb.Operation(segment=pb.Segment()), "at least one block"),
        (pb.Operation(heads=pb.HeadGroup(layer=1, kv_start=2, kv_stop=2)), "start < stop"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3, 3], rows=[2, 2])), "distinct experts"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3], rows=[0])), "at least one row"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3, 4], rows=[2])), "as many row counts"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[99], rows=[4])), "expert 99 outside"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3], rows=[1 << 40])), "more rows than a micro-batch has"),
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[0, 1, 2], rows=[256] * 3)), "micro-batch routes"),
        (pb.Operation(heads=pb.HeadGroup(layer=1, kv_start=0, kv_stop=9)), "outside 0-3"),
        (pb.Operation(shared=pb.SharedExperts(layer=7)), "layer 7 outside"),
    ],
)
def test_malformed_operations_are_invalid_argument_from_the_parser_or_the_policy(served, operation, text):
    _, worker, server = served
    channel = DataPlaneChannel("compute-b", server.address, caller="hospital-a", tls=None, token="secret-a", timeout=10)
    header = pb.CallHeader(run=RUN, data_owner="hospital-a", operation=operation, phase=pb.FORWARD)
    try:
        _assert_rejected(
            worker,
            lambda: channel.call(header, [("0", torch.randn(4, 16, 64))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            text,
        )
    finally:
        channel.close()


@pytest.mark.parametrize(
    "mutate, text",
    [
        (lambda h, t: setattr(t, "in_shm", True), "has no segment"),
        (
            lambda h, t: (setattr(t, "in_shm", True), setattr(h, "shm_request", "../../etc/passwd")),
            "not a fedsplit shared-memory segment",
        ),
        (
            lambda h, t: (
                setattr(t, "in_shm", True),
                setattr(t, "shm_offset", 1 << 40),
                setattr(h, "shm_request", "SEG"),
            ),
            "outside segment",
        ),
    ],
)
def test_bad_shared_memory_references_are_invalid_argument(served, mutate, text):
    from fedsplit.transport.framing import call_frame
    from fedsplit.transport.shm import Segment

    _, worker, server = served
    seg = Segment.create(1 << 20, "hospital-a")
    try:
        header = pb.CallHeader(
            run=RUN,
            caller="hospital-a",
            data_owner="hospital-a",
            operation=op_to_proto(SegmentOp((1, 2))),
            phase=pb.FORWARD,
            num_tensors=1,
        )
        (enc,) = prepare([("0", torch.randn(4, 16, 64))])
        mutate(header, enc.header)
        if header.shm_request == "SEG":
            header.shm_request = seg.name
        frames = [call_frame(header), pb.Frame(tensor=enc.header).SerializeToString()]
        channel = grpc.insecure_channel(server.address)
        rpc = channel.stream_stream("/fedsplit.v1.DataPlane/Call")
        with pytest.raises(grpc.RpcError) as err:
            list(
                rpc(
                    iter(frames),
                    metadata=[("x-fedsplit-org", "hospital-a"), ("authorization", "Bearer secret-a")],
                    timeout=10,
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
        assert not worker.stage.waiting
    finally:
        seg.unlink()


def test_calls_of_another_run_are_refused(served):
    _, worker, server = served
    _assert_rejected(
        worker,
        lambda: _forward(server, "hospital-a", "secret-a", run="old-run"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "run 'old-run'",
    )


def test_a_repeated_call_is_recognised_and_never_applied_twice(served):
    _, worker, server = served
    x = torch.randn(4, 16, 64)
    first = _forward(server, "hospital-a", "secret-a", x=x, step=7)
    again = _forward(server, "hospital-a", "secret-a", x=torch.randn(4, 16, 64), step=7)  # same identity
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))
    channel = DataPlaneChannel("compute-b", server.address, caller="hospital-a", tls=None, token="secret-a")
    header = pb.CallHeader(
        run=RUN,
        data_owner="hospital-a",
        step=7,
        micro_batch=0,
        operation=op_to_proto(SegmentOp((1, 2))),
        phase=pb.BACKWARD,
    )
    grads = [("0", torch.ones(4, 16, 64)), ("1", torch.tensor(0.5))]
    g1 = channel.call(header, grads)
    once = {k: p.grad.clone() for k, p in worker.model.bindings.items() if p.grad is not None}
    g2 = channel.call(header, grads)
    assert once and all(torch.equal(p.grad, once[k]) for k, p in worker.model.bindings.items() if k in once)
    assert torch.equal(g1[0][1], g2[0][1])


def test_backward_without_forward_is_rejected(served):
    _, worker, server = served
    channel = DataPlaneChannel("compute-b", server.address, caller="hospital-a", tls=None, token="secret-a")
    header = pb.CallHeader(
        run=RUN,
        data_owner="hospital-a",
        step=5,
        micro_batch=0,
        operation=op_to_proto(SegmentOp((1, 2))),
        phase=pb.BACKWARD,
    )
    with pytest.raises(PeerError) as err:
        channel.call(header, [("0", torch.randn(4, 16, 64)), ("1", torch.tensor(1.0))])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "without a forward" in err.value.details


def test_replica_gradients_are_taken_only_from_co_holders_and_only_for_what_they_co_hold():
    plan = load_plan(PLANS / "two-hospitals" / "federation.yaml")
    plan = plan.with_settings(aggregation=plan.aggregation.model_copy(update={"replica_sync": "step"}))
    worker = Worker(plan, "hospital-a", select(initial_weights(plan), plan.slices_of("hospital-a")), "cpu")
    creds = Credentials.of_tokens({"hospital-b": "secret-b", "compute-c": "secret-c"})
    server = DataPlaneServer(
        WorkerHandler(worker, RUN, tls=None), tls=None, credentials=creds, limits=Limits(max_tensor_bytes=1 << 20)
    ).start()
    embed = worker.model.bindings["embed.weight"]

    def send(caller, token, grads):
        channel = DataPlaneChannel("hospital-a", server.address, caller=caller, tls=None, token=token, timeout=10)
        try:
            return channel.call(
                pb.CallHeader(run=RUN, data_owner=caller, phase=pb.CONTROL, control=REPLICA_GRADS_OF_STEP_3), grads
            )
        finally:
            channel.close()

    try:
        _assert_rejected(
            worker,
            lambda: send("compute-c", "secret-c", [("embed.weight", torch.ones_like(embed))]),
            grpc.StatusCode.PERMISSION_DENIED,
            "holds no replica",
        )
        _assert_rejected(
            worker,
            lambda: send("hospital-b", "secret-b", [("embed.weight", torch.ones(3, 3))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "gradient of embed.weight must be",
        )
        _assert_rejected(
            worker,
            lambda: send("hospital-b", "secret-b", [("embed.weight", torch.full_like(embed, float("nan")))]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or infinite",
        )
        assert not worker.grads.pending_replica_steps  # nothing of a rejected message is kept
        send("hospital-b", "secret-b", [("embed.weight", torch.ones_like(embed))])
        worker.grads.gather(3, timeout=10)  # hospital-a itself has no gradient: the co-holder's is the sum
        assert torch.equal(embed.grad, torch.ones_like(embed))
    finally:
        server.stop(None)


class _Echo:
    def handle(self, header, tensors):
        return Reply(tensors)


def test_each_organisation_holds_only_its_own_token_and_servers_check_verifiers(tmp_path):
    from fedsplit.transport.security import load_token, load_verifiers

    creds = generate_credentials(["a", "b"], tmp_path)
    tokens = {org: load_token(creds, org) for org in "ab"}
    shared = (creds / "verifiers.yaml").read_text()
    assert tokens["a"] != tokens["b"] and not any(t in shared for t in tokens.values())
    assert oct((creds / "a.token").stat().st_mode & 0o777) == "0o600"
    check = Credentials(load_verifiers(creds)).check
    assert check("a", tokens["a"]) and check("b", tokens["b"])
    assert not check("a", tokens["b"]) and not check("c", tokens["a"]) and not check("a", "")
    with pytest.raises(FileNotFoundError, match="fedsplit certs"):
        load_token(creds, "c")


def test_mutual_tls_admits_only_certificates_of_the_federation_ca(tmp_path):
    ours = generate_credentials(["a", "b"], tmp_path / "ours")
    theirs = generate_credentials(["a"], tmp_path / "theirs")
    server = DataPlaneServer(_Echo(), tls=TLSConfig.load(ours, "b"), port=0).start()
    x = [("x", torch.arange(4.0))]
    try:
        good = DataPlaneChannel("b", f"localhost:{server.port}", caller="a", tls=TLSConfig.load(ours, "a"), timeout=10)
        assert torch.equal(good.call(pb.CallHeader(), x)[0][1], x[0][1])
        for tls in (TLSConfig.load(theirs, "a"), None):  # a foreign CA, and plaintext
            bad = DataPlaneChannel("b", f"localhost:{server.port}", caller="a", tls=tls, timeout=5)
            with pytest.raises(PeerError) as err:
                bad.call(pb.CallHeader(), x)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


@pytest.mark.parametrize("shared_memory", [False, True])
def test_small_and_large_calls_round_trip_and_replies_stay_intact_while_held(shared_memory):
    server = DataPlaneServer(_Echo(), tls=None, port=0, shared_memory=True).start()
    channel = DataPlaneChannel("b", server.address, caller="a", tls=None, timeout=30, shared_memory=shared_memory)
    try:
        for numel in (1 << 10, 5 << 20):  # one message each way, and 20 MiB streamed in chunks
            x, y = torch.randn(numel), torch.randn(numel)
            kept = channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", x)])[0][1]
            again = channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", y)])[0][1]
            assert torch.equal(kept, x) and torch.equal(again, y)
        del kept, again
    finally:
        channel.close()
        server.stop(None)


class _Keeper:
    """Keeps what ``keep`` calls send (as a forward keeps its input for the backward) until ``drop``."""

    def __init__(self):
        self.kept = []

    def handle(self, header, tensors):
        if header.phase == pb.CONTROL:
            self.kept.clear()
        else:
            self.kept.append(tensors[0][1])
        return Reply([("ack", torch.zeros(1))])


def test_shared_memory_callee_reads_requests_in_place_and_its_kept_tensors_are_never_overwritten():
    keeper = _Keeper()
    server = DataPlaneServer(keeper, tls=None, port=0, shared_memory=True).start()
    channel = DataPlaneChannel("b", server.address, caller="a", tls=None, timeout=30, shared_memory=True)
    segments = lambda: len([f for f in os.listdir("/dev/shm") if f.startswith(f"fedsplit-{os.getpid()}-")])  # noqa: E731
    try:
        sent = [torch.full((1 << 16,), float(i)) for i in range(4)]
        for x in sent:
            channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", x)])
        assert all(torch.equal(k, x) for k, x in zip(keeper.kept, sent))  # four calls, none wrote over another's input
        assert keeper.kept[0].untyped_storage().data_ptr() != sent[0].untyped_storage().data_ptr()
        channel.call(pb.CallHeader(phase=pb.CONTROL), [])
        before = segments()
        for i in range(8):  # what the drop gave back is reused: no new segments
            channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", torch.full((1 << 16,), 10.0 + i))])
            keeper.kept.clear()
        assert segments() == before
    finally:
        channel.close()
        server.stop(None)


def test_calls_go_over_grpc_while_shared_memory_is_full_and_say_so(monkeypatch, caplog):
    import errno

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    server = DataPlaneServer(_Echo(), tls=None, port=0, shared_memory=True).start()
    channel = DataPlaneChannel("b", server.address, caller="a", tls=None, timeout=30, shared_memory=True)
    x = torch.randn(1 << 16)
    try:
        with monkeypatch.context() as m:
            m.setattr(os, "posix_fallocate", full)
            assert torch.equal(channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", x)])[0][1], x)
        assert channel.wire_bytes > 2 * x.numel() * 4  # the tensor crossed gRPC both ways
        assert "cannot reserve" in caplog.text and "/dev/shm" in caplog.text
        before = channel.wire_bytes
        assert torch.equal(channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", x)])[0][1], x)
        assert channel.wire_bytes - before < 1024  # room again: back to shared memory
    finally:
        channel.close()
        server.stop(None)


@pytest.mark.slow
def test_a_one_gib_tensor_crosses_the_data_plane_both_ways():
    """The default cap (``Limits.max_tensor_bytes``, 1 GiB) is reachable: 1024 chunks each way."""
    server = DataPlaneServer(_Echo(), tls=None, port=0).start()
    channel = DataPlaneChannel("b", server.address, caller="a", tls=None, timeout=300)
    x = torch.arange(1 << 28, dtype=torch.float32)  # 1 GiB
    try:
        ((name, y),) = channel.call(pb.CallHeader(phase=pb.FORWARD), [("x", x)])
        assert name == "x" and torch.equal(y, x)
        assert channel.tensor_bytes == 2 << 30
    finally:
        channel.close()
        server.stop(None)


def test_worker_process_refuses_to_start_without_credentials_or_explicit_insecure(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsplit.hosting.host",
            str(PLANS / "layers" / "federation.yaml"),
            "--orgs",
            "compute-b",
            "--run",
            "r",
            "--ready-file",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "--insecure explicitly" in proc.stderr


def test_only_the_worker_s_own_organisation_can_say_its_run_is_over():
    """A deployed client exits once its worker hears `end_run`: another organisation, even with a
    valid credential, cannot make it stop (PERMISSION_DENIED); its own client can."""
    plan = load_plan(PLANS / "layers" / "federation.yaml")
    worker = Worker(plan, "compute-b", select(initial_weights(plan), plan.slices_of("compute-b")), "cpu")
    handler = WorkerHandler(worker, RUN, tls=None)
    creds = Credentials.of_tokens({"hospital-a": "secret-a", "compute-b": "secret-b"})
    server = DataPlaneServer(handler, tls=None, credentials=creds, limits=Limits(max_tensor_bytes=1 << 20)).start()

    def end_run(caller: str, token: str) -> None:
        channel = DataPlaneChannel("compute-b", server.address, caller=caller, tls=None, token=token, timeout=10)
        try:
            channel.call(pb.CallHeader(run=RUN, phase=pb.CONTROL, control=pb.Control(end_run=pb.EndRun())), [])
        finally:
            channel.close()

    try:
        with pytest.raises(PeerError) as err:
            end_run("hospital-a", "secret-a")
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and not handler.run_ended.is_set()
        end_run("compute-b", "secret-b")
        assert handler.run_ended.is_set()
    finally:
        server.stop(None)
