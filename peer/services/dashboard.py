"""The dashboard every agent serves at GET /: one page (peer/dashboard.html, no build step, nothing fetched
from elsewhere) fed by Server-Sent Events from /dashboard/events.

Who sees what: anyone sees what unauthenticated /status shows. In a ring with a secret the rest (peers,
jobs, curves) needs a session: `splitring dashboard` prints a one-time link, signed with the ring key and
valid for protocols.auth.DASHBOARD_LINK_S, that this agent trades for an HttpOnly, SameSite=Strict cookie
holding a random session id (the secret never reaches the browser). A session only reads: the page's
routes are GETs, and every other route ignores cookies and wants a signed request."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import secrets
import time
from importlib import resources

from aiohttp import web

from peer.client import JobError
from peer.service import Service, json_error
from peer.services.status import CAPABILITIES
from peer.trace import stage_times
from protocols import PROTOCOL_VERSION, ProtocolError
from protocols.auth import DASHBOARD_LINK_S, ReplayCache, check_dashboard_link

log = logging.getLogger("splitring.dashboard")
SESSION_S = 12 * 3600    # how long a dashboard session lasts (a night's training)
UPDATE_S = 1.0           # seconds between two updates pushed to a page
STATUS_S = 3.0           # how often the other peers' status is asked (for the ring table)
MAX_WATCHERS = {True: 8, False: 4}   # pages connected at once, with a session and without
MAX_SESSIONS = 256       # sessions open at once (the oldest ends first)
WRITE_S = 10.0           # a page that takes longer than this to take an update is dropped


class DashboardService(Service):
    def __init__(self, node, work, coordination):
        super().__init__(node)
        self.work, self.coordination = work, coordination
        self.sessions: dict[str, float] = {}    # session id -> when it ends (monotonic)
        self.links = ReplayCache(window=DASHBOARD_LINK_S)   # each link opens one session
        self.cookie = f"splitring_{node.peer_id}"   # per peer: a browser sends one host's cookies to every port
        self.peers: dict[str, dict] = {}         # url -> its latest status, or why it has none
        self._asked = 0.0
        self.watchers = {True: 0, False: 0}   # pages connected now, with a session and without
        self.closing = asyncio.Event()
        self.page = resources.files("peer").joinpath("dashboard.html").read_bytes()
        self.csp = content_security_policy(self.page)

    def other_routes(self):
        return [web.get("/", self.index), web.get("/dashboard/login", self.login),
                web.get("/dashboard/state", self.state), web.get("/dashboard/events", self.events)]

    # --- who may see what ------------------------------------------------------------------------
    def private(self, request: web.Request) -> bool:
        if self.node.guard.member(request):
            return True
        ends = self.sessions.get(request.cookies.get(self.cookie, ""))
        return ends is not None and ends > time.monotonic()

    async def login(self, request: web.Request) -> web.Response:
        node = self.node
        if node.key is None:   # an open ring: everyone sees everything already
            raise web.HTTPSeeOther("/")
        try:
            nonce = check_dashboard_link(node.key, node.peer_id, request.query, time.time())
            self.links.admit(nonce, time.time())
        except ProtocolError as e:
            if not node.guard.allow(request):
                return json_error(429, "rate", "too many refused requests from this address; slow down")
            log.warning("dashboard link refused from %s: %s", request.remote, e.message)
            return json_error(401, e.code, e.message)
        now = time.monotonic()
        self.sessions = dict(list((s, t) for s, t in self.sessions.items() if t > now)[-(MAX_SESSIONS - 1):])
        session = secrets.token_urlsafe(32)
        self.sessions[session] = now + SESSION_S
        # the link's query is spent, but kept out of caches and referrers all the same
        resp = web.HTTPSeeOther("/", headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        resp.set_cookie(self.cookie, session, max_age=SESSION_S, httponly=True, samesite="Strict",
                        secure=node.tls is not None, path="/")
        raise resp

    # --- the page and its data ---------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", headers={
            "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "Content-Security-Policy": self.csp})

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(self.private(request), {}))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """An update every UPDATE_S while the page is open: the whole picture, with only the history
        points the page has not had yet (a page that reconnects starts afresh)."""
        private = self.private(request)
        if self.watchers[private] >= MAX_WATCHERS[private]:
            return json_error(429, "busy", f"at most {MAX_WATCHERS[private]} dashboards "
                                           f"{'with' if private else 'without'} a session may watch this peer at once")
        self.watchers[private] += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
            await resp.prepare(request)
            sent: dict = {}   # run ("job:attempt") -> series -> seconds of the last point sent
            while not self.closing.is_set():
                if private and not self.private(request):   # the session ended: say so, and stop
                    await asyncio.wait_for(resp.write(b"event: expired\ndata: {}\n\n"), WRITE_S)
                    break
                snap = await self.snapshot(private, sent)
                await asyncio.wait_for(resp.write(f"data: {json.dumps(snap)}\n\n".encode()), WRITE_S)
                try:
                    await asyncio.wait_for(self.closing.wait(), UPDATE_S)
                except asyncio.TimeoutError:
                    pass
        except (ConnectionResetError, asyncio.TimeoutError):   # the page left, or stopped reading
            pass
        finally:
            self.watchers[private] -= 1
        return resp

    async def close(self):
        self.closing.set()   # event streams end, so that the server's shutdown does not wait for them

    async def snapshot(self, private: bool, sent: dict) -> dict:
        node = self.node
        me = {"peer": node.peer_id, "ring": node.ring, "version": PROTOCOL_VERSION, "capabilities": CAPABILITIES}
        if not private:
            return {"me": me, "private": False}
        job = await self.job(sent)
        return {"me": {**me, "url": node.url, "role": node.role, "memory_budget": node.memory_budget,
                       "data": {"name": node.data.name, "samples": len(node.data)}},
                "private": True, "ring": await self.ring(), "job": job, "jobs": self.past_jobs()}

    async def ring(self) -> list[dict]:
        """This peer and every peer it sees, with what each says of itself (asked every STATUS_S)."""
        node, now = self.node, time.monotonic()
        seen = node.discovery.public()
        if now - self._asked > STATUS_S:
            self._asked = now
            targets = [{"peer": p["peer"], "url": p["url"]} for p in seen["peers"]]
            self.peers = {p["url"]: self.peers[p["url"]] for p in targets if p["url"] in self.peers}
            replies = await asyncio.gather(*(node.client().call(p, "status", timeout=2) for p in targets),
                                           return_exceptions=True)
            for p, r in zip(targets, replies):
                old = self.peers.get(p["url"], {})
                self.peers[p["url"]] = {"status": r, "failures": 0} if isinstance(r, dict) else \
                    {**old, "failures": old.get("failures", 0) + 1, "error": str(r) or type(r).__name__}
        own = self.work.status()
        rows = [{"peer": node.peer_id, "url": node.url, "source": "self", "seen_s_ago": 0.0, "me": True,
                 "role": node.role, "capabilities": CAPABILITIES, "memory_budget": node.memory_budget,
                 "peak_memory_bytes": own["peak_memory_bytes"], "failures": 0}]
        for p in seen["peers"]:
            asked = self.peers.get(p["url"], {})
            st = asked.get("status") or {}
            rows.append({**p, "role": st.get("role"), "capabilities": st.get("capabilities"),
                         "memory_budget": st.get("memory_budget"), "peak_memory_bytes": st.get("peak_memory_bytes"),
                         "failures": asked.get("failures", 0), "error": asked.get("error")})
        rows += [{**m, "missing": True, "failures": None} for m in seen["missing"]]
        return rows

    async def job(self, sent: dict) -> dict | None:
        """The job to show: one running coordinated here, else one this peer works on (asked of its
        coordinator), else the latest coordinated here; with the history points not sent yet."""
        coord = self.coordination.shown()
        remote = [(j, there) for j in list(self.work.jobs)
                  if j not in self.coordination.coordinated and (there := self.work.coordinator_of(j))]
        if remote and (coord is None or coord.task is None or coord.task.done()):
            job, there = remote[-1]

            async def view_of(after: dict) -> dict:
                return (await self.node.client().call(there, "job_view", timeout=5, params={"job": job},
                                                      after=after))["view"]
        elif coord is not None:
            job, view_of = coord.job, coord.job_view
        else:
            return None
        mine = sent.setdefault(job, {"attempt": None, "marks": {}})
        try:
            view = await view_of(mine["marks"])
            if view["attempt"] != mine["attempt"]:   # a new attempt has a history of its own: all of it
                mine.update(attempt=view["attempt"], marks={})
                view = await view_of({})
        except JobError as e:
            return {"job": job, "state": "unreachable", "error": str(e)}
        for name, points in view["history"].items():
            if points:
                mine["marks"][name] = points[-1]["seconds"]
        view["measured"] = stage_times(view["timeline"]) if view.get("timeline") else {}
        return view

    def past_jobs(self) -> list[dict]:
        """Jobs coordinated here, newest first, with their summary's headline figures."""
        keys = ("final_loss", "accuracy", "samples_per_s", "seconds", "epochs", "rounds")
        out = []
        for c in reversed(list(self.coordination.coordinated.values())):
            last = c.events[-1]["event"] if c.events else "starting"
            out.append({"job": c.job, "scheme": c.cfg.scheme, "state": last if last in ("done", "failed", "stopped")
                        else "running", **{k: (c.summary or {}).get(k) for k in keys}})
        return out


def content_security_policy(page: bytes) -> str:
    """Only this page's own inline script and style run (by their hashes), nothing from elsewhere, no framing."""
    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), page, re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in blocks)
    return (f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; img-src data:; "
            f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
