"""The data-plane stream: an HTTP Upgrade to UPGRADE on the agent's own port, then frames both ways.

The client sends `GET /data` with `Upgrade: splitring-data/1`, waits for `101 Switching Protocols`, and
from then on the TCP connection carries protocols.frames frames back to back (a payload's length follows
from its header entry, so no other framing is needed).
Writing: the header and views of the payloads' memory, never copied. Frames under COALESCE bytes sent in
one turn of the event loop go out together at its end (one writev: one system call, one wake-up of the
reader); larger ones in writes of at most CHUNK bytes (each one writelines: one writev under uvloop, which
the agents run), waiting while the transport holds more than WRITE_HIGH bytes: a receiver that stops
reading stops the sender there.
Reading (asyncio.BufferedProtocol): headers and small payloads are read ahead, up to READ_MAX bytes at a
time, and parsed or copied from there; the rest of a large payload is read straight into its tensor (from
a pool of reused buffers, peer.buffers). Whole frames wait for the consumer in a queue, and reading pauses
while that queue holds RECV_HIGH bytes or more, which stops the sender through TCP flow control.
"""
from __future__ import annotations

import asyncio
import socket
import sys
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import torch

from peer.buffers import BufferPool
from peer.security import client_tls, presented
from protocols import ProtocolError
from protocols.frames import MAX_FRAME_BYTES, header_length, read_header

UPGRADE = "splitring-data/1"
PATH = "/data"
RECV_POOL = BufferPool()  # where received payloads land (one pool per process)
COALESCE = 1 << 20        # frames smaller than this sent in one turn of the event loop are written together
CHUNK = 4 << 20          # bytes per transport write (a view of the tensor: the transport copies nothing)
WRITE_HIGH = 16 << 20    # a sender waits while its transport holds more than this
READ_MAX = 256 << 10     # bytes per socket read: pieces this small are copied while still in cache (measured)
DIRECT = 64 << 10        # a payload with this much left to read is read straight into its tensor
LARGE_HEAD = 4 << 10     # bytes read ahead at the start of a frame that follows one of READ_MAX or more
RECV_HIGH = 16 << 20     # a receiver stops reading while this much of whole frames awaits its consumer
KEEPALIVE_S = 30         # idle connections are probed; one silent this long is closed


@dataclass
class RawFrame:
    """A frame received whole: its CBOR body and payload tensors, to be put together by frames.assemble."""
    body: bytes
    tensors: list[torch.Tensor]
    nbytes: int


