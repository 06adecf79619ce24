"""The device agent: a node (peer.node) with its services mounted on one port: status, the data plane
(/data, /ws), job coordination (/jobs/*) and job work (/job/*). See docs/architecture.md."""
from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from peer.node import Node
from peer.services import CoordinationService, DashboardService, DataService, StatusService, WorkService

log = logging.getLogger("splitring.agent")


class Agent(Node):
    """A device's agent. Takes Node's arguments."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.work = WorkService(self)
        self.coordination = CoordinationService(self, self.work)
        self.mount(StatusService(self, self.work, self.coordination), DataService(self, self.work.deliver),
                   self.coordination, self.work, DashboardService(self, self.work, self.coordination))


async def serve(agent: Agent, ready=None) -> None:
    """Run until SIGINT/SIGTERM; then checkpoint, withdraw the mDNS record and close."""
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, agent.host, agent.port, ssl_context=agent.tls)
    await site.start()
    if agent.port == 0:
        agent.port = runner.addresses[0][1]
    await agent.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ready:
        ready(agent)
    await stop.wait()
    log.info("shutting down")
    await agent.close()
    await runner.cleanup()
