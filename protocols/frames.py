"""Frames: one CBOR header followed by raw tensor payloads.

Layout: 4-byte big-endian header length | CBOR header | payload 0 | payload 1 | ...
Tensors anywhere inside the header's body are replaced by CBOR tag TENSOR_TAG whose value is an index
into the header's `tensors` table ([dtype, shape] per payload, payloads in order, little-endian).
Decoding is `torch.frombuffer` on a slice of the frame: no per-element Python work.
"""
from __future__ import annotations

import math
import struct
import sys

import warnings

import cbor2
import torch

from protocols.errors import ProtocolError

TENSOR_TAG = 27000  # private tag: "tensor payload #n of this frame"
MAX_FRAME_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_LEN = struct.Struct(">I")

warnings.filterwarnings("ignore", message="The given buffer is not writable")

if sys.byteorder != "little":  # pragma: no cover - every supported device is little-endian
    raise ImportError("splitring's tensor codec assumes a little-endian host")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_frame(header: dict) -> bytes:
    """Encode a message whose values may include torch tensors (at any depth)."""
    table: list[list] = []
    payloads: list[memoryview] = []

    def default(encoder, value):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot encode {type(value).__name__}")
        if value.dtype not in DTYPE_NAMES:
            raise TypeError(f"unsupported tensor dtype {value.dtype}")
        table.append([DTYPE_NAMES[value.dtype], list(value.shape)])
        payloads.append(_tensor_bytes(value))
        encoder.encode(cbor2.CBORTag(TENSOR_TAG, len(table) - 1))

    body = cbor2.dumps(header, default=default)
    head = cbor2.dumps({"tensors": table, "body": body}) if table else cbor2.dumps({"body": body})
    return b"".join([_LEN.pack(len(head)), head, *payloads])


def _check_table(table) -> list[tuple[torch.dtype, tuple[int, ...], int]]:
    if not isinstance(table, list):
        raise ProtocolError("malformed", "tensor table is not a list")
    out = []
    for entry in table:
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ProtocolError("malformed", "tensor table entry must be [dtype, shape]")
        name, shape = entry
        if name not in DTYPES:
            raise ProtocolError("bad_dtype", f"unknown tensor dtype {name!r}")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise ProtocolError("bad_shape", f"bad tensor shape {shape!r}")
        dtype = DTYPES[name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append((dtype, tuple(shape), nbytes))
    return out


def decode_frame(frame: bytes | bytearray | memoryview, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    """Decode a frame into its header dict, tensors restored. Raises ProtocolError on anything malformed."""
    view = memoryview(frame)
    if len(view) > max_bytes:
        raise ProtocolError("too_large", f"frame of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < _LEN.size:
        raise ProtocolError("malformed", "frame shorter than its length prefix")
    (hlen,) = _LEN.unpack_from(view)
    if hlen > MAX_HEADER_BYTES or _LEN.size + hlen > len(view):
        raise ProtocolError("malformed", f"header length {hlen} does not fit the frame")
    try:
        head = cbor2.loads(view[_LEN.size:_LEN.size + hlen])
    except Exception as e:  # cbor2 raises several types on garbage
        raise ProtocolError("malformed", f"header is not valid CBOR: {e}") from None
    if not isinstance(head, dict) or not isinstance(head.get("body"), bytes):
        raise ProtocolError("malformed", "frame header must be a map with a byte-string body")
    table = _check_table(head.get("tensors", []))
    offset = _LEN.size + hlen
    tensors = []
    for dtype, shape, nbytes in table:
        if offset + nbytes > len(view):
            raise ProtocolError("bad_shape", f"tensor of shape {list(shape)} needs {nbytes} bytes; frame is short")
        if nbytes:  # a view of the frame: read-only if the frame is bytes (copy before mutating)
            t = torch.frombuffer(view[offset:offset + nbytes], dtype=dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        tensors.append(t)
        offset += nbytes
    if offset != len(view):
        raise ProtocolError("malformed", f"{len(view) - offset} trailing bytes after the last tensor")

    def tag_hook(*args):  # cbor2 passes (tag, immutable) or (decoder, tag) depending on version
        tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
        if tag.tag != TENSOR_TAG:
            return tag
        if not (isinstance(tag.value, int) and 0 <= tag.value < len(tensors)):
            raise ProtocolError("malformed", f"tensor reference {tag.value!r} out of range")
        return tensors[tag.value]

    try:
        body = cbor2.loads(head["body"], tag_hook=tag_hook)
    except Exception as e:
        if isinstance(e.__cause__, ProtocolError):
            raise e.__cause__ from None
        raise ProtocolError("malformed", f"body is not valid CBOR: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "message body must be a map")
    return body