class FrameStream(asyncio.BufferedProtocol):
    """One data-plane connection. `send` writes a frame; `recv` returns the next RawFrame, a ProtocolError
    that broke the stream (nothing follows it), or None once the connection is closed."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES, on_lost=None):
        self.max_frame, self.on_lost = max_frame, on_lost
        self.transport: asyncio.Transport | None = None
        self.fingerprint = ""            # over TLS (dialling end): the certificate the other end presented
        self.lost = False
        self.queued = 0                  # bytes of whole frames waiting for recv()
        self._frames: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._paused = self._broken = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._send_lock = asyncio.Lock()
        self._pending: list = []  # parts of small frames to write at the end of this turn of the loop
        self._pending_bytes, self._flush_soon = 0, False
        self._frame: RawFrame | None = None
        self._views: deque = deque()
        self._ahead = memoryview(bytearray(READ_MAX))
        self._head_read = READ_MAX
        self._direct = False
        self._prefix = memoryview(bytearray(4))   # reused: every frame starts with one
        self._sock, self._lowat = None, 1
        self._next_frame()

    # --- connection ---------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)
        sock = transport.get_extra_info("socket")
        # the low-water mark needs every byte still due to come through this socket: not so over TLS, whose
        # layer may already hold some; and Linux (4.19 on) is where a mark above the buffer cannot stall
        plain = transport.get_extra_info("sslcontext") is None and sys.platform == "linux"
        self._sock = sock if plain else None
        if sock is not None:
            # small replies go out at once; socket buffers stay autotuned (fixed sizes measured slower)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # a peer that vanished (power off, cable out) is noticed in about KEEPALIVE_S even when idle
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's defaults apply
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_S // 2)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_S // 6)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._wake()
        self._writable.set()  # a blocked sender wakes up to find the connection gone
        if self.on_lost:
            self.on_lost(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    @property
    def closed(self) -> bool:
        return self.lost or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport:
            self._flush()
            self.transport.close()

    # --- reading ------------------------------------------------------------------------------
    def _expect(self, buf, then) -> None:
        self._target, self._pos, self._then = memoryview(buf).cast("B"), 0, then

    def get_buffer(self, sizehint: int) -> memoryview:
        # a large payload's rest: the kernel copies straight into the tensor; anything else (prefixes,
        # headers, small payloads, the start of the next frame) is read ahead into `_ahead` and copied out
        # while in cache: one read for many small frames instead of three for each
        left = len(self._target) - self._pos
        self._direct = left >= DIRECT
        if self._direct:
            self._set_lowat(min(left, READ_MAX))   # back at 1 once less than DIRECT is due (buffer_updated)
            return self._target[self._pos:self._pos + READ_MAX]
        return self._ahead[:self._head_read] if self._target is self._prefix and not self._pos else self._ahead

    def _set_lowat(self, n: int) -> None:
        """Wake the reader only once `n` bytes are there (SO_RCVLOWAT): set to what is certainly still due of a
        large payload, so that its rest arrives in one read and one wake-up instead of many partial ones
        (measured: 1-16 MiB tensors 9-15% faster); back at 1 byte anywhere else."""
        if n != self._lowat and self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
            self._lowat = n

    def buffer_updated(self, nbytes: int) -> None:
        try:
            if self._direct:
                self._pos += nbytes
                left = len(self._target) - self._pos
                self._set_lowat(min(left, READ_MAX) if left >= DIRECT else 1)
                if not left:
                    self._then()
                return
            data = self._ahead[:nbytes]
            while data:
                if self._target is self._prefix and not self._pos and len(data) > 4:
                    end = 4 + header_length(data)
                    if len(data) >= end:   # a whole header read ahead: parse it where it lies
                        head, data = data[4:end], data[end:]
                        self._got_header(head)
                        continue
                take = min(len(data), len(self._target) - self._pos)
                self._target[self._pos:self._pos + take] = data[:take]
                self._pos += take
                data = data[take:]
                if self._pos == len(self._target):
                    self._then()
        except ProtocolError as e:  # the stream cannot be resynchronised: the consumer replies and closes
            self._broken = True
            self._pause()
            self._push(e, 0)

    def _got_prefix(self) -> None:
        self._expect(bytearray(header_length(self._target)), self._got_header)

    def _got_header(self, head=None) -> None:
        head = self._target if head is None else head
        body, table = read_header(head)
        size = 4 + len(head) + sum(nbytes for _, _, nbytes in table)
        if size > self.max_frame:
            raise ProtocolError("too_large", f"frame of {size} bytes exceeds the limit of {self.max_frame}")
        tensors, self._views = [], deque()
        # after a frame of READ_MAX or more, read the next header on its own: its payload is likely large
        # too, and is then read straight into its tensor instead of through `_ahead`
        self._head_read = LARGE_HEAD if size >= READ_MAX else READ_MAX
        for dtype, shape, nbytes in table:
            if nbytes >= READ_MAX:   # pooled: fresh pages of a large buffer cost as much as the copy
                t, view = RECV_POOL.tensor(dtype, shape, nbytes)
            elif nbytes:             # small: the allocator's own free lists are quicker than the pool
                view = bytearray(nbytes)
                t = torch.frombuffer(view, dtype=dtype).view(shape)
            else:
                t = torch.empty(shape, dtype=dtype)
            if nbytes:
                self._views.append(view)
            tensors.append(t)
        self._frame = RawFrame(body, tensors, size)
        self._next_payload()

    def _next_payload(self) -> None:
        if self._views:
            self._expect(self._views.popleft(), self._next_payload)
            return
        frame, self._frame = self._frame, None
        self._next_frame()
        self._push(frame, frame.nbytes)

    def _next_frame(self) -> None:
        self._target, self._pos, self._then = self._prefix, 0, self._got_prefix

    def _push(self, item, nbytes: int) -> None:
        self._frames.append(item)
        self.queued += nbytes
        if self.queued >= RECV_HIGH:
            self._pause()
        self._wake()

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> RawFrame | ProtocolError | None:
        while not self._frames:
            if self.lost or self._broken:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        item = self._frames.popleft()
        if isinstance(item, RawFrame):
            self.queued -= item.nbytes
        if self._paused and not self._broken and self.queued < RECV_HIGH and not self.lost:
            self._paused = False
            self.transport.resume_reading()
        return item

    # --- writing ------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def send(self, parts: list) -> None:
        """Write one frame (protocols.frames.encode_parts). Returns once all of it is handed to the
        transport (or queued for the end of this turn of the loop), whose buffer may still reference the
        last WRITE_HIGH bytes of the tensors: a sender must not change a tensor it has sent."""
        size = sum(len(p) for p in parts)
        if size < COALESCE and self._writable.is_set() and not self._send_lock.locked():
            self._coalesce(parts, size)   # nothing to wait for: no awaits
            return
        async with self._send_lock:
            self._flush()   # frames queued before this one go first
            batch, room = [], CHUNK   # views of up to CHUNK bytes per writelines (uvloop: one writev)
            for part in parts:
                view = memoryview(part).cast("B")
                while view:
                    piece, view = view[:room], view[room:]
                    batch.append(piece)
                    room -= len(piece)
                    if not room:
                        await self._write_when_ready(batch)
                        batch, room = [], CHUNK
            if batch:
                await self._write_when_ready(batch)

    def _coalesce(self, parts: list, size: int) -> None:
        """Queue a frame smaller than COALESCE to go out with the others sent in this turn of the event
        loop: one write (one system call, one wake-up of the reader) for them all. The queue is written at
        the end of the turn, before anything that waits (a computation awaits too), or as soon as it holds
        COALESCE bytes."""
        self._check_open()
        self._pending += parts
        self._pending_bytes += size
        if self._pending_bytes >= COALESCE:
            self._flush()
        elif not self._flush_soon:
            self._flush_soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            if not self.closed:   # else lost with the connection, as the transport's own buffer would be
                self.transport.writelines(pending)

    async def _write_when_ready(self, batch: list) -> None:
        await self._writable.wait()
        self._check_open()
        self.transport.writelines(batch)

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionError("the data-plane connection is closed")


def adopt(transport, stream: FrameStream) -> FrameStream:
    """Hand an open connection (after the Upgrade exchange) to a FrameStream."""
    transport.set_protocol(stream)
    stream.connection_made(transport)
    return stream


class _UpgradeReply(asyncio.Protocol):
    """Collects the server's answer to the Upgrade request (it sends nothing more before our hello)."""

    def __init__(self):
        self.head = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head and not self.done.done():
            self.done.set_result(bytes(self.head))

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection closed during the upgrade ({exc!r})"))


async def connect(url: str, max_frame: int = MAX_FRAME_BYTES, timeout: float = 10.0) -> FrameStream:
    """Open a data-plane stream to the agent at `url` (http://host:port, or https:// for TLS: the stream's
    `fingerprint` is then the agent's certificate, for the caller to authenticate)."""
    u = urlsplit(url)
    tls = {"ssl": client_tls(), "server_hostname": u.hostname} if u.scheme == "https" else {}
    transport, reply = await asyncio.wait_for(
        asyncio.get_running_loop().create_connection(_UpgradeReply, u.hostname, u.port, **tls), timeout)
    transport.write(f"GET {PATH} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
                    f"Upgrade: {UPGRADE}\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reply.done, timeout)
    except (ConnectionError, asyncio.TimeoutError) as e:
        transport.close()
        raise ConnectionError(f"{url}: no answer to the data-plane upgrade ({e!r})") from None
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if status.split()[1:2] != ["101"] or not head.endswith(b"\r\n\r\n"):
        transport.close()
        raise ConnectionError(f"{url} did not switch to the data plane: {status}")
    stream = adopt(transport, FrameStream(max_frame))
    if tls:
        stream.fingerprint = presented(transport)
    return stream
