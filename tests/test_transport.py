"""The gRPC data plane: wire format, validation of every incoming message, credentials,
permissions, failures, and exact split training across processes."""

import os
import subprocess
import sys
import time

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsplit.federation.verify import verify
from fedsplit.hosting.handler import WorkerHandler
from fedsplit.hosting.messages import op_to_proto
from fedsplit.hosting.processes import ProcessFederation
from fedsplit.plan import load_plan, select
from fedsplit.plan.schema import OptimizerConfig
from fedsplit.runtime import InProcessFederation, Worker, initial_weights, synthetic_batches
from fedsplit.runtime.ops import SegmentOp
from fedsplit.transport.proto import dataplane_pb2 as pb
from fedsplit.transport.security import TLSConfig, generate_credentials
from fedsplit.transport.service import Credentials, DataPlaneChannel, DataPlaneServer, PeerError, Reply
from fedsplit.transport.wire import (
    Limits,
    WireError,
    chunk_frame,
    decode_tensors,
    encode_tensors,
    frame_pieces,
    one_message,
    prepare,
    unpack_message,
)

from .conftest import PLANS, ROOT

# -- wire format ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_tensors_round_trip_bit_exact_in_their_own_dtype(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    frames = list(encode_tensors([("x", t), ("none", None), ("scalar", torch.tensor(2.5))]))
    out = decode_tensors(frames, 3, Limits())
    assert out[0][0] == "x" and out[0][1].dtype == dtype and torch.equal(out[0][1], t)
    assert out[1] == ("none", None) and float(out[2][1]) == 2.5
    if dtype == torch.bfloat16:  # no fp32 inflation: 2 bytes per element on the wire
        assert t.numel() * 2 < len(frames[1]) <= t.numel() * 2 + 4


def test_large_tensor_streams_in_one_mib_chunks_past_grpc_message_limits():
    t = torch.randn(5 << 20 // 4 * 4)  # 20 MiB of fp32
    frames = list(encode_tensors([("big", t)]))
    assert len(frames) == 1 + 20 and max(len(f) for f in frames) < (1 << 20) + 8
    assert torch.equal(decode_tensors(frames, 1, Limits())[0][1], t)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (
            lambda f: [
                pb.Frame(tensor=pb.TensorHeader(name="x", dtype="complex64", shape=[2], nbytes=16)).SerializeToString()
            ],
            "not allowed",
        ),
        (
            lambda f: [
                pb.Frame(tensor=pb.TensorHeader(name="x", dtype="float32", shape=[2, 2], nbytes=12)).SerializeToString()
            ],
            "needs 16",
        ),
        (lambda f: f[:-1], "stream ended"),
        (lambda f: f + [chunk_frame(memoryview(b"xxxx"))], None),
        (lambda f: f[:1] + [chunk_frame(memoryview(b"\0" * 64))], "more than"),
        (lambda f: [b"\x1a\x05ab"], "declares 5 bytes"),
        (lambda f: [b"\xff\xff\xff"], "undecodable"),
    ],
)
def test_malformed_frames_are_rejected_with_a_reason(mutate, reason):
    frames = mutate(list(encode_tensors([("x", torch.ones(2, 2))])))
    if reason is None:  # trailing garbage after the declared tensors is never read as data
        assert torch.equal(decode_tensors(frames, 1, Limits())[0][1], torch.ones(2, 2))
        return
    with pytest.raises(WireError, match=reason):
        decode_tensors(frames, 1, Limits())


def test_non_finite_and_oversized_tensors_are_rejected():
    with pytest.raises(WireError, match="NaN or infinite"):
        decode_tensors(list(encode_tensors([("g", torch.tensor([1.0, float("nan")]))])), 1, Limits())
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_tensors(list(encode_tensors([("a", torch.ones(1000))])), 1, Limits(max_tensor_bytes=1000))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6), st.integers(0, 4))
def test_decoder_fuzz_raises_only_wire_errors(frames, count):
    try:
        decode_tensors(frames, count, Limits(max_tensor_bytes=1 << 16))
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=96), st.integers(0, 3))
def test_one_message_decoder_fuzz_raises_only_wire_errors(raw, count):
    try:
        decode_tensors(unpack_message(raw), count, Limits(max_tensor_bytes=1 << 16))
    except WireError:
        pass


