import cbor2
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

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


FRAME_CODES = {"malformed", "bad_dtype", "bad_shape", "too_large"}   # what decode_frame refuses with


def decoded_or_refused(frame: bytes) -> dict | None:
    """The message a frame decodes to, else None after checking the refusal is a ProtocolError with a code
    and a message; a message that decodes re-encodes to a frame that decodes to the same bytes again."""
    try:
        msg = decode_frame(frame)
    except ProtocolError as e:
        assert e.code in FRAME_CODES and e.message, (e.code, e.message)
        return None
    assert isinstance(msg, dict)
    again = encode_frame(msg)
    assert encode_frame(decode_frame(again)) == again
    return msg


def raw_frame(body) -> bytes:
    head = cbor2.dumps({"body": cbor2.dumps(body)})
    return len(head).to_bytes(4, "big") + head


GOOD = message("fwd", job="j", rotation=0, step=0, mb=0, mode="train", x=torch.arange(6.0).reshape(2, 3),
               y=torch.tensor([3, 4]))


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
@example(encode_frame(GOOD))   # frames that decode, so that the round trip is exercised whatever is drawn
@example(raw_frame({"t": cbor2.CBORTag(99, [1]), "u": cbor2.undefined, "n": float("nan"), "s": {1, 2}}))
def test_random_bytes_decode_to_a_message_or_are_refused_with_a_code(data):
    msg = decoded_or_refused(data)
    if len(data) < 4 or not 0 < int.from_bytes(data[:4], "big") <= len(data) - 4:   # no whole header: nothing
        assert msg is None


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_a_corrupted_frame_is_refused_with_a_code_or_decodes_to_what_its_bytes_say(noise, position):
    """No checksum: bytes changed inside the tensor payloads decode, as those tensors' new values; bytes
    added after them are refused; a frame changed in its prefix or header is refused or decodes (see
    decoded_or_refused); an unchanged one is the message sent."""
    good = encode_frame(GOOD)
    header = 4 + int.from_bytes(good[:4], "big")
    pos = position % len(good)
    bad = bytearray(good)
    bad[pos:pos + len(noise)] = noise
    bad = bytes(bad)
    msg = decoded_or_refused(bad)
    fields = lambda m: {k: v for k, v in m.items() if k not in ("x", "y")}
    if bad == good:
        assert msg is not None and validate(msg) and fields(msg) == fields(GOOD)
        assert torch.equal(msg["x"], GOOD["x"]) and torch.equal(msg["y"], GOOD["y"])
    elif pos >= header and len(bad) == len(good):   # only payload bytes changed
        assert msg is not None and validate(msg) and fields(msg) == fields(GOOD)
        assert msg["x"].numpy().tobytes() + msg["y"].numpy().tobytes() == bad[header:]
    elif pos >= header:                             # the header is intact and promises fewer bytes
        assert msg is None


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
