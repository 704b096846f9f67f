"""An authenticated or unauthenticated peer trying to stall, wedge or confuse a real data-plane
server on loopback: every attempt gets a clear status, changes no weight, holds nothing after it,
and the server keeps serving valid calls."""

import threading

import grpc
import pytest
import torch

from fedsplit.hosting.handler import WorkerHandler
from fedsplit.hosting.messages import op_to_proto
from fedsplit.plan import load_plan, select
from fedsplit.runtime import Worker, initial_weights
from fedsplit.runtime.ops import SegmentOp
from fedsplit.runtime.rounds import Rounds, RoundSpec
from fedsplit.transport.channel import DataPlaneChannel
from fedsplit.transport.framing import Limits, call_frame
from fedsplit.transport.proto import dataplane_pb2 as pb
from fedsplit.transport.security import TLSConfig, generate_credentials, load_token, load_verifiers
from fedsplit.transport.service import Credentials, DataPlaneServer, PeerError
from fedsplit.transport.shm import Segment
from fedsplit.transport.wire import prepare

from ..conftest import PLANS

RUN = "test-run"
META = [("x-fedsplit-org", "hospital-a"), ("authorization", "Bearer secret-a")]


def _serve(worker, **kw):
    creds = Credentials.of_tokens({"hospital-a": "secret-a", "compute-c": "secret-c"})
    kw = {"tls": None, "credentials": creds, "limits": Limits(max_tensor_bytes=1 << 20), **kw}
    return DataPlaneServer(WorkerHandler(worker, RUN, tls=None), **kw).start()


@pytest.fixture
def compute_b():
    plan = load_plan(PLANS / "layers" / "federation.yaml")
    return Worker(plan, "compute-b", select(initial_weights(plan), plan.slices_of("compute-b")), "cpu")


def _header(step=0, phase=pb.FORWARD, operation=None, **kw):
    operation = operation or op_to_proto(SegmentOp((1, 2)))
    return pb.CallHeader(
        run=RUN,
        caller="hospital-a",
        data_owner="hospital-a",
        step=step,
        micro_batch=0,
        operation=operation,
        phase=phase,
        **kw,
    )


def _channel(server, caller="hospital-a", token="secret-a", **kw):
    return DataPlaneChannel("compute-b", server.address, caller=caller, tls=None, token=token, timeout=30, **kw)


def _forward(server, step=0):
    channel = _channel(server)
    try:
        return channel.call(_header(step), [("0", torch.randn(4, 16, 64))])
    finally:
        channel.close()


def _raw(server, frames, metadata=META, timeout=30):
    channel = grpc.insecure_channel(server.address)
    try:
        return list(
            channel.stream_stream("/fedsplit.v1.DataPlane/Call")(iter(frames), metadata=metadata, timeout=timeout)
        )
    finally:
        channel.close()


def _unchanged(worker):
    before = {k: v.clone() for k, v in worker.state_dict().items()}
    return lambda: all(torch.equal(before[k], v) for k, v in worker.state_dict().items())


class _IdleStreams:
    """``n`` streams that open and then send nothing until closed."""

    def __init__(self, server, n, metadata):
        self.channel = grpc.insecure_channel(server.address)
        self.stop = threading.Event()
        rpc = self.channel.stream_stream("/fedsplit.v1.DataPlane/Call")

        def nothing():
            self.stop.wait()
            return
            yield

        self.calls = [rpc(nothing(), metadata=metadata, timeout=120) for _ in range(n)]

    def close(self):
        self.stop.set()
        for c in self.calls:
            c.cancel()
        self.channel.close()


@pytest.mark.parametrize("who", ["unauthenticated", "authenticated"])
def test_a_valid_call_succeeds_while_200_idle_streams_are_open(compute_b, who):
    server = _serve(compute_b, idle_s=60.0)
    metadata = [
        ("x-fedsplit-org", "compute-c"),
        ("authorization", "Bearer " + ("guess" if who == "unauthenticated" else "secret-c")),
    ]
    idle = _IdleStreams(server, 200, metadata)
    try:
        out = _forward(server)
        assert out[0][1].shape == (4, 16, 64)
    finally:
        idle.close()
        server.stop(None)


