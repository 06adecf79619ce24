"""Wire dtypes per tensor role: how activations and gradients travel, and how they are restored.

Roles: "activation" (fwd `x`), "gradient" (bwd `grad`) and "state" (layer parameters and optimizer
state moved by swaps). Activations and gradients may travel as float32, bfloat16, float16 or int8
(blockwise absmax: one float32 scale per BLOCK values); state always travels exactly. Every field not
named in ROLES (labels, state, anything else) travels exactly. Pure functions over tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from protocols.errors import ProtocolError

WIRE_DTYPES = ("float32", "bfloat16", "float16")
COMPRESSIONS = ("none", "int8")
CODECS = WIRE_DTYPES + ("int8",)
BLOCK = 64                      # values per int8 scale: 8.5 bits per value on the wire
FLOAT16_MAX = 65504.0           # float16 saturates here rather than overflowing to inf
PART_DTYPES = (torch.bfloat16, torch.float16, torch.int8)  # what packed tensors travel as
ROLES = {"fwd": {"x": "activation"}, "bwd": {"grad": "gradient"}, "act": {"x": "activation"},
         "grad": {"grad": "gradient"}}  # message type -> field -> role


@dataclass(frozen=True)
class Packed:
    """A float32 tensor as it travels: the codec, its shape, and the wire tensors (`parts`)."""
    codec: str
    shape: tuple[int, ...]
    parts: tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class WirePolicy:
    """The codec of each lossy-capable role. Layer state has no knob: it is never lossy."""
    activation: str = "float32"
    gradient: str = "float32"

    def __post_init__(self):
        for role in ("activation", "gradient"):
            if getattr(self, role) not in CODECS:
                raise ValueError(f"unknown {role} codec {getattr(self, role)!r} ({', '.join(CODECS)})")

    @classmethod
    def from_options(cls, wire_dtype: str = "float32", compress: str = "none") -> "WirePolicy":
        """`--wire-dtype` and `--compress`: int8 compression takes precedence over the wire dtype."""
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {wire_dtype!r} ({', '.join(WIRE_DTYPES)})")
        if compress not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compress!r} ({', '.join(COMPRESSIONS)})")
        codec = "int8" if compress == "int8" else wire_dtype
        return cls(activation=codec, gradient=codec)

    @property
    def lossy(self) -> bool:
        return (self.activation, self.gradient) != ("float32", "float32")

    def codec(self, role: str) -> str:
        return {"activation": self.activation, "gradient": self.gradient}.get(role, "float32")


def apply_policy(msg: dict, policy: WirePolicy) -> dict:
    """A copy of msg whose role fields are packed by the policy's codec for their role."""
    fields = ROLES.get(msg.get("type"), {})
    return {k: pack(v, policy.codec(fields[k])) if k in fields and torch.is_tensor(v) else v
            for k, v in msg.items()}


def pack(t: torch.Tensor, codec: str) -> torch.Tensor | Packed:
    """Encode a float32 tensor with `codec`; other dtypes, and codec float32, travel as they are."""
    if codec == "float32" or t.dtype != torch.float32:
        return t
    flat = t.detach().reshape(-1)  # parts are 1-D; the shape travels beside them
    if codec == "bfloat16":
        return Packed(codec, tuple(t.shape), (flat.to(torch.bfloat16),))
    if codec == "float16":
        return Packed(codec, tuple(t.shape), (flat.clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16),))
    if codec == "int8":
        return Packed(codec, tuple(t.shape), quantize_int8(flat))
    raise ValueError(f"unknown codec {codec!r}")


def unpack(codec, shape, parts) -> torch.Tensor:
    """The float32 tensor a Packed stands for. Raises ProtocolError on anything inconsistent."""
    if codec not in CODECS[1:]:
        raise ProtocolError("bad_dtype", f"unknown wire codec {codec!r}")
    if not (isinstance(shape, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise ProtocolError("bad_shape", f"bad packed shape {shape!r}")
    n = math.prod(shape)
    want = [(torch.int8, n), (torch.float32, -(-n // BLOCK))] if codec == "int8" else [(getattr(torch, codec), n)]
    if not (isinstance(parts, (list, tuple)) and len(parts) == len(want) and all(
            torch.is_tensor(p) and p.dtype == d and p.dim() == 1 and p.numel() == k
            for p, (d, k) in zip(parts, want))):
        raise ProtocolError("bad_shape", f"{codec} tensor of shape {shape}: parts do not match")
    if codec == "int8":
        return dequantize_int8(parts[0], parts[1], tuple(shape))
    return parts[0].to(torch.float32).reshape(shape)


def quantize_int8(t: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax: per block of `block` values, scale = max|x| / 127, q = round(x / scale).
    Returns (q: int8 [n], scales: float32 [ceil(n / block)]); |x - q * scale| <= scale / 2."""
    flat = t.reshape(-1)
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % block)).view(-1, block)
    scales = blocks.abs().amax(1) / 127
    q = torch.round(blocks / torch.where(scales > 0, scales, 1)[:, None]).to(torch.int8)
    return q.view(-1)[:n], scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, shape: tuple[int, ...], block: int = BLOCK) -> torch.Tensor:
    n = q.numel()
    blocks = F.pad(q.to(torch.float32), (0, -n % block)).view(-1, block)
    return blocks.mul_(scales[:, None]).view(-1)[:n].reshape(shape)
