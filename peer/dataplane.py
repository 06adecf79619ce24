"""The data plane: one long-lived outgoing WebSocket per neighbour, CBOR frames with raw tensors.

Each direction of a pair uses the sender's own connection (A dials B to send to B), so a socket only
ever carries data one way plus error replies the other. Large frames are encoded/decoded on a codec
thread so the event loop keeps answering control calls.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import torch

from protocols import ProtocolError, decode_frame, encode_frame, message, validate

log = logging.getLogger("splitring.dataplane")
OFFLOAD_BYTES = 1 << 20          # frames larger than this are (de)serialised off the event loop
MAX_WS_FRAME = 1 << 30


def tensor_bytes(obj) -> int:
    """Payload bytes of all tensors in a message, at any depth."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class Codec:
    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="codec")

    async def encode(self, msg: dict) -> bytes:
        if tensor_bytes(msg) > OFFLOAD_BYTES:
            return await asyncio.get_running_loop().run_in_executor(self.pool, encode_frame, msg)
        return encode_frame(msg)

    async def decode(self, frame: bytes, max_bytes: int) -> dict:
        if len(frame) > OFFLOAD_BYTES:
            return await asyncio.get_running_loop().run_in_executor(self.pool, decode_frame, frame, max_bytes)
        return decode_frame(frame, max_bytes)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class Link:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, peer: str):
        self.ws = ws
        self.peer = peer
        self.lock = asyncio.Lock()
        self.reader: asyncio.Task | None = None

    @property
    def closed(self) -> bool:
        return self.ws.closed


class Links:
    """Outgoing connections to other peers, opened on first use and kept."""

    def __init__(self, me: str, ring: str, session: aiohttp.ClientSession, codec: Codec):
        self.me, self.ring, self.session, self.codec = me, ring, session, codec
        self.links: dict[str, Link] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.errors: list[dict] = []  # error replies received (most recent last, bounded)

    async def _open(self, url: str) -> Link:
        ws = await self.session.ws_connect(f"{url}/ws", max_msg_size=MAX_WS_FRAME, heartbeat=20)
        await ws.send_bytes(encode_frame(message("hello", peer=self.me, ring=self.ring)))
        reply = await ws.receive(timeout=10)
        if reply.type != aiohttp.WSMsgType.BINARY:
            await ws.close()
            raise ConnectionError(f"{url}: no hello reply ({reply.type.name})")
        msg = validate(decode_frame(reply.data), {"hello", "error"})
        if msg["type"] == "error":
            await ws.close()
            raise ConnectionError(f"{url} refused the connection: {msg['message']}")
        link = Link(ws, msg["peer"])
        link.reader = asyncio.create_task(self._read_errors(link, url))
        return link

    async def _read_errors(self, link: Link, url: str):
        async for reply in link.ws:
            if reply.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                msg = validate(decode_frame(reply.data), {"error"})
            except ProtocolError as e:
                log.warning("unreadable reply from %s: %s", url, e)
                continue
            log.warning("peer %s rejected a message: %s", link.peer, msg["message"])
            self.errors = (self.errors + [msg])[-20:]

    async def get(self, url: str) -> Link:
        link = self.links.get(url)
        if link and not link.closed:
            return link
        lock = self._connecting.setdefault(url, asyncio.Lock())
        async with lock:
            link = self.links.get(url)
            if not link or link.closed:
                link = self.links[url] = await self._open(url)
        return link

    async def send(self, url: str, msg: dict) -> None:
        frame = await self.codec.encode(msg)
        link = await self.get(url)
        async with link.lock:
            await link.ws.send_bytes(frame)

    async def close(self):
        for link in self.links.values():
            if link.reader:
                link.reader.cancel()
            await link.ws.close()
        self.links.clear()


class Mailbox:
    """Messages of one job awaiting their receiver, keyed by (rotation, mode, step, kind, mb).
    A key is delivered at most once; duplicates and keys already consumed are refused."""

    def __init__(self):
        self.slots: dict[tuple, asyncio.Future] = {}
        self.consumed: set[tuple] = set()
        self.failure: Exception | None = None

    def _slot(self, key) -> asyncio.Future:
        fut = self.slots.get(key)
        if fut is None:
            fut = self.slots[key] = asyncio.get_running_loop().create_future()
        return fut

    def deliver(self, key: tuple, payload: dict) -> None:
        if key in self.consumed or (key in self.slots and self.slots[key].done()):
            raise ProtocolError("duplicate", f"duplicate message {key}")
        self._slot(key).set_result(payload)

    async def get(self, key: tuple, timeout: float) -> dict:
        if self.failure:
            raise self.failure
        fut = self._slot(key)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"waited {timeout:.0f}s for {key} from a neighbour") from None
        finally:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.slots.pop(key, None)
                self.consumed.add(key)

    def fail(self, exc: Exception) -> None:
        self.failure = exc
        for fut in self.slots.values():
            if not fut.done():
                fut.set_exception(exc)

    def new_rotation(self, rotation: int) -> None:
        """Forget what older rotations left behind."""
        self.slots = {k: f for k, f in self.slots.items() if k[0] >= rotation}
        self.consumed = {k for k in self.consumed if k[0] >= rotation}
