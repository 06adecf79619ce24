"""What a coordinator asks of other peers, and nothing more: the narrow interface between job
coordination and the network (a fake ring implements the same methods in tests)."""
from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator

import aiohttp

from peer.dataplane import Codec
from protocols import ProtocolError, SplitringError, message
from protocols.calls import CALLS, check_event, check_reply

CBOR = {"Content-Type": "application/cbor"}


class JobError(SplitringError, RuntimeError):
    """A job cannot go on; the message says why (it reaches the CLI)."""


class Unanswered(JobError):
    """A peer did not answer a call in time, or its connection broke: it may be hung, stopped or gone."""


class PeerClient:
    """Control-plane calls to peers ({"peer": id, "url": url} dicts) over the agent's signed session."""

    def __init__(self, session: aiohttp.ClientSession, codec: Codec):
        self.session, self.codec = session, codec

    async def status(self, peer: dict, timeout: float = 5) -> dict | None:
        """A peer's /status, or None if it does not answer as itself within `timeout` seconds."""
        try:
            st = await self.call(peer, "status", timeout=timeout)
        except JobError:
            return None
        return st if st["peer"] == peer["peer"] else None

    async def call(self, peer: dict, name: str, *, timeout: float | None = 60, params: dict | None = None,
                   **fields) -> dict:
        """Make the declared call `name` (protocols.calls) with these request fields (and route params, e.g.
        {"job": id}); its checked reply, or JobError naming the peer and what it said."""
        call = CALLS[name]
        body = await self.codec.encode(message(call.request, **fields)) if call.request else None
        path = call.url_path(**(params or {}))
        try:
            async with self.session.request(call.method, peer["url"] + path, data=body, headers=CBOR,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                reply = await r.json()
        except (aiohttp.ContentTypeError, ValueError):
            raise JobError(f"peer {peer['peer']} answered {path} with HTTP {r.status} and no explanation") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise Unanswered(f"peer {peer['peer']} at {peer['url']} did not answer {path}: {e!r}") from None
        if r.status != 200:
            raise JobError(f"peer {peer['peer']} refused {path}: {reply.get('message', reply)}")
        try:
            return check_reply(call, reply)
        except ProtocolError as e:
            raise JobError(f"peer {peer['peer']}: {e.message}") from None

    async def stream(self, peer: dict, name: str, params: dict | None = None, **fields) -> AsyncIterator[dict]:
        """Make the declared streaming call `name` and yield its checked events (no deadline: a pass takes
        what it takes; the coordinator's heartbeats watch the peer meanwhile; failures are reported in the
        stream, or break it). A refusal yields one error."""
        call = CALLS[name]
        body = await self.codec.encode(message(call.request, **fields)) if call.request else None
        url = peer["url"] + call.url_path(**(params or {}))
        async with self.session.request(call.method, url, data=body, headers=CBOR,
                                        timeout=aiohttp.ClientTimeout(total=None)) as r:
            if r.status != 200:
                yield {"error": f"refused {call.path}: {(await r.json()).get('message')}", "cause": "job"}
                return
            async for line in r.content:
                try:
                    yield check_event(call, json.loads(line))
                except (ProtocolError, ValueError) as e:
                    yield {"error": f"sent a malformed event: {e}", "cause": "job"}
                    return

    async def probe_link(self, peer: dict, size: int = 1 << 21) -> tuple[float, float]:
        """(bytes/s, one-way seconds) between this agent and a peer: a small and a 2 MiB POST."""
        times = []
        for n in (1, size):
            t0 = time.perf_counter()
            async with self.session.post(peer["url"] + "/probe", data=b"\0" * n) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
        return size / max(times[1] - times[0], 1e-6), times[0] / 2

    async def part(self, peer: dict, job: str, timeout: float = 600) -> dict:
        """A client/helper job's part of a peer, with the samples it trained this round: {"layers", "samples"}."""
        async with self.session.get(f"{peer['url']}/job/{job}/part", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                raise JobError(f"could not collect the part of {peer['peer']}: HTTP {r.status}")
            return await self.codec.decode(await r.read(), 1 << 34)

    async def layers(self, peer: dict, job: str) -> dict:
        """The layers a peer holds for a job: {index: {name: tensor}}."""
        async with self.session.get(f"{peer['url']}/job/{job}/params") as r:
            if r.status != 200:
                raise JobError(f"could not collect layers from {peer['peer']}")
            return (await self.codec.decode(await r.read(), 1 << 34))["layers"]
