"""Who is in the ring: mDNS (python-zeroconf) on one chosen interface, plus known peers (--join).

mDNS and --join only say where to look. Every address heard of is a *source*, remembered for
`forget_after` seconds after it last answered (or was last named), and asked for its /status every
`poll_interval`, all sources at once, each ask with its own deadline: a hung peer delays no other.
What the sources answered decides the view, in one pure function, `decide`:
- a peer is in view while some address of it has answered within `drop_after`, whatever mDNS says
  (goodbyes get lost, crashed and suspended peers send none, caches keep dead records);
- a restarted peer (same id, a new `instance`) is in view as soon as it answers, at whichever address;
- two processes with one peer id answering at the same time (a copied state dir) are a conflict:
  reported, and neither is in view, until one of them has not answered for `drop_after`.
Each process start advertises a new mDNS name, "{peer}-{instance}", so every browser sees a restarted
peer as a new service, and two agents with one id as two services.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable

import aiohttp
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.security import Pins, RingAuthError, client_session
from pipeline.config import SCHEMES
from protocols import PROTOCOL_VERSION

SERVICE = "_splitring._tcp.local."
POLL_INTERVAL = 1.0     # seconds between two asks of one source
DROP_AFTER = 5.0        # a peer not answering for this long leaves the view (and a conflict it is part of ends)
FORGET_AFTER = 600.0    # a source not answering (nor named by mDNS) for this long is no longer asked
STATUS_TIMEOUT = 2.0    # the deadline of one ask
MAX_SOURCES = 256       # at most this many remembered sources (--join ones are never forgotten)
MAX_REFUSED_DELAY = 60.0  # an address refusing our ring proof is asked ever less often, down to once a minute
RESOLVE_TRIES = 5       # asks for an mDNS name's address before giving up on that announcement
log = logging.getLogger("splitring.discovery")


@dataclass
class PeerRecord:
    peer: str
    url: str
    ring: str
    version: int
    source: str                 # "mdns" | "join"
    last_seen: float = field(default_factory=time.monotonic)
    instance: str = ""          # random per process start

    def public(self) -> dict:
        return {"peer": self.peer, "url": self.url, "version": self.version, "source": self.source,
                "instance": self.instance, "seen_s_ago": round(time.monotonic() - self.last_seen, 1)}


def txt(ring: str, peer: str, port: int, tls: bool = False, instance: str = "") -> dict[str, str]:
    return {"ring": ring, "peer": peer, "v": str(PROTOCOL_VERSION), "port": str(port), "caps": ",".join(SCHEMES),
            **({"inst": instance} if instance else {}), **({"tls": "1"} if tls else {})}


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
    return PeerRecord(props["peer"], f"{scheme}://{addrs[0]}:{info.port}", props["ring"], version, "mdns",
                      instance=props.get("inst", ""))


# --- the decisions: pure, over plain data ---------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What an address said about itself in /status."""
    peer: str
    instance: str   # "" from agents too old to say: then the address stands for the process
    version: int
    ring: str


def answer_from(st: dict | None) -> Answer | None:
    if not isinstance(st, dict) or not isinstance(st.get("peer"), str) or not isinstance(st.get("ring"), str):
        return None
    version = st.get("version")
    return Answer(st["peer"], str(st.get("instance") or ""), version if isinstance(version, int) else 0, st["ring"])


@dataclass
class Source:
    """An address heard of (an mDNS record, a --join entry) and what it last answered."""
    url: str
    origin: str                     # "mdns" | "join"
    heard: float                    # when mDNS or the join list last named it
    answer: Answer | None = None    # its latest answer, kept after it stops answering
    first_ok: float = 0.0           # when the process that gave `answer` first answered here
    last_ok: float = 0.0            # when it last answered
    refusals: int = 0               # asks in a row refused by ring authentication (not a member)
    next_ask: float = 0.0

    def record(self, answer: Answer | None, now: float) -> None:
        """Note one ask's outcome (None: no answer as a member of the ring)."""
        if answer is None:
            return
        if self.answer is None or (answer.peer, answer.instance) != (self.answer.peer, self.answer.instance):
            self.first_ok = now     # another process at this address (a restart on the same port)
        self.answer, self.last_ok = answer, now


@dataclass
class Process:
    """One running agent, as seen at one or more addresses."""
    peer: str
    instance: str
    first: float
    last: float
    sources: list[Source]

    @property
    def url(self) -> str:
        return self.sources[0].url

    def overlaps(self, other: "Process") -> bool:
        """Both answered while the other was answering: two live processes, not a restart."""
        return self.first <= other.last and other.first <= self.last