def test_one_message_carries_the_same_frames_and_is_a_protobuf_frames_message():
    tensors = [("x", torch.randn(3, 4)), ("none", None), ("i", torch.arange(5))]
    message = one_message(frame_pieces(prepare(tensors), None))
    assert [f.WhichOneof("kind") for f in pb.Frames.FromString(message).frames] == [
        "tensor",
        "chunk",
        "tensor",
        "tensor",
        "chunk",
    ]
    out = decode_tensors(unpack_message(message), 3, Limits())
    assert torch.equal(out[0][1], tensors[0][1]) and out[1] == ("none", None) and torch.equal(out[2][1], tensors[2][1])


def test_a_decoded_tensor_keeps_its_memory_while_later_ones_reuse_freed_buffers():
    a, b = torch.randn(1 << 16), torch.randn(1 << 16)
    chunked = lambda t: list(encode_tensors([("t", t)], chunk_bytes=1 << 16))  # noqa: E731  (four chunks each)
    first = decode_tensors(chunked(a), 1, Limits())[0][1]
    second = decode_tensors(chunked(b), 1, Limits())[0][1]
    assert torch.equal(first, a) and torch.equal(second, b) and first.data_ptr() != second.data_ptr()
    freed = second.data_ptr()
    del second
    assert decode_tensors(chunked(a), 1, Limits())[0][1].data_ptr() == freed


def test_generated_protobuf_code_matches_the_proto(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, cwd=ROOT)
    for name in ("dataplane_pb2.py", "dataplane_pb2.pyi"):
        assert (tmp_path / name).read_text() == (ROOT / "fedsplit" / "transport" / "proto" / name).read_text(), (
            f"{name} is stale: run scripts/gen_protos.sh"
        )


# -- a real server on loopback ----------------------------------------------------------


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
        WorkerHandler(worker, RUN, tls=None), tls=None, credentials=creds, limits=Limits(max_tensor_bytes=1 << 20)
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
        (pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3], rows=[1 << 40])), "more than a micro-batch routes"),
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
    from fedsplit.transport.shm import Segment
    from fedsplit.transport.wire import call_frame, prepare

    _, worker, server = served
    seg = Segment.create(1 << 20)
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
    plan.aggregation = plan.aggregation.model_copy(update={"replica_sync": "step"})
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
    server = DataPlaneServer(_Echo(), tls=None, port=0).start()
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
    server = DataPlaneServer(keeper, tls=None, port=0).start()
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

    server = DataPlaneServer(_Echo(), tls=None, port=0).start()
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


# -- processes -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["layers", "heads", "experts", "shared-experts", "three-orgs"])
def test_split_training_over_grpc_matches_monolithic(name):
    result = verify(load_plan(PLANS / name / "federation.yaml"), steps=10, transport="grpc")
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


@pytest.mark.slow
def test_replicas_kept_in_step_over_grpc_match_monolithic_adamw():
    plan = load_plan(PLANS / "u-shape-3" / "federation.yaml")
    plan.aggregation = plan.aggregation.model_copy(update={"replica_sync": "step"})
    result = verify(
        plan, steps=10, transport="grpc", optimizer=OptimizerConfig(name="adamw", lr=3e-4)
    )  # as in test_split_exactness
    assert result.max_abs_diff <= 1e-5, (result.max_abs_diff, result.worst_parameter)


