import cbor2
import pytest
import torch
from hypothesis import given, settings, strategies as st

from protocols import PROTOCOL_VERSION, ProtocolError, decode_frame, encode_frame, message, validate
from protocols.frames import DTYPES


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
def test_every_dtype_round_trips_bit_exact(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    out = decode_frame(encode_frame({"t": t}))["t"]
    assert out.dtype == dtype and out.shape == t.shape and torch.equal(out.view(torch.uint8), t.view(torch.uint8))


def test_nested_tensors_and_empty_tensors():
    msg = {"a": {"b": [torch.arange(4), torch.zeros(0, 7)]}, "c": 1.5, "s": "x"}
    out = decode_frame(encode_frame(msg))
    assert torch.equal(out["a"]["b"][0], torch.arange(4)) and out["a"]["b"][1].shape == (0, 7)
    assert out["c"] == 1.5 and out["s"] == "x"


def test_non_contiguous_tensor_is_encoded_by_value():
    t = torch.randn(4, 6).t()
    assert torch.equal(decode_frame(encode_frame({"t": t}))["t"], t)


def frame(head: dict, payload: bytes = b"") -> bytes:
    h = cbor2.dumps(head)
    return len(h).to_bytes(4, "big") + h + payload


@pytest.mark.parametrize("bad, code", [
    (b"", "malformed"),
    (b"\x00\x00\x00\x09notcbor!!", "malformed"),
    (frame({"body": cbor2.dumps({"x": 1}), "tensors": [["float99", [2]]]}), "bad_dtype"),
    (frame({"body": cbor2.dumps({"x": 1}), "tensors": [["float32", [-1]]]}), "bad_shape"),
    (frame({"body": cbor2.dumps({"x": 1}), "tensors": [["float32", [4]]]}, b"\0" * 8), "bad_shape"),
    (frame({"body": cbor2.dumps({"x": 1})}, b"extra"), "malformed"),
    (frame({"body": cbor2.dumps(cbor2.CBORTag(27000, 5))}), "malformed"),
    (frame({"body": cbor2.dumps([1, 2])}), "malformed"),
    (frame({"nobody": 1}), "malformed"),
])
def test_malformed_frames_raise_protocol_error(bad, code):
    with pytest.raises(ProtocolError) as e:
        decode_frame(bad)
    assert e.value.code == code


def test_oversized_frame_is_refused_before_parsing():
    with pytest.raises(ProtocolError) as e:
        decode_frame(encode_frame({"t": torch.zeros(1000)}), max_bytes=1000)
    assert e.value.code == "too_large"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode_frame(data)
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_corrupted_valid_frames_raise_protocol_error_or_decode(noise, position):
    good = bytearray(encode_frame(message("fwd", job="j", rotation=0, step=0, mb=0, mode="train",
                                          x=torch.ones(2, 3), y=torch.zeros(2, dtype=torch.int64))))
    pos = position % len(good)
    good[pos:pos + len(noise)] = noise
    try:
        validate(decode_frame(bytes(good)))
    except ProtocolError:
        pass


def test_validate_version_type_and_fields():
    ok = message("hello", peer="p", ring="r")
    assert validate(ok) is ok
    with pytest.raises(ProtocolError, match="upgrade this agent"):
        validate({**ok, "v": PROTOCOL_VERSION + 1})
    with pytest.raises(ProtocolError, match="upgrade the sender"):
        validate({**ok, "v": 0})
    with pytest.raises(ProtocolError) as e:
        validate({**ok, "type": "launch_missiles"})
    assert e.value.code == "unknown_type"
    with pytest.raises(ProtocolError, match="missing field 'ring'"):
        validate(message("hello", peer="p"))
    with pytest.raises(ProtocolError, match="wrong type"):
        validate(message("hello", peer=3, ring="r"))
    with pytest.raises(ProtocolError, match=">= 0"):
        validate(message("job_pass", job="j", rotation=-1, mode="train"))
    with pytest.raises(ProtocolError):
        validate(message("hello", peer="p", ring="r"), expected_types={"fwd"})


def test_zero_dim_tensor_round_trips():
    t = torch.tensor(3.5)
    assert torch.equal(decode_frame(encode_frame({"t": t}))["t"], t)
