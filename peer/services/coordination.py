"""Job coordination, the /jobs/* calls any peer serves to users: start a job (and coordinate it from
here, streaming its progress), plan one without running it, read one, fetch its model, cancel it. The
coordinator of each job (peer.coordinator) talks to the other peers through a PeerClient only."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import Counter, Gauge

from peer.coordinator import Coordinator
from peer.parallel_coordinator import ParallelCoordinator
from peer.limits import JOB_LIMITS
from peer.service import Service, json_error, serves
from peer.state import journal_order, journal_problem
from protocols import ProtocolError
from peer.client import JobError
from pipeline.config import PARALLEL_SCHEMES, JobConfig
from pipeline.models import footprint

log = logging.getLogger("splitring.coordination")
TERMINAL = ("done", "failed", "stopped")   # a job's last event
COUNTED = ("lost", "rollback", "rejoined", "resumed", "replanned") + TERMINAL


class CoordinationService(Service):
    def __init__(self, node, work):
        super().__init__(node)
        self.work = work   # to pass a cancel on to the coordinator of a job this peer works on
        self.coordinated: dict[str, Coordinator] = {}
        self.m_events = Counter("splitring_job_events", "events of the jobs coordinated here (lost: a peer "
                                "lost; rollback: back to the last commit; rejoined: a lost peer back; resumed: a "
                                "new attempt; replanned: going on without a lost peer; stopped, failed, done: how "
                                "jobs ended)", ["event"], registry=node.registry)
        # the numbers the dashboard draws, per job coordinated here (labels of forgotten jobs are removed)
        self.m_loss = Gauge("splitring_job_loss", "the latest training loss (a step's, or a round's mean)", ["job"],
                            registry=node.registry)
        self.m_accuracy = Gauge("splitring_job_accuracy", "the latest held-out accuracy (an epoch's or a round's)",
                                ["job"], registry=node.registry)
        self.m_rate = Gauge("splitring_job_samples_per_second", "training samples per second over the current pass",
                            ["job"], registry=node.registry)
        self.m_steps = Counter("splitring_job_steps", "training steps done", ["job"], registry=node.registry)

    def other_routes(self):
        return [web.get("/jobs/{job}/model", self.model), web.post("/probe", self.probe)]

    def status(self) -> dict:
        """The latest event of each job coordinated here, with its recoveries so far (peers lost, when, how
        long the job took to get going again) and the peers it goes on without."""
        return {j: {**(c.events[-1] if c.events else {}), "recoveries": c.recoveries,
                    "lost": (c.journal or {}).get("lost", [])} for j, c in self.coordinated.items()}

    async def close(self):
        for c in self.coordinated.values():
            if c.task and not c.task.done():
                c.task.cancel()

    async def coordinator(self, cfg: JobConfig, journal: dict | None = None) -> Coordinator:
        """A job coordinated from here (resumed from its journal, if given). Its model is sized on the meta
        device first (off the loop): an unbuildable one is refused before anything starts."""
        node = self.node
        sizes = await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers)

        def save_model(job, state_dict):
            return node.state.save_model(job, state_dict, JOB_LIMITS.kept_models, JOB_LIMITS.kept_model_s)
        kind = ParallelCoordinator if cfg.scheme in PARALLEL_SCHEMES else Coordinator
        return kind(cfg, node.me(), node.discovery, node.client(), save_model, sizes=sizes, journal=journal)

    @serves("start_job")
    async def start_job(self, msg, request):
        coord = await self.coordinator(self.node.job_config(msg["config"]))
        async for event in self.launch(coord):
            yield event

    async def launch(self, coord: Coordinator):
        """Run a coordination here and yield its events until it ends. The job goes on if the caller leaves
        (`splitring train --detach`, or a dropped connection): `follow_job` picks it up again."""
        self.coordinated[coord.job] = coord
        self._forget_old_jobs()
        coord.observers.append(lambda event: self.count(coord.job, event))
        queue: asyncio.Queue = asyncio.Queue()
        coord.listeners.add(queue)
        coord.task = asyncio.create_task(coord.run())
        try:
            while True:
                event = await queue.get()
                yield event
                if event["event"] in TERMINAL:
                    break
        finally:
            coord.listeners.discard(queue)

    def count(self, job: str, event: dict) -> None:
        kind = event["event"]
        if kind in COUNTED:
            self.m_events.labels(kind).inc()
        if kind == "step":
            self.m_steps.labels(job).inc()
            self.m_loss.labels(job).set(event["loss"])
            self.m_rate.labels(job).set(event["samples_per_s"])
        elif kind in ("epoch", "round"):
            if event.get("loss") is not None:
                self.m_loss.labels(job).set(event["loss"])
            if event.get("accuracy") is not None:
                self.m_accuracy.labels(job).set(event["accuracy"])

    @serves("resume_job")
    async def resume_job(self, msg, request):
        """Resume a job from its journal (the newest any reachable peer of the job holds), coordinated here."""
        job, node = request.match_info["job"], self.node
        running = self.coordinated.get(job)
        if running is not None and running.task is not None and not running.task.done():
            raise JobError(f"job {job} is running, coordinated by this peer ({node.peer_id}): follow it with "
                           f"`splitring attach {job}`")
        journal = await self.newest_journal(job)
        if journal is None:
            raise JobError(f"no journal of job {job} on peer {node.peer_id} or the peers it sees: only an N-split "
                           f"job that reached its first commit can be resumed")
        if journal["state"] == "done":
            raise JobError(f"job {job} has finished; its model is at its coordinator {journal['coordinator']}")
        await self.check_not_driven(journal)
        coord = await self.coordinator(node.job_config(journal["config"]), journal)
        async for event in self.launch(coord):
            yield event

    async def check_not_driven(self, journal: dict) -> None:
        """Refuse to resume a job its recorded coordinator still drives (one coordinator per job)."""
        if journal["coordinator"] == self.node.peer_id:
            return
        there = {"peer": journal["coordinator"], "url": journal["coordinator_url"]}
        try:
            events = (await self.node.client().call(there, "job", timeout=5, params={"job": journal["job"]}))["events"]
        except JobError:
            return   # gone, or it does not coordinate the job any more
        if events and events[-1].get("event") not in TERMINAL:
            raise JobError(f"job {journal['job']} is running, coordinated by {there['peer']} at {there['url']}: "
                           f"follow it with `splitring attach {journal['job']}`")

    async def newest_journal(self, job: str) -> dict | None:
        """The journal of the job's latest commit (then attempt) among this peer's, those of the peers it
        sees and those of the peers the journals name (a commit is recorded on every peer, but a coordinator
        lost while recording leaves some a commit behind)."""
        node = self.node
        try:
            found = [node.state.journal(job)]
        except ValueError:
            raise ProtocolError("malformed", f"not a job id: {job!r}") from None
        asked: set[str] = set()
        while True:
            peers = {r.url: r.peer for r in node.discovery.peers()}
            peers.update({p["url"]: p["peer"] for j in found if j for p in j["ring"] if isinstance(p, dict)})
            new = [{"peer": peer, "url": url} for url, peer in peers.items() if url not in asked]
            if not new:
                break
            asked.update(p["url"] for p in new)
            replies = await asyncio.gather(*(node.client().call(p, "journal", timeout=5, params={"job": job})
                                             for p in new), return_exceptions=True)
            found += [r["journal"] for r in replies if isinstance(r, dict) and journal_problem(r["journal"]) is None]
        found = [j for j in found if j and j["job"] == job and "facts" in j]
        return max(found, key=journal_order, default=None)

    @serves("journal")
    async def journal(self, msg, request):
        try:
            return {"journal": self.node.state.journal(request.match_info["job"])}
        except ValueError:
            raise ProtocolError("malformed", "not a job id") from None

    @serves("jobs")
    async def jobs(self, msg, request):
        """The jobs this peer knows: those it coordinates (running or kept) and those whose journal it holds."""
        listed = {}
        for j in self.node.state.journals():
            listed[j["job"]] = {"job": j["job"], "state": j["state"], "coordinator": j["coordinator"],
                                "rotation": j["rotation"], "attempt": j["attempt"], "scheme": j["config"]["scheme"],
                                "updated": j["updated"]}
        for held in self.work.status()["held"]:
            listed.setdefault(held["job"], {"job": held["job"]})["state"] = "held"
        for job, c in self.coordinated.items():
            last = c.events[-1]["event"] if c.events else "starting"
            state = {"done": "done", "failed": "failed", "stopped": "stopped"}.get(last, "running")
            listed[job] = {**listed.get(job, {}), "job": job, "state": state, "coordinator": self.node.peer_id,
                           "scheme": c.cfg.scheme}
        return {"jobs": list(listed.values())}

    @serves("follow_job")
    async def follow_job(self, msg, request):
        """A job's events: its recent ones, then each as it happens, until it ends. From a peer that does not
        coordinate it, relayed from its coordinator."""
        job, node = request.match_info["job"], self.node
        coord = self.coordinated.get(job)
        if coord is None:
            there = self.work.coordinator_of(job)
            if there is None:
                try:
                    journal = node.state.journal(job)
                except ValueError:
                    raise ProtocolError("malformed", "not a job id") from None
                if journal is None or journal["coordinator"] == node.peer_id:
                    raise JobError(f"job {job} is not coordinated by peer {node.peer_id} and it knows no coordinator "
                                   f"of it")
                there = {"peer": journal["coordinator"], "url": journal["coordinator_url"]}
            async for event in node.client().stream(there, "follow_job", params={"job": job}):
                if "event" not in event:
                    raise JobError(f"the coordinator of job {job} ({there['peer']}): {event['error']}")
                yield event
            return
        queue: asyncio.Queue = asyncio.Queue()
        for event in list(coord.events):
            queue.put_nowait(event)
        if coord.task is not None and not coord.task.done():
            coord.listeners.add(queue)
        else:
            queue.put_nowait(None)
        try:
            while (event := await queue.get()) is not None:
                yield event
                if event["event"] in TERMINAL:
                    break
        finally:
            coord.listeners.discard(queue)

    def _forget_old_jobs(self) -> None:
        """Keep the last JOB_LIMITS.kept_jobs finished coordinations in memory (their models are on disk)."""
        finished = [j for j, c in self.coordinated.items() if c.task is not None and c.task.done()]
        for j in finished[:max(0, len(finished) - JOB_LIMITS.kept_jobs)]:
            del self.coordinated[j]
            for metric in (self.m_loss, self.m_accuracy, self.m_rate, self.m_steps):
                try:
                    metric.remove(j)
                except KeyError:   # never set for this job
                    pass

    @serves("plan_job")
    async def plan_job(self, msg, request):
        """Plan a job on the ring as it is now, without running it (for `splitring plan --peer`)."""
        coord = await self.coordinator(self.node.job_config(msg["config"]))
        plans = await coord.plan_only()
        return {"ring": [p["peer"] for p in coord.ring], "rotations": plans}

    @serves("job_view")
    async def job_view(self, msg, request):
        coord = self.coordinated.get(request.match_info["job"])
        if coord is None:
            return json_error(404, "unknown_job", "no such job coordinated here")
        return {"job": coord.job, "view": await coord.job_view(msg["after"])}

    def shown(self) -> Coordinator | None:
        """The job a dashboard shows first: the latest running here, else the latest finished."""
        running = [c for c in self.coordinated.values() if c.task is not None and not c.task.done()]
        return (running or list(self.coordinated.values()) or [None])[-1]

    @serves("job")
    async def job(self, msg, request):
        coord = self.coordinated.get(request.match_info["job"])
        if coord is None:
            return json_error(404, "unknown_job", "no such job coordinated here")
        return {"job": coord.job, "events": list(coord.events)[-5:], "summary": coord.summary}

    @serves("cancel_job")
    async def cancel_job(self, msg, request):
        """Cancel a job: here if this peer coordinates it, else at its coordinator (which aborts every stage)."""
        job, node = request.match_info["job"], self.node
        coord, elsewhere = self.coordinated.get(job), self.work.coordinator_of(job)
        if coord is None and elsewhere is not None:
            try:
                return await node.client().call(elsewhere, "cancel_job", timeout=10, params={"job": job})
            except JobError as e:   # its stage here is freed all the same (the others free theirs by themselves)
                self.work.hold(job, f"cancelled while its coordinator does not answer ({e})")
                return json_error(502, "unreachable", f"the coordinator of job {job} did not answer ({e}); this "
                                                      f"peer's stage is freed, the others free theirs within the "
                                                      f"job's peer_timeout")
        if coord is None:
            return json_error(404, "unknown_job", f"job {job} is not known to peer {node.peer_id}")
        if coord.task and not coord.task.done():
            log.warning("job %s: stopped by a request from %s", job, request.remote)
            coord.stop_reason = "job cancelled"
            coord.task.cancel()
        return {"cancelled": coord.job, "coordinator": node.peer_id}

    async def model(self, request):
        path = self.node.state.model_path(request.match_info["job"])
        if path is None or not path.exists():
            return json_error(404, "unknown_job", f"no finished model of that job here (models are kept for the "
                                                  f"last {JOB_LIMITS.kept_models} jobs, at most "
                                                  f"{JOB_LIMITS.kept_model_s / 86400:.0f} days)")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def probe(self, request):
        """Link probe: the caller times sending a body here."""
        return web.json_response({"bytes": len(await request.read())})
