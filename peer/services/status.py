"""GET /status (public facts to anyone, the rest to ring members) and GET /metrics (Prometheus)."""
from __future__ import annotations

from aiohttp import web
from prometheus_client import Gauge, generate_latest

from peer.service import Service, serves
from pipeline.config import SCHEMES
from protocols import PROTOCOL_VERSION

CAPABILITIES = list(SCHEMES)   # the schemes this agent runs


class StatusService(Service):
    def __init__(self, node, work, coordination):
        super().__init__(node)
        self.work, self.coordination = work, coordination
        self.m_peers = Gauge("splitring_peers_seen", "peers of the ring seen", registry=node.registry)

    def other_routes(self):
        return [web.get("/metrics", self.metrics)]

    @serves("status")
    async def status(self, msg, request):
        node = self.node
        public = {"peer": node.peer_id, "ring": node.ring, "version": PROTOCOL_VERSION, "capabilities": CAPABILITIES}
        if not node.guard.member(request):
            return {**public, "private": "sign the request with the ring secret to see more"}
        return {
            **public,
            "url": node.url, "interface": node.interface, "instance": node.discovery.instance,
            **node.discovery.public(),   # peers, conflicts, missing
            "data": {"name": node.data.name, "samples": len(node.data), "test_samples": node.data.n_test},
            "memory_budget": node.memory_budget,
            "pending_messages": node.pending_messages,
            "role": node.role,
            "allowed_models": node.allow_models,
            "busy_poll": node.busy_poll,
            **self.work.status(),           # stages, peak_memory_bytes
            "jobs": self.coordination.status(),
        }

    async def metrics(self, request):
        self.m_peers.set(len(self.node.discovery.peers()))
        return web.Response(body=generate_latest(self.node.registry), content_type="text/plain")
