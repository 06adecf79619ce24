"""What crosses the wire: versioned CBOR messages with raw tensor payloads.

Imports nothing of ours, and neither aiohttp nor model code.
"""
from protocols.errors import ProtocolError, SplitringError
from protocols.frames import decode_frame, encode_frame
from protocols.messages import PROTOCOL_VERSION, error_message, message, validate

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "SplitringError", "decode_frame", "encode_frame", "error_message", "message", "validate"]
