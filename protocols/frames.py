"""Frames: one CBOR header followed by raw tensor payloads.

Layout: 4-byte big-endian header length | CBOR header | payload 0 | payload 1 | ...
The header is {"tensors": [[dtype, shape], ...], "body": CBOR bytes}. Tensors anywhere inside the body
are replaced by CBOR tag TENSOR_TAG whose value is an index into `tensors` (payloads in order, raw
little-endian bytes, so a payload's length follows from its entry). A tensor packed for the wire
(protocols.compression) is tag PACKED_TAG over [codec, shape, [part tensors]] and is restored to float32
when the body is decoded. Encoding hands out views of the tensors' memory; decoding is `torch.frombuffer`
on a frame held in memory, or a stream reader receiving each payload into a tensor made from the table
(read_header, then assemble): no per-element Python work and no copy of the payloads.
"""
from __future__ import annotations

import math
import struct
import sys
import warnings

import cbor2
import torch

from protocols.compression import Packed, unpack
from protocols.errors import ProtocolError

TENSOR_TAG = 27000  # private tag: "tensor payload #n of this frame"
PACKED_TAG = 27001  # private tag: "a float32 tensor packed for the wire"
MAX_FRAME_BYTES = 1 << 30
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_NUMPY_DTYPES = {d for d in DTYPES.values() if d is not torch.bfloat16}
_LEN = struct.Struct(">I")

warnings.filterwarnings("ignore", message="The given buffer is not writable")

if sys.byteorder != "little":  # pragma: no cover - every supported device is little-endian
    raise ImportError("splitring's tensor codec assumes a little-endian host")


def byte_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (of a contiguous copy if it is not contiguous), without copying."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in _NUMPY_DTYPES:  # the short way (a few microseconds less a message)
        return memoryview(t.numpy()).cast("B")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode_parts(header: dict) -> list:
    """Encode a message whose values may include tensors or Packed tensors (at any depth).
    Returns [length prefix + CBOR header, payload, ...]; payloads are views of the tensors' memory."""
    table: list[list] = []
    payloads: list[memoryview] = []

    def default(encoder, value):
        if isinstance(value, Packed):
            encoder.encode(cbor2.CBORTag(PACKED_TAG, [value.codec, list(value.shape), list(value.parts)]))
            return
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"cannot encode {type(value).__name__}")
        if value.dtype not in DTYPE_NAMES:
            raise TypeError(f"unsupported tensor dtype {value.dtype}")
        table.append([DTYPE_NAMES[value.dtype], list(value.shape)])
        payloads.append(byte_view(value))
        encoder.encode(cbor2.CBORTag(TENSOR_TAG, len(table) - 1))

    body = cbor2.dumps(header, default=default)
    head = cbor2.dumps({"tensors": table, "body": body}) if table else cbor2.dumps({"body": body})
    return [_LEN.pack(len(head)) + head, *payloads]


def encode_frame(header: dict) -> bytes:
    """The whole frame as one bytes object (for HTTP bodies and small messages)."""
    return b"".join(encode_parts(header))


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
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
                and math.prod(d for d in shape if d) < 1 << 62):  # empty tensors too: strides must fit int64
            raise ProtocolError("bad_shape", f"bad tensor shape {shape!r}")
        dtype = DTYPES[name]
        out.append((dtype, tuple(shape), math.prod(shape) * dtype.itemsize))
    return out


def header_length(prefix) -> int:
    """The CBOR header's length from a frame's 4-byte prefix."""
    (hlen,) = _LEN.unpack_from(prefix)
    if not 0 < hlen <= MAX_HEADER_BYTES:
        raise ProtocolError("malformed", f"header length {hlen} is out of range")
    return hlen


def read_header(head) -> tuple[bytes, list[tuple[torch.dtype, tuple[int, ...], int]]]:
    """Parse a CBOR header: (body, [(dtype, shape, nbytes) per payload])."""
    try:
        head = cbor2.loads(head)
    except Exception as e:  # cbor2 raises several types on garbage
        raise ProtocolError("malformed", f"header is not valid CBOR: {e}") from None
    if not isinstance(head, dict) or not isinstance(head.get("body"), bytes):
        raise ProtocolError("malformed", "frame header must be a map with a byte-string body")
    return head["body"], _check_table(head.get("tensors", []))


def assemble(body: bytes, tensors: list[torch.Tensor]) -> dict:
    """The message a frame's body stands for, with its payload tensors in place and Packed tensors
    restored to float32."""
    def tag_hook(*args):  # cbor2 passes (tag, immutable) or (decoder, tag) depending on version
        tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
        if tag.tag == TENSOR_TAG:
            if not (isinstance(tag.value, int) and 0 <= tag.value < len(tensors)):
                raise ProtocolError("malformed", f"tensor reference {tag.value!r} out of range")
            return tensors[tag.value]
        if tag.tag == PACKED_TAG:
            if not (isinstance(tag.value, (list, tuple)) and len(tag.value) == 3):  # tuple: cbor2's immutable form
                raise ProtocolError("malformed", "a packed tensor is [codec, shape, parts]")
            return unpack(*tag.value)
        return tag

    try:
        body = cbor2.loads(body, tag_hook=tag_hook)
    except Exception as e:
        if isinstance(e.__cause__, ProtocolError):
            raise e.__cause__ from None
        raise ProtocolError("malformed", f"body is not valid CBOR: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("malformed", "message body must be a map")
    return body


def decode_frame(frame: bytes | bytearray | memoryview, max_bytes: int = MAX_FRAME_BYTES) -> dict:
    """Decode a whole frame held in memory. Tensors are views of it (read-only if it is bytes)."""
    view = memoryview(frame)
    if len(view) > max_bytes:
        raise ProtocolError("too_large", f"frame of {len(view)} bytes exceeds the limit of {max_bytes}")
    if len(view) < _LEN.size:
        raise ProtocolError("malformed", "frame shorter than its length prefix")
    hlen = header_length(view)
    if _LEN.size + hlen > len(view):
        raise ProtocolError("malformed", f"header length {hlen} does not fit the frame")
    body, table = read_header(view[_LEN.size:_LEN.size + hlen])
    offset = _LEN.size + hlen
    tensors = []
    for dtype, shape, nbytes in table:
        if offset + nbytes > len(view):
            raise ProtocolError("bad_shape", f"tensor of shape {list(shape)} needs {nbytes} bytes; frame is short")
        if nbytes:
            tensors.append(torch.frombuffer(view[offset:offset + nbytes], dtype=dtype).reshape(shape))
        else:
            tensors.append(torch.empty(shape, dtype=dtype))
        offset += nbytes
    if offset != len(view):
        raise ProtocolError("malformed", f"{len(view) - offset} trailing bytes after the last tensor")
    return assemble(body, tensors)