@pytest.mark.slow
def test_shared_memory_path_is_bitwise_and_keeps_tensors_off_the_wire():
    plan = load_plan(PLANS / "layers" / "federation.yaml")
    plan.transport = plan.transport.model_copy(update={"shared_memory": True})
    assert verify(plan, steps=3, transport="grpc").max_abs_diff == 0.0
    with ProcessFederation(plan, initial_weights(plan)) as fed:
        fed.train_step(0, synthetic_batches(plan, 0))
        traffic = fed.traffic()
        pids = [p.pid for p in fed.hosts.procs.values()]
    assert traffic["wire_bytes"] < 0.01 * traffic["tensor_bytes"]
    assert not [f for f in os.listdir("/dev/shm") if any(f.startswith(f"fedsplit-{pid}-") for pid in pids)]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipelined_schedules_over_grpc_compute_what_the_sequential_schedule_computes(schedule):
    """Backwards run one at a time in micro-batch order: a layer plan stays bitwise equal to the
    monolith, and a mixed plan trains to the parameters of its sequential run within 1e-5 (its
    distance to the monolith is head-group rounding that AdamW magnifies on near-zero gradients:
    2.2e-5 for three-orgs at 4 micro-batches, see the README)."""

    def plan_of(name: str, s: str):
        plan = load_plan(PLANS / name / "federation.yaml")
        plan.training = plan.training.model_copy(update={"schedule": s, "micro_batches": 4, "max_in_flight": 2})
        return plan

    assert verify(plan_of("layers", schedule), steps=5, transport="grpc").max_abs_diff == 0.0
    trained = {}
    for s in ("sequential", schedule):
        plan = plan_of("three-orgs", s)
        with ProcessFederation(plan, initial_weights(plan)) as fed:
            for step in range(5):
                fed.train_step(step, synthetic_batches(plan, step))
            trained[s] = fed.reassembled()
    assert max(float((trained[schedule][k] - v).abs().max()) for k, v in trained["sequential"].items()) <= 1e-5


def test_killed_worker_gives_a_clear_error_within_the_deadline():
    plan = load_plan(PLANS / "three-orgs" / "federation.yaml")
    with ProcessFederation(plan, initial_weights(plan), timeout=20) as fed:
        fed.train_step(0, synthetic_batches(plan, 0))
        fed.hosts.kill("compute-b")
        fed.hosts.procs[fed.hosts.group_of["compute-b"]].wait()
        start = time.monotonic()
        with pytest.raises(PeerError) as err:
            fed.train_step(1, synthetic_batches(plan, 1))
        assert time.monotonic() - start < 20
        assert "compute-b" in str(err.value) and "UNAVAILABLE" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("codec, max_bytes_ratio", [("none", 1.02), ("bf16", 0.52), ("int8", 0.27)])
def test_wire_bytes_per_step_match_the_tensors_they_carry_and_shrink_with_compression(tmp_path, codec, max_bytes_ratio):
    fed_yaml = (
        (PLANS / "layers" / "federation.yaml")
        .read_text()
        .replace("../../models/tiny.yaml", str(ROOT / "configs/models/tiny.yaml"))
    )
    fed_yaml = fed_yaml.replace("orgs: [orgs/*.yaml]", f"orgs: [{PLANS / 'layers' / 'orgs'}/*.yaml]")
    fed_yaml += f"transport: {{compression: {{activations: {codec}, gradients: {codec}}}}}\n"
    (tmp_path / "federation.yaml").write_text(fed_yaml)
    plan = load_plan(tmp_path / "federation.yaml")
    batches = synthetic_batches(plan, 0)
    exact = InProcessFederation(plan, initial_weights(plan)).train_step(0, batches)["hospital-a"]["loss"]
    with ProcessFederation(plan, initial_weights(plan), insecure=True) as fed:
        loss = fed.train_step(0, batches)["hospital-a"]["loss"]
        traffic = fed.traffic()
    # hidden states (4, 64, 64) fp32 cross 2 boundaries forward and 2 backward, per micro-batch
    raw = 2 * plan.training.micro_batches * 2 * 4 * 64 * 64 * 4
    assert traffic["tensor_bytes"] >= raw
    assert traffic["wire_bytes"] <= max_bytes_ratio * traffic["tensor_bytes"]
    assert loss == pytest.approx(exact, abs={"none": 1e-6, "bf16": 1e-2, "int8": 5e-2}[codec])
