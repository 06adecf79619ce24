"""Who is in the ring: mDNS (python-zeroconf) on one chosen interface, plus known peers (--join)
polled over HTTP where multicast does not reach."""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

import aiohttp
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.security import Pins, RingAuthError, client_session
from protocols import PROTOCOL_VERSION

SERVICE = "_splitring._tcp.local."
log = logging.getLogger("splitring.discovery")


@dataclass
class PeerRecord:
    peer: str
    url: str
    ring: str
    version: int
    source: str                 # "mdns" | "join"
    last_seen: float = field(default_factory=time.monotonic)

    def public(self) -> dict:
        return {"peer": self.peer, "url": self.url, "version": self.version, "source": self.source,
                "seen_s_ago": round(time.monotonic() - self.last_seen, 1)}


def txt(ring: str, peer: str, port: int, tls: bool = False) -> dict[str, str]:
    return {"ring": ring, "peer": peer, "v": str(PROTOCOL_VERSION), "port": str(port), "caps": "nsplit",
            **({"tls": "1"} if tls else {})}


def record_from_info(info: AsyncServiceInfo) -> PeerRecord | None:
    props = {k.decode(): (v.decode() if v is not None else "") for k, v in info.properties.items()}
    addrs = info.parsed_addresses(IPVersion.V4Only)
    if not addrs or "peer" not in props or "ring" not in props:
        return None
    try:
        version = int(props.get("v", "0"))
    except ValueError:
        version = 0
    scheme = "https" if props.get("tls") == "1" else "http"
    return PeerRecord(props["peer"], f"{scheme}://{addrs[0]}:{info.port}", props["ring"], version, "mdns")


class Browser:
    """Watches mDNS for splitring services; calls on_change(name, record|None)."""

    def __init__(self, interface: str, on_change):
        self.interface = interface
        self.on_change = on_change
        self.zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, zc: AsyncZeroconf | None = None) -> AsyncZeroconf:
        self.zc = zc or AsyncZeroconf(interfaces=[self.interface], ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE, handlers=[self._on_state])
        return self.zc

    def _on_state(self, zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            self.on_change(name, None)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str):
        info = AsyncServiceInfo(service_type, name)
        if await info.async_request(self.zc.zeroconf, 3000):
            rec = record_from_info(info)
            if rec:
                self.on_change(name, rec)

    async def close(self, close_zc: bool = True):
        for t in list(self._tasks):
            t.cancel()
        if self._browser:
            await self._browser.async_cancel()
        if close_zc and self.zc:
            await self.zc.async_close()


