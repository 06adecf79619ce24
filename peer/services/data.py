"""The data plane's server side: GET /data (an HTTP upgrade to a stream of frames, peer.transport) and
GET /ws (the same messages in WebSocket frames, for tools that speak WebSocket); the handshake that proves
a sender belongs to the ring; then stage messages handed to `deliver(sender, msg)`, pings answered, sinks
dropped. And the data_probe call, which measures this plane to another agent."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
import torch
from aiohttp import web
from prometheus_client import Counter

from peer.dataplane import MAX_DATA_FRAME
from peer.limits import LIMITS
from peer.security import ServerHandshake
from peer.service import Service, json_error, serves
from peer.transport import UPGRADE, FrameStream, RawFrame, adopt
from protocols import ProtocolError, encode_frame, error_message, message, validate
from protocols.frames import encode_parts

log = logging.getLogger("splitring.data")
STAGE_MESSAGES = ("fwd", "bwd", "input", "weights", "lend", "return", "act", "grad")   # delivered to a job's stages


class DataService(Service):
    def __init__(self, node, deliver):
        """deliver(sender, msg): an awaitable taking a proven neighbour's stage message (it may wait for
        room: meanwhile this connection is not read) or raising ProtocolError."""
        super().__init__(node)
        self.deliver = deliver
        reg = node.registry
        self.m_messages = Counter("splitring_messages", "data-plane messages received", ["type"], registry=reg)
        self.m_bytes = Counter("splitring_received_bytes", "data-plane bytes received", registry=reg)
        self.sockets: set[web.WebSocketResponse] = set()  # incoming connections, closed on shutdown
        self.streams: set[FrameStream] = set()

    def other_routes(self):
        return [web.get("/data", self.data), web.get("/ws", self.ws)]

    async def close(self):
        for ws in list(self.sockets):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"agent shutting down")
        for stream in list(self.streams):
            stream.close()

    async def data(self, request):
        """The peers' data plane: an HTTP Upgrade to a stream of frames (peer.transport)."""
        if request.headers.get("Upgrade", "").lower() != UPGRADE:
            return json_error(426, "upgrade", f"the data plane needs 'Connection: Upgrade', 'Upgrade: {UPGRADE}'")
        resp = web.StreamResponse(status=101, headers={"Connection": "Upgrade", "Upgrade": UPGRADE})
        await resp.prepare(request)
        # from here on the connection is the stream's; aiohttp still hears when it ends
        stream = adopt(request.transport, FrameStream(MAX_DATA_FRAME, on_lost=request.protocol.connection_lost))
        self.streams.add(stream)

        async def frames():
            while (frame := await stream.recv()) is not None:
                yield frame
        try:
            await self.serve(request.remote, frames(), lambda msg: stream.send(encode_parts(msg)))
        except ConnectionError:
            pass
        finally:
            self.streams.discard(stream)
            stream.close()
        return resp

    async def ws(self, request):
        """The same data-plane messages in binary WebSocket frames, for tools that speak WebSocket."""
        ws = web.WebSocketResponse(max_msg_size=MAX_DATA_FRAME)
        await ws.prepare(request)
        self.sockets.add(ws)

        async def frames():
            async for frame in ws:
                binary = frame.type == aiohttp.WSMsgType.BINARY
                yield frame.data if binary else ProtocolError("malformed", "binary CBOR frames only")
        try:
            await self.serve(request.remote, frames(), lambda msg: ws.send_bytes(encode_frame(msg)))
        except ConnectionError:
            pass
        finally:
            self.sockets.discard(ws)
        return ws

    async def serve(self, remote, frames, reply):
        """One incoming data-plane connection: hello first, then stage messages, pings (each answered by a
        pong) and sinks (discarded: bandwidth tests).
        Anything wrong is answered with an error reply; nothing of a job is touched by a refused message."""
        node = self.node
        handshake = ServerHandshake(node.key, node.peer_id, node.ring, node.fingerprint)
        deadline = asyncio.timeout(LIMITS.handshake_s)   # lifted once the sender has proved itself
        try:
            async with deadline:
                await self._frames(remote, frames, reply, handshake, deadline)
        except TimeoutError:
            if not deadline.expired():
                raise
            node.m_rejected.labels("handshake_timeout").inc()
            log.warning("data plane: closed a connection from %s that did not finish its handshake in %.0f s",
                        remote, LIMITS.handshake_s)

    async def _frames(self, remote, frames, reply, handshake: ServerHandshake, deadline) -> None:
        sender = None
        counted = {}   # message type -> its counter (labels() costs a microsecond a message)
        async for frame in frames:
            msg = None
            try:
                if isinstance(frame, ProtocolError):
                    raise frame
                self.m_bytes.inc(frame.nbytes if isinstance(frame, RawFrame) else len(frame))
                msg = validate(await self.node.codec.decode(frame, MAX_DATA_FRAME))
                kind = msg["type"]
                (counted.get(kind) or counted.setdefault(kind, self.m_messages.labels(kind))).inc()
                if sender is None:
                    answer = handshake.step(msg)
                    sender = handshake.sender
                    if sender:
                        deadline.reschedule(None)   # a proven neighbour may stay connected
                    if answer:
                        await reply(answer)
                elif kind in STAGE_MESSAGES:
                    await self.deliver(sender, msg)
                elif kind == "ping":
                    await reply(message("pong", seq=msg["seq"]))
                elif kind == "sink":
                    pass
                else:
                    raise ProtocolError("unknown_type", f"{msg['type']!r} is not a data-plane message")
            except ProtocolError as e:
                self.node.m_rejected.labels(e.code).inc()
                log.warning("data plane: refused a message from %s: %s", sender or remote, e.message)
                ref = msg and {k: msg[k] for k in ("type", "job", "rotation", "step", "mb") if k in msg}
                await reply(error_message(e.code, e.message, ref))

    @serves("data_probe")
    async def data_probe(self, msg, request):
        """Measure the data plane to another agent: `count` tensors of `bytes` bytes streamed one way (with
        `copies`, a fresh copy each time), or with `round_trips`, `count` pings carrying them one after
        another. Returns the seconds taken."""
        count, size, links = msg["count"], msg["bytes"], self.node.links
        if not (1 <= count <= 100_000 and size <= MAX_DATA_FRAME // 2):
            raise ProtocolError("malformed", "data_probe: count from 1 to 100000, bytes up to 512 MiB")
        data = await asyncio.to_thread(torch.rand, size // 4)
        try:
            if msg.get("round_trips"):
                seconds = sum([await links.ping(msg["url"], data) for _ in range(count)])
            else:
                seconds = await links.stream(msg["url"], data, count, msg.get("copies", False))
        except (ConnectionError, OSError, TimeoutError) as e:
            return json_error(502, "unreachable", f"data_probe of {msg['url']} failed: {e!r}")
        return {"url": msg["url"], "bytes": size, "count": count, "seconds": seconds}
