"""Job coordination, the /jobs/* calls any peer serves to users: start a job (and coordinate it from
here, streaming its progress), plan one without running it, read one, fetch its model, cancel it. The
coordinator of each job (peer.coordinator) talks to the other peers through a PeerClient only."""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from peer.coordinator import Coordinator
from peer.parallel_coordinator import ParallelCoordinator
from peer.limits import JOB_LIMITS
from peer.service import Service, json_error, serves
from peer.client import JobError
from pipeline.config import PARALLEL_SCHEMES, JobConfig
from pipeline.models import footprint

log = logging.getLogger("splitring.coordination")


class CoordinationService(Service):
    def __init__(self, node, work):
        super().__init__(node)
        self.work = work   # to pass a cancel on to the coordinator of a job this peer works on
        self.coordinated: dict[str, Coordinator] = {}

    def other_routes(self):
        return [web.get("/jobs/{job}/model", self.model), web.post("/probe", self.probe)]

    def status(self) -> dict:
        """The latest event of each job coordinated here."""
        return {j: (c.events[-1] if c.events else {}) for j, c in self.coordinated.items()}

    async def close(self):
        for c in self.coordinated.values():
            if c.task and not c.task.done():
                c.task.cancel()

    async def coordinator(self, cfg: JobConfig) -> Coordinator:
        """A job coordinated from here. Its model is sized on the meta device first (off the loop): an
        unbuildable one is refused before anything starts."""
        node = self.node
        sizes = await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers)

        def save_model(job, state_dict):
            return node.state.save_model(job, state_dict, JOB_LIMITS.kept_models, JOB_LIMITS.kept_model_s)
        kind = ParallelCoordinator if cfg.scheme in PARALLEL_SCHEMES else Coordinator
        return kind(cfg, node.me(), node.discovery, node.client(), save_model, sizes=sizes)

    @serves("start_job")
    async def start_job(self, msg, request):
        coord = await self.coordinator(self.node.job_config(msg["config"]))
        self.coordinated[coord.job] = coord
        self._forget_old_jobs()
        queue: asyncio.Queue = asyncio.Queue()
        coord.listeners.add(queue)
        coord.task = asyncio.create_task(coord.run())
        try:
            while True:
                event = await queue.get()
                yield event
                if event["event"] in ("done", "failed"):
                    break
        finally:
            coord.listeners.discard(queue)

    def _forget_old_jobs(self) -> None:
        """Keep the last JOB_LIMITS.kept_jobs finished coordinations in memory (their models are on disk)."""
        finished = [j for j, c in self.coordinated.items() if c.task is not None and c.task.done()]
        for j in finished[:max(0, len(finished) - JOB_LIMITS.kept_jobs)]:
            del self.coordinated[j]

    @serves("plan_job")
    async def plan_job(self, msg, request):
        """Plan a job on the ring as it is now, without running it (for `splitring plan --peer`)."""
        coord = await self.coordinator(self.node.job_config(msg["config"]))
        plans = await coord.plan_only()
        return {"ring": [p["peer"] for p in coord.ring], "rotations": plans}

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
            except JobError as e:
                return json_error(502, "unreachable", f"the coordinator of job {job} did not answer: {e}")
        if coord is None:
            return json_error(404, "unknown_job", f"job {job} is not known to peer {node.peer_id}")
        if coord.task and not coord.task.done():
            log.warning("job %s: cancelled by a request from %s", job, request.remote)
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
