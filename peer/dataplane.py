"""The data plane: one long-lived outgoing stream per neighbour (peer.transport), CBOR frames with raw
tensors, wire dtypes by role (protocols.compression), bounded buffering at every step.

Each direction of a pair uses the sender's own connection (A dials B to send to B), so a connection only
ever carries data one way plus replies (hello, pong, error) the other. Payloads are never copied on the
way out and land in their tensors on the way in; the work that remains (packing and unpacking wire
dtypes, joining or splitting a large frame held whole for an HTTP body) runs on a codec thread, so the
event loop keeps answering control calls. See docs/transport.md.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import torch

from protocols import ProtocolError, decode_frame, encode_frame, message, validate
from protocols.compression import PART_DTYPES, WirePolicy, apply_policy
from protocols.frames import assemble, encode_parts
from pipeline.admission import MessageKey
from peer import faults
from peer.limits import LIMITS
from peer.security import ClientHandshake, Pins, RingAuthError
from peer.transport import RawFrame, connect

log = logging.getLogger("splitring.dataplane")
OFFLOAD_BYTES = 1 << 20          # whole frames (HTTP bodies) with more tensor bytes than this: off the loop
MAX_DATA_FRAME = LIMITS.max_frame
MAILBOX_LIMIT = LIMITS.pending_messages  # unread messages per job and kind before the data plane waits for room
EXACT = WirePolicy()


def tensor_bytes(obj) -> int:
    """Payload bytes of all tensors in a message, at any depth."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def wire_policy(cfg) -> WirePolicy:
    """The wire policy of a job (pipeline.config.JobConfig)."""
    return WirePolicy.from_options(cfg.wire_dtype, cfg.compress)


class Codec:
    def __init__(self):
        # one intra-op thread: idle OpenMP workers spinning beside the compute thread cost more than they give
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="codec", initializer=torch.set_num_threads,
                                       initargs=(1,))

    async def _run(self, offload: bool, fn, *args):
        if offload:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        return fn(*args)

    async def encode(self, msg: dict) -> bytes:
        """A whole frame as bytes (HTTP bodies: swaps, parameters). Always exact."""
        return await self._run(tensor_bytes(msg) > OFFLOAD_BYTES, encode_frame, msg)

    async def pack(self, msg: dict, policy: WirePolicy) -> dict:
        """The message with its role fields packed by a lossy `policy` (on the codec thread)."""
        return await self._run(True, apply_policy, msg, policy)

    async def decode(self, frame: bytes | RawFrame, max_bytes: int) -> dict:
        if isinstance(frame, RawFrame):  # payloads are in place already; only packed ones need work
            packed = any(t.dtype in PART_DTYPES for t in frame.tensors)
            return await self._run(packed, assemble, frame.body, frame.tensors)
        return await self._run(len(frame) > OFFLOAD_BYTES, decode_frame, frame, max_bytes)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


