"""What every service of an agent shares: its identity (peer id, ring, keys), its state dir and data,
the signed client session and codec, the compute thread, discovery, metrics and limits. A node mounts
services (peer.service.Service) on one aiohttp application; the services talk to each other only through
the methods they offer, never through each other's attributes."""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import torch
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from peer.client import PeerClient
from peer.dataplane import Codec, Links
from peer.discovery import Discovery
from peer.limits import LIMITS, check_job
from peer.security import Guard, Pins, client_session
from peer.state import StateDir
from pipeline.config import JobConfig
from pipeline.data import Dataset

log = logging.getLogger("splitring.node")


class Node:
    def __init__(self, ring: str, state: StateDir, data: Dataset, host: str, port: int, interface: str | None,
                 advertise: str, join: list[str], threads: int = 1, memory_budget: int | None = None,
                 slowdown: float = 1.0, key: bytes | None = None, tls: tuple[ssl.SSLContext, str] | None = None,
                 busy_poll: bool = False, allow_models: list[str] = (), role: str | None = None,
                 pending_messages: int = LIMITS.pending_messages):
        self.ring, self.state, self.data = ring, state, data
        self.peer_id = state.peer_id
        self.key = key  # the ring key (peer.security.key_for); None: an open ring
        # TLS (peer.security.server_tls): the server's context and its certificate's fingerprint; None: plain
        self.tls, self.fingerprint = tls or (None, "")
        self.guard = Guard(key, fingerprint=self.fingerprint)
        self.pins = Pins()
        self.host, self.port, self.interface, self.advertise, self.join = host, port, interface, advertise, join
        self.memory_budget = memory_budget
        self.role = role or ("client" if len(data) else "helper")   # in client/helper schemes
        self.allow_models = list(allow_models)   # custom model code this agent's owner allows (--allow-model)
        self.max_control_body = LIMITS.max_control_body
        self.pending_messages = pending_messages   # unread stage messages per job and kind (peer.dataplane.Mailbox)
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="compute", initializer=torch.set_num_threads,
                                          initargs=(threads,))
        self.slowdown = slowdown  # test knob: compute takes this many times longer (a slower device)
        self._fastest: dict[tuple, float] = {}   # (function, shapes) -> fastest seconds seen (see stretch)
        # compute on the event loop's thread, and keep the loop polling while a pass runs (see --busy-poll)
        self.busy_poll = busy_poll
        if busy_poll:   # intra-op threads are set per thread: this one computes then
            torch.set_num_threads(threads)
        self.codec = Codec()
        self.registry = CollectorRegistry()
        self.m_rejected = Counter("splitring_rejected", "messages refused", ["code"], registry=self.registry)
        self.session: aiohttp.ClientSession | None = None
        self.links: Links | None = None
        self.discovery: Discovery | None = None
        self.services: list = []

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.advertise}:{self.port}"

    def me(self) -> dict:
        return {"peer": self.peer_id, "url": self.url, "memory_budget": self.memory_budget, "role": self.role,
                "samples": len(self.data)}

    def client(self) -> PeerClient:
        return PeerClient(self.session, self.codec)

    def job_config(self, config) -> JobConfig:
        """A job's config from a request, refused unless every value is within this agent's limits and its
        model is built in or allowed by the owner: checked before any import or allocation."""
        cfg = JobConfig.from_dict(config)
        check_job(cfg, self.allow_models)
        return cfg

    async def compute_call(self, fn, *args):
        """Run fn on the compute thread, or with busy_poll here, after the loop has seen to what is ready
        (a slowdown > 1 stretches it, as a slower device would: see stretch)."""
        def timed():
            t0 = time.perf_counter()
            out = fn(*args)
            if self.slowdown > 1:
                time.sleep(self.stretch(fn, args, time.perf_counter() - t0))
            return out
        if self.busy_poll:
            await asyncio.sleep(0)
            return timed()
        return await asyncio.get_running_loop().run_in_executor(self.compute, timed)

    def stretch(self, fn, args, took: float) -> float:
        """How long to sleep after a computation so that it lasts `slowdown` times its fastest run on this
        machine (per function and tensor shapes): a slower device, steady as one would be, not this host's
        noise multiplied (which a profile's best-of-repeats would not predict)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + \
            [v for a in args if isinstance(a, dict) for v in a.values() if isinstance(v, torch.Tensor)]
        key = (getattr(fn, "__qualname__", repr(fn)), tuple(tuple(t.shape) for t in tensors))
        best = self._fastest[key] = min(self._fastest.get(key, took), took)
        return max(0.0, self.slowdown * best - took)

    # --- lifecycle ----------------------------------------------------------------------------
    def mount(self, *services) -> None:
        self.services += services

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_control_body, middlewares=[self.guard.middleware])
        app.on_response_prepare.append(self.guard.sign)
        for service in self.services:
            app.add_routes(service.routes())
        return app

    async def start(self):
        if self.key is None:
            log.warning("no ring secret: anyone who can reach this agent can join ring %r, read its status and "
                        "start or stop jobs (give --secret-file)", self.ring)
        self.session = client_session(self.key, self.pins)
        self.links = Links(self.peer_id, self.ring, self.session, self.codec, self.key, self.pins)
        self.discovery = Discovery(self.ring, self.peer_id, self.port, self.interface, self.advertise, self.join,
                                   key=self.key, tls=self.tls is not None, pins=self.pins)
        await self.discovery.start()
        for service in self.services:
            await service.start()

    async def close(self):
        for service in self.services:
            await service.close()
        if self.discovery:
            await self.discovery.close()
        if self.links:
            await self.links.close()
        if self.session:
            await self.session.close()
        self.codec.close()
        self.compute.shutdown(wait=False, cancel_futures=True)
        self.state.close()