@dataclass
class Decision:
    view: dict[str, PeerRecord]     # peer id -> the live process of that id (every protocol version)
    conflicts: list[str]            # live duplicate ids, as sentences for users
    missing: list[dict]             # in view within forget_after, not now: {"peer", "url", "seen_s_ago"}


FIX = "a state dir was copied; stop one, delete its state dir's peer_id file and start it again so it gets a new id"


def conflict_message(peer: str, url_a: str, url_b: str, mine: bool = False) -> str:
    if mine:
        return (f"duplicate peer id {peer}: this agent ({url_a}) and another live agent at {url_b} both use it: "
                f"{FIX}")
    return f"duplicate peer id {peer}: used by two live agents, at {url_a} and {url_b}: {FIX}"


def ask_delay(refusals: int, poll_interval: float = POLL_INTERVAL) -> float:
    """Seconds between two asks of a source: every poll_interval, whether it answers or not (a peer is
    listed again as soon as it answers), backing off only from addresses that are not ring members."""
    return min(poll_interval * 2 ** refusals, MAX_REFUSED_DELAY) if refusals else poll_interval


def processes(sources: Iterable[Source], now: float, within: float) -> list[Process]:
    """The processes that answered within `within` seconds, grouped by (peer, instance), oldest
    address first; an agent too old to give its instance counts as one process per address."""
    by_key: dict[tuple[str, str], list[Source]] = {}
    for s in sources:
        if s.answer is not None and now - s.last_ok <= within:
            by_key.setdefault((s.answer.peer, s.answer.instance or s.url), []).append(s)
    return [Process(peer, inst, min(s.first_ok for s in srcs), max(s.last_ok for s in srcs),
                    sorted(srcs, key=lambda s: (s.first_ok, s.url)))
            for (peer, inst), srcs in sorted(by_key.items())]


def decide(sources: Iterable[Source], me_peer: str, me_instance: str, me_url: str, now: float,
           drop_after: float = DROP_AFTER, forget_after: float = FORGET_AFTER) -> Decision:
    """The view, the live conflicts and the missing peers, from what every source last answered."""
    sources = list(sources)
    live, known = processes(sources, now, drop_after), processes(sources, now, forget_after)
    view: dict[str, PeerRecord] = {}
    conflicts: list[str] = []
    for peer in sorted({p.peer for p in live}):
        procs = [p for p in live if p.peer == peer]
        if peer == me_peer:
            conflicts += [conflict_message(peer, me_url, p.url, mine=True) for p in procs if p.instance != me_instance]
            continue
        clashes = [(a, b) for i, a in enumerate(procs) for b in procs[i + 1:] if a.overlaps(b)]
        if clashes:
            conflicts += [conflict_message(peer, *sorted((a.url, b.url))) for a, b in clashes]
            continue
        newest = max(procs, key=lambda p: p.last)   # the others are earlier runs of it, gone
        src = newest.sources[0]
        view[peer] = PeerRecord(peer, src.url, src.answer.ring, src.answer.version, src.origin, newest.last,
                                newest.instance)
    gone: dict[str, Process] = {}   # peer id -> its latest process, for ids with no live one
    live_ids = {p.peer for p in live} | {me_peer}
    for p in known:
        if p.peer not in live_ids and (p.peer not in gone or p.last > gone[p.peer].last):
            gone[p.peer] = p
    missing = [{"peer": p.peer, "url": p.url, "seen_s_ago": round(now - p.last, 1)}
               for p in sorted(gone.values(), key=lambda p: p.peer)]
    return Decision(view, conflicts, missing)


def to_forget(sources: Iterable[Source], now: float, forget_after: float = FORGET_AFTER,
              max_sources: int = MAX_SOURCES) -> list[str]:
    """URLs no longer worth asking: silent and unnamed for forget_after, then the stalest beyond
    max_sources. --join sources are kept."""
    sources = list(sources)
    recent = lambda s: max(s.heard, s.last_ok)  # noqa: E731
    droppable = sorted((s for s in sources if s.origin != "join"), key=recent)
    stale = [s for s in droppable if now - recent(s) > forget_after]
    excess = max(0, len(sources) - max_sources)
    return [s.url for s in droppable[:max(len(stale), excess)]]