def test_calls_beyond_a_callers_quota_are_resource_exhausted_at_once(compute_b):
    server = _serve(compute_b, idle_s=60.0, calls_per_caller=4)
    metadata = [("x-fedsplit-org", "compute-c"), ("authorization", "Bearer secret-c")]
    idle = _IdleStreams(server, 4, metadata)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _raw(server, [call_frame(_header())], metadata=metadata)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "calls open" in err.value.details()
        assert _forward(server)[0][1].shape == (4, 16, 64)  # another caller's quota is its own
    finally:
        idle.close()
        server.stop(None)


def test_a_stream_that_sends_nothing_is_cancelled_after_the_idle_deadline_and_frees_its_place(compute_b):
    server = _serve(compute_b, idle_s=0.5, calls_per_caller=2)
    stop = threading.Event()

    def nothing():
        stop.wait()
        return
        yield

    channel = grpc.insecure_channel(server.address)
    rpc = channel.stream_stream("/fedsplit.v1.DataPlane/Call")
    try:
        for _ in range(3):  # more than the quota, one after another: each is cancelled and gives its place back
            with pytest.raises(grpc.RpcError) as err:
                list(rpc(nothing(), metadata=META, timeout=60))
            assert err.value.code() == grpc.StatusCode.CANCELLED
        assert _forward(server)[0][1].shape == (4, 16, 64)
    finally:
        stop.set()
        channel.close()
        server.stop(None)


def _tensor_frame(**fields):
    return pb.Frame(tensor=pb.TensorHeader(name="0", dtype="float32", **fields)).SerializeToString()


@pytest.mark.parametrize(
    "frames, text",
    [
        ([call_frame(_header(num_tensors=1)), _tensor_frame(shape=[1] * 100_000, nbytes=4)], "dimensions; at most 8"),
        (
            [call_frame(_header(num_tensors=1)), _tensor_frame(shape=[1 << 40, 1 << 40, 0], nbytes=0)],
            "exceeds the limit",
        ),
        ([call_frame(_header(num_tensors=1)), _tensor_frame(shape=[1 << 62, 4], nbytes=1 << 62)], "exceeds the limit"),
        ([call_frame(pb.CallHeader(run="r" * 100_000, caller="hospital-a"))], "longer than 256"),
        (
            [call_frame(_header(operation=pb.Operation(segment=pb.Segment(layers=list(range(0, 120_000, 2))))))],
            "ascending and consecutive",
        ),
    ],
)
def test_oversized_or_absurd_headers_are_invalid_argument_with_a_short_reason(compute_b, frames, text):
    server = _serve(compute_b)
    unchanged = _unchanged(compute_b)
    try:
        with pytest.raises(grpc.RpcError) as err:
            _raw(server, frames)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
        assert len(err.value.details()) <= 512
        assert unchanged() and not compute_b.stage.waiting
        assert _forward(server)[0][1].shape == (4, 16, 64)
    finally:
        server.stop(None)


def test_an_operation_of_100000_characters_gets_a_short_invalid_argument(compute_b):
    server = _serve(compute_b)
    op = pb.Operation(experts=pb.ExpertRows(layer=1, experts=[3] * 30_000, rows=[1] * 30_000))
    try:
        with pytest.raises(grpc.RpcError) as err:
            _raw(server, [call_frame(_header(operation=op, num_tensors=1))])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(err.value.details()) <= 512
    finally:
        server.stop(None)


def test_a_wrongly_shaped_load_is_invalid_argument_and_loads_nothing(compute_b):
    server = _serve(compute_b, credentials=Credentials.of_tokens({"compute-b": "secret-b"}))
    unchanged = _unchanged(compute_b)
    name = next(iter(compute_b.weights.master))
    channel = DataPlaneChannel("compute-b", server.address, caller="compute-b", tls=None, token="secret-b")
    header = pb.CallHeader(run=RUN, phase=pb.CONTROL, control=pb.Control(load_state=pb.LoadState()))
    try:
        for tensors, text in [([(name, torch.zeros(3))], "cannot load"), ([("nope", torch.zeros(3))], "not a weight")]:
            with pytest.raises(PeerError) as err:
                channel.call(header, tensors)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details
        assert unchanged()
    finally:
        channel.close()
        server.stop(None)