class Link:
    def __init__(self, stream, peer: str):
        self.stream = stream
        self.peer = peer
        self.pongs: dict[int, asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    @property
    def closed(self) -> bool:
        return self.stream.closed


class Links:
    """Outgoing connections to other peers, opened on first use and kept. `session` carries the
    HTTP calls that go with the data plane (swaps post layer state through it)."""

    def __init__(self, me: str, ring: str, session: aiohttp.ClientSession, codec: Codec, key: bytes | None = None,
                 pins: Pins | None = None):
        self.me, self.ring, self.session, self.codec = me, ring, session, codec
        self.key = key  # the ring key: both ends prove it before any data moves (peer.security)
        self.pins = pins or Pins()  # over TLS: the certificate each peer id authenticated with
        self.links: dict[str, Link] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._seq = itertools.count()
        self.errors: list[dict] = []  # error replies received (most recent last, bounded)
        self._replay: dict[tuple[str, str], list] = {}   # (url, message type) -> a frame to send again: peer.faults

    async def _open(self, url: str) -> Link:
        stream = await connect(url, MAX_DATA_FRAME)
        try:
            handshake = ClientHandshake(self.key, self.me, self.ring, stream.fingerprint)
            await stream.send(encode_parts(handshake.hello()))
            reply = await asyncio.wait_for(stream.recv(), 10)
            if not isinstance(reply, RawFrame):
                raise ConnectionError(f"{url}: no hello reply")
            msg = validate(await self.codec.decode(reply, MAX_DATA_FRAME), {"hello", "error"})
            if msg["type"] == "error":
                raise ConnectionError(f"{url} refused the connection: {msg['message']}")
            auth = handshake.finish(msg, url)
            try:
                self.pins.check_peer(msg["peer"], stream.fingerprint, url)
            except RingAuthError as e:
                log.warning("data plane: %s", e)
                raise
            if auth:
                await stream.send(encode_parts(auth))
        except BaseException:
            stream.close()
            raise
        link = Link(stream, msg["peer"])
        link.reader = asyncio.create_task(self._read_replies(link, url))
        return link

    async def _read_replies(self, link: Link, url: str):
        try:
            while (frame := await link.stream.recv()) is not None:
                try:
                    if isinstance(frame, ProtocolError):
                        raise frame
                    msg = validate(await self.codec.decode(frame, MAX_DATA_FRAME), {"error", "pong"})
                except ProtocolError as e:
                    log.warning("unreadable reply from %s: %s", url, e)
                    continue
                if msg["type"] == "pong":
                    fut = link.pongs.pop(msg["seq"], None)
                    if fut and not fut.done():
                        fut.set_result(None)
                    continue
                log.warning("peer %s rejected a message: %s", link.peer, msg["message"])
                self.errors = (self.errors + [msg])[-20:]
        finally:
            link.stream.close()
            for fut in link.pongs.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection to {url} closed"))

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

    async def send(self, url: str, msg: dict, policy: WirePolicy = EXACT) -> None:
        """Send a message; returns once it is handed to the connection (which holds a bounded amount)."""
        parts = encode_parts(await self.codec.pack(msg, policy) if policy.lossy else msg)
        link = self.links.get(url)
        if not link or link.closed:
            link = await self.get(url)
        if faults.FAULTS:
            await self._send_with_faults(link, url, msg["type"], parts)
        else:
            await link.stream.send(parts)

    async def _send_with_faults(self, link: Link, url: str, kind: str, parts: list) -> None:
        """send, with the test faults dup and replay (peer.faults)."""
        fault = faults.reach(f"send_{kind}")
        if (url, kind) in self._replay:
            await link.stream.send(self._replay.pop((url, kind)))
        await link.stream.send(parts)
        if fault == "dup":
            await link.stream.send(parts)
        elif fault == "replay":
            self._replay[url, kind] = parts

    async def ping(self, url: str, data: torch.Tensor | None = None, timeout: float = 60.0) -> float:
        """One round trip through the data plane (a ping carrying `data`, and its pong), in seconds."""
        link = await self.get(url)
        seq = next(self._seq)
        pong = link.pongs[seq] = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        await self.send(url, message("ping", seq=seq, **({} if data is None else {"data": data})))
        await asyncio.wait_for(pong, timeout)
        return time.perf_counter() - t0

    async def stream(self, url: str, data: torch.Tensor, count: int, copies: bool = False,
                     timeout: float = 60.0) -> float:
        """Send `data` `count` times (sink messages, discarded by the receiver), then a ping; returns the
        seconds until its pong, which the receiver sends after it has taken in every sink before it.
        With `copies`, every message carries a fresh copy, as training sends a new tensor every time."""
        await self.get(url)
        async with asyncio.timeout(timeout):
            t0 = time.perf_counter()
            for _ in range(count):
                tensor = await asyncio.to_thread(data.clone) if copies else data
                await self.send(url, message("sink", data=tensor))
            await self.ping(url)
            return time.perf_counter() - t0

    async def close(self):
        for link in self.links.values():
            if link.reader:
                link.reader.cancel()
            link.stream.close()
        self.links.clear()


class Mailbox:
    """Messages of one job awaiting their receiver, by MessageKey. A key is delivered at most once;
    duplicates and keys already consumed are refused. At most `limit` messages of each box (fwd@2,
    bwd@1...: one sender each) wait unread; the data plane awaits `room` before delivering, which
    pauses reading from that sender."""

    def __init__(self, limit: int = MAILBOX_LIMIT):
        if limit < 1:
            raise ValueError(f"a mailbox holds at least 1 message per box, not {limit}")
        self.limit = limit
        self.slots: dict[MessageKey, asyncio.Future] = {}
        self.consumed: set[MessageKey] = set()
        self.failure: Exception | None = None
        self._freed = asyncio.Event()
        self.peak_unread = 0   # most messages of one box that waited unread at once
        self.waits = 0         # deliveries that waited for room (reading from their sender paused)
        self.sizes: dict[MessageKey, int] = {}   # tensor bytes of each message waiting unread

    def _slot(self, key: MessageKey) -> asyncio.Future:
        fut = self.slots.get(key)
        if fut is None:
            fut = self.slots[key] = asyncio.get_running_loop().create_future()
        return fut

    def unread(self, box: str) -> int:
        return sum(1 for k, f in self.slots.items() if k.box == box and f.done())

    async def room(self, box: str) -> None:
        self.waits += self.failure is None and self.unread(box) >= self.limit
        while self.failure is None and self.unread(box) >= self.limit:
            self._freed.clear()
            await self._freed.wait()

    def deliver(self, key: MessageKey, payload: dict) -> None:
        if key in self.consumed or (key in self.slots and self.slots[key].done()):
            raise ProtocolError("duplicate", f"duplicate message {key}")
        unread = self.unread(key.box)
        if unread >= self.limit:
            raise ProtocolError("overflow", f"{self.limit} {key.box} messages already wait unread")
        self._slot(key).set_result(payload)
        self.peak_unread = max(self.peak_unread, unread + 1)
        self.sizes[key] = tensor_bytes(payload)

    @property
    def unread_bytes(self) -> int:
        """Memory a peer holds for its neighbours (counted against its budget): a few messages per box."""
        return sum(self.sizes.values())

    def ready(self, key: MessageKey) -> bool:
        """Whether get(key) would return at once."""
        fut = self.slots.get(key)
        return fut is not None and fut.done()

    async def get(self, key: MessageKey, timeout: float) -> dict:
        if self.failure:
            raise self.failure
        fut = self._slot(key)
        try:
            if not fut.done():
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            return fut.result()
        except asyncio.TimeoutError:
            raise TimeoutError(f"waited {timeout:.0f}s for {key} from a neighbour") from None
        finally:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.slots.pop(key, None)
                self.consumed.add(key)
                self.sizes.pop(key, None)
                self._freed.set()

    def fail(self, exc: Exception) -> None:
        self.failure = exc
        for fut in self.slots.values():
            if not fut.done():
                fut.set_exception(exc)
        self._freed.set()

    def new_rotation(self, rotation: int) -> None:
        """Forget what older rotations left behind."""
        self.slots = {k: f for k, f in self.slots.items() if k.rotation >= rotation}
        self.consumed = {k for k in self.consumed if k.rotation >= rotation}
        self.sizes = {k: n for k, n in self.sizes.items() if k in self.slots}
        self._freed.set()