# --- mDNS ---------------------------------------------------------------------------------------
class Browser:
    """Watches mDNS for splitring services; calls on_change(name, record|None) (None: the name was
    withdrawn or expired). Names that do not resolve at once are asked again, RESOLVE_TRIES times."""

    def __init__(self, interface: str, on_change):
        self.interface = interface
        self.on_change = on_change
        self.zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._resolving: dict[str, asyncio.Task] = {}   # mDNS name -> its resolution

    async def start(self, zc: AsyncZeroconf | None = None) -> AsyncZeroconf:
        self.zc = zc or AsyncZeroconf(interfaces=[self.interface], ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE, handlers=[self._on_state])
        return self.zc

    def _on_state(self, zeroconf, service_type, name, state_change):
        old = self._resolving.pop(name, None)
        if old:
            old.cancel()
        if state_change is ServiceStateChange.Removed:
            self.on_change(name, None)
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._resolving[name] = task
        task.add_done_callback(lambda t: self._resolving.pop(name, None) if self._resolving.get(name) is t else None)

    async def _resolve(self, service_type: str, name: str):
        for attempt in range(RESOLVE_TRIES):
            info = AsyncServiceInfo(service_type, name)
            if await info.async_request(self.zc.zeroconf, 3000):
                rec = record_from_info(info)
                if rec:
                    self.on_change(name, rec)
                return
            await asyncio.sleep(min(2.0 ** attempt, 10.0))
        log.info("mDNS name %s did not resolve", name)

    async def close(self, close_zc: bool = True):
        for t in list(self._resolving.values()):
            t.cancel()
        if self._browser:
            await self._browser.async_cancel()
        if close_zc and self.zc:
            await self.zc.async_close()


# --- the agent's discovery: the async shell -----------------------------------------------------
def join_url(hostport: str, tls: bool) -> str:
    url = hostport if hostport.startswith(("http://", "https://")) else f"{'https' if tls else 'http'}://{hostport}"
    return url.rstrip("/")