class Discovery:
    """This agent's advertisement and its view of the ring."""

    def __init__(self, ring: str, peer: str, port: int, interface: str | None, advertise: str,
                 join: list[str], poll_interval: float = 1.0, drop_after: float = 5.0, key: bytes | None = None,
                 tls: bool = False, pins: Pins | None = None):
        self.ring, self.peer, self.port = ring, peer, port
        self.interface = interface  # None: no mDNS at all (known peers only)
        self.advertise = advertise
        self.join = join
        self.poll_interval, self.drop_after = poll_interval, drop_after
        self.key = key                              # the ring key: peers must prove it (peer.security)
        self.tls = tls                              # this agent serves TLS, and talks to TLS peers only
        self.pins = pins or Pins()                  # their certificates (peer.security)
        self.view: dict[str, PeerRecord] = {}      # peer id -> record (other peers of this ring)
        self.candidates: dict[str, PeerRecord] = {}  # announced by mDNS, in view once they answer as members
        self.refused: set[str] = set()              # URLs already reported as failing ring authentication
        self.by_name: dict[str, str] = {}           # mDNS service name -> peer id
        self.conflicts: list[str] = []
        self.zc: AsyncZeroconf | None = None
        self.info: AsyncServiceInfo | None = None
        self.browser: Browser | None = None
        self._poller: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self):
        if self.interface:
            self.zc = AsyncZeroconf(interfaces=[self.interface], ip_version=IPVersion.V4Only)
            self.info = AsyncServiceInfo(
                SERVICE, f"{self.peer}.{SERVICE}", addresses=[socket.inet_aton(self.advertise)], port=self.port,
                properties=txt(self.ring, self.peer, self.port, self.tls), server=f"splitring-{self.peer}.local.",
                host_ttl=60, other_ttl=60)
            await self.zc.async_register_service(self.info)
            self.browser = Browser(self.interface, self._on_mdns)
            await self.browser.start(self.zc)
        self._session = client_session(self.key, self.pins, timeout=aiohttp.ClientTimeout(total=3))
        self._poller = asyncio.create_task(self._poll())

    def _on_mdns(self, name: str, rec: PeerRecord | None):
        if rec is None:
            pid = self.by_name.pop(name, None)
            self.candidates.pop(pid, None)
            if pid and self.view.get(pid, None) and self.view[pid].source == "mdns":
                del self.view[pid]
                log.info("peer %s left", pid)
            return
        if rec.ring != self.ring:
            return
        if rec.peer == self.peer:
            if rec.url != self.url:
                msg = f"duplicate peer id {self.peer}: also advertised by {rec.url} (copied state dir?)"
                if msg not in self.conflicts:
                    self.conflicts.append(msg)
                    log.error(msg)
            return
        if rec.version != PROTOCOL_VERSION:
            log.warning("peer %s at %s speaks protocol %s, we speak %s: ignored", rec.peer, rec.url, rec.version,
                        PROTOCOL_VERSION)
        self.by_name[name] = rec.peer
        known = self.view.get(rec.peer)
        if known is None or known.url != rec.url:
            self.candidates[rec.peer] = rec  # anyone can announce anything: in view once it answers as a member

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.advertise}:{self.port}"

    async def _status(self, url: str) -> dict | None:
        try:
            if self.tls and not url.startswith("https://"):
                raise RingAuthError(f"{url} does not use TLS, and this agent talks to TLS peers only")
            async with self._session.get(f"{url}/status") as r:
                st = await r.json()
            if isinstance(st, dict) and isinstance(st.get("peer"), str):
                self.pins.check_peer(st["peer"], await self.pins.for_url(url), url)
        except RingAuthError as e:
            if url not in self.refused:
                self.refused.add(url)
                log.warning("%s: not a member of this ring", e)
            return None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        self.refused.discard(url)
        return st if isinstance(st, dict) and st.get("ring") == self.ring else None

    async def _poll(self):
        """Known peers are added when they answer; every peer in view is dropped when it has not
        answered for `drop_after` seconds (mDNS goodbyes can be lost, and crashed peers send none)."""
        while True:
            for hostport in self.join:
                url = hostport if hostport.startswith("http") else f"{'https' if self.tls else 'http'}://{hostport}"
                st = await self._status(url)
                if st and st.get("peer") != self.peer:
                    if st["peer"] not in self.view:
                        log.info("peer %s seen at %s (join)", st["peer"], url)
                    self.view[st["peer"]] = PeerRecord(st["peer"], url, st["ring"], st.get("version", 0), "join")
            for pid, rec in list(self.candidates.items()):
                st = await self._status(rec.url)
                if st and st.get("peer") == pid:
                    log.info("peer %s seen at %s (mdns)", pid, rec.url)
                    self.view[pid] = self.candidates.pop(pid)
                    rec.last_seen = time.monotonic()
                elif time.monotonic() - rec.last_seen > self.drop_after:
                    self.candidates.pop(pid, None)
            for pid, rec in list(self.view.items()):
                st = await self._status(rec.url)
                if st and st.get("peer") == pid:
                    rec.last_seen = time.monotonic()
                elif time.monotonic() - rec.last_seen > self.drop_after:
                    log.info("peer %s at %s stopped answering: dropped", pid, rec.url)
                    self.view.pop(pid, None)
            await asyncio.sleep(self.poll_interval)

    def peers(self) -> list[PeerRecord]:
        return [r for r in self.view.values() if r.version == PROTOCOL_VERSION]

    async def close(self):
        if self._poller:
            self._poller.cancel()
        if self._session:
            await self._session.close()
        if self.browser:
            await self.browser.close(close_zc=False)
        if self.zc:
            if self.info:
                await self.zc.async_unregister_service(self.info)
            await self.zc.async_close()


async def browse_ring(ring: str, interface: str, wait: float = 3.0, want: int = 1) -> list[PeerRecord]:
    """For the CLI: peers of `ring` seen on `interface` within `wait` seconds (early exit at `want`)."""
    found: dict[str, PeerRecord] = {}

    def on_change(name, rec):
        if rec and rec.ring == ring and rec.version == PROTOCOL_VERSION:
            found[rec.peer] = rec

    browser = Browser(interface, on_change)
    await browser.start()
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline and len(found) < want:
            await asyncio.sleep(0.1)
    finally:
        await browser.close()
    return sorted(found.values(), key=lambda r: r.peer)
