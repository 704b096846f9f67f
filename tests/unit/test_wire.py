"""Tensors on the wire: the format, validation of every incoming frame, fuzzing, buffer reuse,
and the generated protobuf code."""

import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsplit.transport.framing import Limits, WireError, chunk_frame, frame_pieces, one_message, unpack_message
from fedsplit.transport.proto import dataplane_pb2 as pb
from fedsplit.transport.wire import decode_tensors, encode_tensors, prepare

from ..conftest import ROOT


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


def test_numpy_arrays_cross_the_same_wire_as_tensors_and_are_checked_as_strictly():
    """What a ClientApp relays: Flower's NumPy arrays, encoded without torch, decoded by a worker
    as the tensors they are, and the worker's tensors decoded back as arrays."""
    import numpy as np

    from fedsplit.transport.arrays import ARRAYS

    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([7, 8], dtype=np.int64)}
    frames = list(frame_pieces(ARRAYS.prepare(list(weights.items()))))
    tensors = decode_tensors((b"".join(f) for f in frames), 2, Limits())
    assert [(k, v.dtype, tuple(v.shape)) for k, v in tensors] == [
        ("w", torch.float32, (3, 4)),
        ("n", torch.int64, (2,)),
    ]
    assert torch.equal(tensors[0][1], torch.arange(12, dtype=torch.float32).reshape(3, 4))
    back = ARRAYS.decode(encode_tensors(tensors), 2, Limits())
    assert all(np.array_equal(a, weights[k]) and a.dtype == weights[k].dtype for k, a in back)
    with pytest.raises(WireError, match="dtype 'bfloat16' is not allowed"):
        ARRAYS.decode(encode_tensors([("b", torch.ones(2, dtype=torch.bfloat16))]), 1, Limits())
    with pytest.raises(WireError, match="NaN or infinite"):
        ARRAYS.decode(encode_tensors([("x", torch.tensor([1.0, float("nan")]))]), 1, Limits())
    with pytest.raises(WireError, match="exceeds the limit"):
        ARRAYS.decode(encode_tensors([("x", torch.ones(64))]), 1, Limits(max_tensor_bytes=128))
    with pytest.raises(WireError, match="uncompressed"):
        ARRAYS.decode(encode_tensors([("x", torch.ones(2, 8))], codec="bf16"), 1, Limits())