class Discovery:
    """This agent's advertisement and its view of the ring."""

    def __init__(self, ring: str, peer: str, port: int, interface: str | None, advertise: str,
                 join: list[str], poll_interval: float = POLL_INTERVAL, drop_after: float = DROP_AFTER,
                 key: bytes | None = None, tls: bool = False, pins: Pins | None = None,
                 forget_after: float = FORGET_AFTER, max_sources: int = MAX_SOURCES,
                 status_timeout: float = STATUS_TIMEOUT):
        self.ring, self.peer, self.port = ring, peer, port
        self.instance = secrets.token_hex(4)        # this process start: a restart is a new instance
        self.interface = interface  # None: no mDNS at all (known peers only)
        self.advertise = advertise
        self.join = join
        self.poll_interval, self.drop_after, self.forget_after = poll_interval, drop_after, forget_after
        self.max_sources, self.status_timeout = max_sources, status_timeout
        self.key = key                              # the ring key: peers must prove it (peer.security)
        self.tls = tls                              # this agent serves TLS, and talks to TLS peers only
        self.pins = pins or Pins()                  # their certificates (peer.security)
        now = time.monotonic()
        self.sources: dict[str, Source] = {u: Source(u, "join", now) for u in (join_url(j, tls) for j in join)}
        self.refused: set[str] = set()              # URLs already reported as failing ring authentication
        self.zc: AsyncZeroconf | None = None
        self.info: AsyncServiceInfo | None = None
        self.browser: Browser | None = None
        self._loop: asyncio.Task | None = None
        self._asks: dict[str, asyncio.Task] = {}   # URL -> the ask in flight
        self._session: aiohttp.ClientSession | None = None
        self._logged = Decision({}, [], [])         # what the log has said so far
        self._skew: set[tuple[str, int]] = set()    # (peer, version) already warned about

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.advertise}:{self.port}"

    async def start(self):
        if self.interface:
            self.zc = AsyncZeroconf(interfaces=[self.interface], ip_version=IPVersion.V4Only)
            self.info = AsyncServiceInfo(
                SERVICE, f"{self.peer}-{self.instance}.{SERVICE}", addresses=[socket.inet_aton(self.advertise)],
                port=self.port, properties=txt(self.ring, self.peer, self.port, self.tls, self.instance),
                server=f"splitring-{self.peer}-{self.instance}.local.", host_ttl=60, other_ttl=60)
            await self.zc.async_register_service(self.info)
            self.browser = Browser(self.interface, self._on_mdns)
            await self.browser.start(self.zc)
        self._session = client_session(self.key, self.pins, timeout=aiohttp.ClientTimeout(total=self.status_timeout))
        self._loop = asyncio.create_task(self._run())

    # --- what the view is ---
    def decision(self) -> Decision:
        return decide(self.sources.values(), self.peer, self.instance, self.url, time.monotonic(), self.drop_after,
                      self.forget_after)

    def peers(self) -> list[PeerRecord]:
        """The live peers of this ring that speak our protocol version, by peer id."""
        return [r for _, r in sorted(self.decision().view.items()) if r.version == PROTOCOL_VERSION]

    @property
    def conflicts(self) -> list[str]:
        return self.decision().conflicts

    def missing(self) -> list[dict]:
        return self.decision().missing

    def public(self) -> dict:
        d = self.decision()
        return {"peers": [r.public() for _, r in sorted(d.view.items())], "conflicts": d.conflicts,
                "missing": d.missing}

    # --- where to look ---
    def _on_mdns(self, name: str, rec: PeerRecord | None):
        """A withdrawn record changes nothing: its address is asked until it stops answering."""
        if rec is None or rec.ring != self.ring or rec.url == self.url:
            return
        now = time.monotonic()
        src = self.sources.setdefault(rec.url, Source(rec.url, "mdns", now))
        src.heard = now
        self._ask_soon(src)   # a new process is listed as soon as it answers

    def _ask_soon(self, src: Source):
        if src.url in self._asks or src.url == self.url:
            return
        task = asyncio.create_task(self._ask(src))
        self._asks[src.url] = task
        task.add_done_callback(lambda t: self._asks.pop(src.url, None) if self._asks.get(src.url) is t else None)

    async def _ask(self, src: Source):
        started, refused, st = time.monotonic(), False, None
        try:
            st = await asyncio.wait_for(self._status(src.url), self.status_timeout)
        except RingAuthError as e:
            refused = True
            if src.url not in self.refused:
                self.refused.add(src.url)
                log.warning("%s: not a member of this ring", e)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if st is not None:
            self.refused.discard(src.url)
        src.refusals = src.refusals + 1 if refused else 0
        src.next_ask = started + ask_delay(src.refusals, self.poll_interval)
        src.record(answer_from(st), time.monotonic())
        self._log_changes()

    async def _status(self, url: str) -> dict | None:
        """The /status of `url` if it answers as a member of this ring; raises RingAuthError if it
        cannot prove it is one, aiohttp.ClientError if it does not answer."""
        if self.tls and not url.startswith("https://"):
            raise RingAuthError(f"{url} does not use TLS, and this agent talks to TLS peers only")
        async with self._session.get(f"{url}/status") as r:
            st = await r.json()
        if isinstance(st, dict) and isinstance(st.get("peer"), str):
            self.pins.check_peer(st["peer"], await self.pins.for_url(url), url)
        return st if isinstance(st, dict) and st.get("ring") == self.ring else None

    async def _run(self):
        """Ask every source every poll_interval; forget the stale ones; re-announce after a suspension."""
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last > self.drop_after:
                log.info("this agent was suspended for %.0fs: announcing it again", now - last)
                await self._announce()
            last = now
            for url in to_forget(list(self.sources.values()), now, self.forget_after, self.max_sources):
                del self.sources[url]
            for src in list(self.sources.values()):
                if src.next_ask <= now + self.poll_interval / 2:   # due before the next round
                    self._ask_soon(src)
            self._log_changes()
            await asyncio.sleep(self.poll_interval)

    async def _announce(self):
        if self.zc and self.info:
            try:
                await self.zc.async_update_service(self.info)
            except Exception as e:  # noqa: BLE001 - a failed re-announcement only delays discovery
                log.warning("mDNS re-announcement failed: %r", e)

    def _log_changes(self):
        d, was = self.decision(), self._logged
        for pid, r in d.view.items():
            old = was.view.get(pid)
            if old is None or (old.url, old.instance) != (r.url, r.instance):
                log.info("peer %s seen at %s (%s)", pid, r.url, r.source)
            if r.version != PROTOCOL_VERSION and (pid, r.version) not in self._skew:
                self._skew.add((pid, r.version))
                log.warning("peer %s at %s speaks protocol %s, we speak %s: not in the ring (upgrade the older one)",
                            pid, r.url, r.version, PROTOCOL_VERSION)
        for pid, r in was.view.items():
            if pid not in d.view:
                log.info("peer %s at %s is out of view", pid, r.url)
        for c in set(d.conflicts) - set(was.conflicts):
            log.error(c)
        for c in set(was.conflicts) - set(d.conflicts):
            log.info("resolved: %s", c)
        self._logged = d

    async def close(self):
        if self._loop:
            self._loop.cancel()
        for t in list(self._asks.values()):
            t.cancel()
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