def test_shared_memory_is_refused_when_the_plan_turns_it_off(compute_b):
    server = _serve(compute_b)  # shared_memory off, as the layers plan says
    channel = _channel(server, shared_memory=True)
    try:
        with pytest.raises(PeerError) as err:
            channel.call(_header(), [("0", torch.randn(4, 16, 64))])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "shared memory is off" in err.value.details
        assert not compute_b.stage.waiting
    finally:
        channel.close()
        server.stop(None)


@pytest.mark.parametrize(
    "owner, text", [("compute-c", "is not one of 'hospital-a'"), (None, "no shared-memory segment")]
)
def test_only_segments_of_the_callers_own_pool_are_mapped(compute_b, owner, text):
    server = _serve(compute_b, shared_memory=True)
    seg = Segment.create(1 << 20, owner) if owner else None
    name = seg.name if seg else "fedsplit-1-0123456789abcdef-hospital-a"
    (enc,) = prepare([("0", torch.randn(4, 16, 64))])
    enc.header.in_shm = True
    try:
        with pytest.raises(grpc.RpcError) as err:
            _raw(
                server,
                [call_frame(_header(num_tensors=1, shm_request=name)), pb.Frame(tensor=enc.header).SerializeToString()],
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in err.value.details()
    finally:
        if seg:
            seg.unlink()
        server.stop(None)


def test_a_forward_replayed_after_its_backward_is_answered_again_and_leaves_nothing(compute_b):
    server = _serve(compute_b)
    x = torch.randn(4, 16, 64)
    channel = _channel(server)
    try:
        first = channel.call(_header(3), [("0", x)])
        channel.call(_header(3, pb.BACKWARD), [("0", torch.ones(4, 16, 64)), ("1", torch.tensor(1.0))])
        again = channel.call(_header(3), [("0", x)])
        assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again))
        assert not compute_b.stage.waiting
        compute_b.apply_step(3)  # the step still applies
    finally:
        channel.close()
        server.stop(None)


def test_calls_outside_the_step_a_round_is_in_are_refused_and_kept_nowhere(compute_b):
    rounds = Rounds(compute_b)
    rounds.begin(RoundSpec(1, 0, 2, ("hospital-a",), 0, False, 0), compute_b.state_dict())
    server = _serve(compute_b)
    try:
        for step in (10_000, 1, -1):
            with pytest.raises(PeerError) as err:
                _forward(server, step)
            assert (
                err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "this worker is in step 0" in err.value.details
            )
        assert not compute_b.stage.waiting
        assert _forward(server, 0)[0][1].shape == (4, 16, 64)
    finally:
        server.stop(None)


def test_records_are_bounded_even_without_rounds(compute_b):
    server = _serve(compute_b)
    channel = _channel(server)
    try:
        with pytest.raises(PeerError) as err:
            for step in range(10_000, 10_000 + compute_b.stage.max_records + 1):
                channel.call(_header(step), [("0", torch.randn(4, 16, 64))])
        assert "the most a step can have" in err.value.details
        assert compute_b.stage.waiting == compute_b.stage.max_records
    finally:
        channel.close()
        server.stop(None)


def test_a_certificate_and_a_token_of_different_organisations_are_refused(tmp_path, compute_b):
    creds = generate_credentials(["hospital-a", "compute-b", "compute-c"], tmp_path)
    server = DataPlaneServer(
        WorkerHandler(compute_b, RUN, tls=None),
        "127.0.0.1",
        tls=TLSConfig.load(creds, "compute-b"),
        credentials=Credentials(load_verifiers(creds)),
    ).start()
    address = f"localhost:{server.port}"

    def forward(cert, caller):
        channel = DataPlaneChannel(
            "compute-b", address, caller=caller, tls=TLSConfig.load(creds, cert), token=load_token(creds, caller)
        )
        try:
            return channel.call(_header(), [("0", torch.randn(4, 16, 64))])
        finally:
            channel.close()

    try:
        with pytest.raises(PeerError) as err:
            forward("compute-c", "hospital-a")  # compute-c's certificate, hospital-a's token
        assert (
            err.value.code == grpc.StatusCode.PERMISSION_DENIED and "certificate is of compute-c" in err.value.details
        )
        assert not compute_b.stage.waiting
        assert forward("hospital-a", "hospital-a")[0][1].shape == (4, 16, 64)
    finally:
        server.stop(None)
