"""Job work, the /job/* calls every peer of a job serves: prepare, profile, commit (take ownership of a
rotation's layers), run a pass (streaming each step's report), swap layers, abort, end. This service owns
the job runtimes (peer.worker.JobRuntime) and hands them their data-plane messages (deliver)."""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import aiohttp
import torch
from aiohttp import web
from prometheus_client import Counter, Gauge

from peer import faults
from peer.limits import JOB_LIMITS
from peer.service import Service, serves
from peer.trace import KINDS
from peer.state import JOB_ID, StaleJournal, journal_problem, prune, write_atomic
from peer.client import JobError
from peer.parallel import ParallelRuntime
from peer.worker import JobRuntime, peak_rss
from pipeline.config import PARALLEL_SCHEMES, JobConfig
from pipeline.data import fits_model
from pipeline.jobplan import reports_step
from pipeline.models import footprint, input_shape, spec_hash
from pipeline.profiling import measure, microbatch_rows, optimizer_state_ratio
from protocols import ProtocolError

log = logging.getLogger("splitring.work")
TRACED_STEPS = 3   # how many steps of a stage's trace the dashboard is given
PARALLEL_MESSAGES = ("act", "grad")   # the client/helper schemes' data-plane messages; the others are N-split's


class WorkService(Service):
    def __init__(self, node):
        super().__init__(node)
        self.jobs: dict[str, JobRuntime] = {}
        self.held: dict[str, dict] = {}   # jobs whose coordinator fell silent: their state waits on disk for resume
        self.peak_memory = 0  # over every job this agent ran
        self.peak_stage = 0   # of which its stages' own (without the messages waiting unread)
        self.peak_unread = 0  # most data-plane messages of one job and kind that waited unread, over every job
        self.backpressure_waits = 0   # deliveries that waited for room in a mailbox, over every retired job
        self.m_peak = Gauge("splitring_stage_memory_peak_bytes", "most memory a stage of this agent has held",
                            registry=node.registry)
        self.m_held = Counter("splitring_jobs_held", "jobs this agent stopped working on because their "
                              "coordinator fell silent", registry=node.registry)
        self.m_seconds = Counter("splitring_stage_seconds", "seconds this agent's stages spent computing (busy), "
                                 "waiting for a message (wait) and handing one to the data plane (send) in training "
                                 "passes",
                                 ["kind"], registry=node.registry)
        self.watcher: asyncio.Task | None = None

    def other_routes(self):
        return [web.get("/job/{job}/params", self.params), web.get("/job/{job}/part", self.part)]

    def runtime(self, job: str, kind: type = object) -> JobRuntime | ParallelRuntime:
        rt = self.jobs.get(job)
        if rt is None:
            raise ProtocolError("unknown_job", f"job {job} is not known to peer {self.node.peer_id}")
        if not isinstance(rt, kind):
            raise ProtocolError("unexpected", f"job {job} runs scheme {rt.cfg.scheme}, which has no such call")
        return rt

    # --- what other services ask of this one ----------------------------------------------------
    async def deliver(self, sender: str, msg: dict) -> None:
        """A proven neighbour's stage message, once its job's mailbox has room (backpressure)."""
        kind = ParallelRuntime if msg["type"] in PARALLEL_MESSAGES else JobRuntime
        await self.runtime(msg["job"], kind).deliver(sender, msg)

    def status(self) -> dict:
        return {"peak_memory_bytes": max([self.peak_memory] + [rt.peak_memory for rt in self.jobs.values()]),
                "peak_stage_bytes": max([self.peak_stage] + [rt.peak_stage for rt in self.jobs.values()]),
                "peak_rss_bytes": peak_rss(),
                "peak_unread_messages": max([self.peak_unread] + [rt.mailbox.peak_unread for rt in self.jobs.values()]),
                "backpressure_waits": self.backpressure_waits + sum(rt.mailbox.waits for rt in self.jobs.values()),
                "stages": [rt.status() for rt in self.jobs.values()], "held": list(self.held.values())}

    async def start(self):
        self.watcher = asyncio.create_task(self.watch())

    async def watch(self, every: float = 0.5) -> None:
        """Stop working on a job whose coordinator has not been heard from for the job's peer_timeout (a
        coordinator heartbeats its own peer too): free its stage (its committed checkpoints stay on disk) and
        hold it for `splitring train --resume`. Nobody keeps a stage for a job nobody drives."""
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for job, rt in list(self.jobs.items()):
                silent = now - rt.heard
                if silent > rt.cfg.peer_timeout:
                    self.hold(job, f"its coordinator {rt.coordinator} was silent for {silent:.0f} s (peer_timeout "
                                   f"{rt.cfg.peer_timeout:.0f} s)")

    def retire(self, job: str):
        """Take a job's runtime out of service (ended, aborted, held or replaced), keeping its peaks in this
        agent's own; the runtime, or None."""
        rt = self.jobs.pop(job, None)
        if rt is not None:
            self.peak_memory = max(self.peak_memory, rt.peak_memory)
            self.peak_stage = max(self.peak_stage, rt.peak_stage)
            self.peak_unread = max(self.peak_unread, rt.mailbox.peak_unread)
            self.backpressure_waits += rt.mailbox.waits
            self.m_peak.set(self.peak_memory)
        return rt

    def hold(self, job: str, reason: str) -> None:
        """Stop working on a job and free its stage; its committed state stays on disk for resume."""
        rt = self.retire(job)
        if rt is None:
            return
        log.warning("job %s: stopped and held for resume: %s", job, reason)
        rt.abort(reason)
        self.held[job] = {"job": job, "coordinator": rt.coordinator, "rotation": rt.rotation, "reason": reason}
        self.m_held.inc()

    @serves("heartbeat")
    async def heartbeat(self, msg, request):
        """The coordinator's sign of life to a peer of its job; the reply says whether the peer still runs it."""
        rt = self.jobs.get(msg["job"])
        if rt is not None:
            rt.heard = time.monotonic()
        return {"known": rt is not None, "attempt": getattr(rt, "attempt", 0) if rt is not None else None}

    @serves("journal_put")
    async def journal_put(self, msg, request):
        """Keep the job's journal (the coordinator's record of its last commit) in this peer's state dir."""
        journal = msg["journal"]
        problem = journal_problem(journal)
        if problem or journal["job"] != msg["job"]:
            raise ProtocolError("malformed", f"not a journal of job {msg['job']}: {problem or 'another job'}")
        rt = self.jobs.get(msg["job"])
        if rt is not None:
            rt.heard = time.monotonic()
        try:
            await asyncio.to_thread(self.node.state.save_journal, msg["job"], journal)
        except StaleJournal as e:
            raise ProtocolError("stale", str(e)) from None
        if journal["state"] in ("done", "failed"):
            await asyncio.to_thread(self.node.state.prune_jobs, JOB_LIMITS.kept_job_files)
        return {"saved": True}

    @serves("replica_put")
    async def replica_put(self, msg, request):
        """Keep another peer's committed checkpoint, byte for byte, verified by its checksum once every piece
        has come."""
        data = msg["data"]
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ProtocolError("malformed", "a replica is the checkpoint file's bytes, a 1-D uint8 tensor")
        try:
            received, digest = await asyncio.to_thread(
                self.node.state.save_replica, msg["job"], msg["owner"], msg["version"], msg["attempt"],
                msg["offset"], msg["size"], data.numpy(), msg["checksum"])
        except ValueError as e:
            raise ProtocolError("malformed", str(e)) from None
        return {"received": received, "checksum": digest}

    def coordinator_of(self, job: str) -> dict | None:
        """The coordinator ({"peer", "url"}) of a job this peer works on, if it is another peer."""
        rt = self.jobs.get(job)
        if rt is None or rt.coordinator == self.node.peer_id:
            return None
        return {"peer": rt.coordinator, "url": rt.urls[rt.coordinator]}

    async def close(self):
        """Stop every job's work; their committed checkpoints are on disk already (a stage in the middle of a
        pass is at no committed version: nothing of it is written)."""
        if self.watcher:
            self.watcher.cancel()
        for rt in self.jobs.values():
            rt.abort("agent shutting down")

    # --- the calls ------------------------------------------------------------------------------
    @serves("prepare")
    async def prepare(self, msg, request):
        node = self.node
        if not JOB_ID.fullmatch(msg["job"]):
            raise ProtocolError("malformed", "a job id is 12 hexadecimal digits")
        cfg = node.job_config(msg["config"])
        mine = await asyncio.to_thread(spec_hash, cfg.model)
        if mine != msg["spec_hash"]:
            raise JobError(f"model spec hash differs: peer {node.peer_id} has {mine}, coordinator has "
                           f"{msg['spec_hash']}; run the same splitring version and model code on every peer")
        sizes = await asyncio.to_thread(footprint, cfg.model, JOB_LIMITS.max_layers)
        data = node.data.for_model(cfg.model)
        problem = fits_model(data, input_shape(cfg.model), sizes[-1][0])
        if problem:
            raise JobError(f"peer {node.peer_id}: {problem}")
        attempt = msg.get("attempt", 0)
        old = self.jobs.get(msg["job"])
        if old is not None and attempt <= getattr(old, "attempt", 0):
            raise ProtocolError("duplicate", f"job {msg['job']} is already prepared")
        if old is not None and old.coordinator != msg["coordinator"] and \
                time.monotonic() - old.heard < old.cfg.peer_timeout:
            raise JobError(f"job {msg['job']} is driven by its coordinator {old.coordinator}, heard from "
                           f"{time.monotonic() - old.heard:.0f} s ago: one coordinator per job")
        if old is not None:   # a peer that hung through the job's failure: its earlier attempt ends here
            self.retire(msg["job"]).abort(f"the job was resumed as attempt {attempt}")
        self.held.pop(msg["job"], None)
        if cfg.scheme in PARALLEL_SCHEMES:
            self.jobs[msg["job"]] = ParallelRuntime(msg["job"], cfg, node.peer_id, msg["ring"], msg["coordinator"],
                                                    data, node.links, node.compute_call, node.state,
                                                    node.memory_budget, sizes, node.pending_messages)
        else:
            rt = JobRuntime(msg["job"], cfg, node.peer_id, msg["ring"], msg["coordinator"], data, node.links,
                            node.client(), node.compute_call, node.state, node.memory_budget, sizes, attempt,
                            node.pending_messages)
            restored = None
            if "restore" in msg:
                r = msg["restore"]
                adopt = r.get("adopt", {})
                if not (type(r.get("version")) is int and type(r.get("attempt")) is int
                        and isinstance(r.get("checksums"), dict)
                        and isinstance(adopt, dict) and isinstance(adopt.get(node.peer_id, []), list)):
                    raise ProtocolError("malformed", "restore is {version, attempt, checksums, adopt: {peer: [lost "
                                                     "peer]}}")
                restored = await node.compute_call(rt.restore, r["version"], r["attempt"], r["checksums"],
                                                   adopt.get(node.peer_id, []))
            rt.heard = time.monotonic()   # (a restore may take longer than the coordinator's silence allows)
            self.jobs[msg["job"]] = rt
            if restored is not None:
                return {"samples": len(data), "test_samples": data.n_test, "restored": restored}
        return {"samples": len(data), "test_samples": data.n_test}

    @serves("profile")
    async def profile(self, msg, request):
        """What the planner needs from this peer for a job's model: its measured layer costs and budget."""
        node = self.node
        cfg = node.job_config(msg["config"])
        prof = await asyncio.get_running_loop().run_in_executor(node.compute, self.measured, cfg)
        data = node.data.for_model(cfg.model)
        return {"memory_budget": node.memory_budget, "profile": prof, "samples": len(data),
                "test_samples": data.n_test, "pending_messages": node.pending_messages}

    def measured(self, cfg: JobConfig) -> dict:
        """This machine's per-layer costs for a job's model (cached per spec, microbatch, optimizer, budget)."""
        node = self.node
        key = (f"v3-{spec_hash(cfg.model)}-{microbatch_rows(cfg)}-{optimizer_state_ratio(cfg)}-{cfg.seed}-"
               f"{node.memory_budget}")
        path = node.state.root / "profiles" / f"{key}.json"
        if path.exists():
            prof = json.loads(path.read_text())
        else:
            prof = measure(cfg, budget=node.memory_budget)
            write_atomic(path, json.dumps(prof).encode())
            prune(path.parent, "*.json", JOB_LIMITS.kept_profiles)
        for k in ("forward_s", "backward_s", "update_s"):
            prof[k] = [t * node.slowdown for t in prof[k]]
        return prof

    @serves("commit")
    async def commit(self, msg, request):
        """Take this rotation's layers, checkpoint them and replicate the checkpoint to the successor: the
        reply means this peer's part of the commit is durable twice over."""
        rt = self.runtime(msg["job"], JobRuntime)
        reply = await self.node.compute_call(rt.commit, msg["rotation"], msg["version"], msg["epoch"], msg["chain"],
                                             msg["ranges"], msg["head_samples"], msg["head_test_samples"],
                                             msg.get("backward_at", []))
        faults.reach("commit")
        await rt.replicate(reply["checksum"])
        return reply

    @serves("trace")
    async def trace(self, msg, request):
        rt = self.runtime(request.match_info["job"])
        spans = rt.trace.recent(TRACED_STEPS) if isinstance(rt, JobRuntime) else []
        return {"now": time.monotonic(), "spans": spans}

    @serves("run_pass")
    async def run_pass(self, msg, request):
        """Run this stage's part of a pass; each step's report is an event, then "end" or an error that
        says how the pass failed (cause_of)."""
        rt, mode = self.runtime(msg["job"], JobRuntime), msg["mode"]
        if msg["rotation"] != rt.rotation or mode not in ("train", "eval"):
            raise ProtocolError("stale", f"pass for rotation {msg['rotation']}; this stage is at {rt.rotation}")
        events: asyncio.Queue = asyncio.Queue()

        async def on_step(step, result, size, stage):
            if not reports_step(rt.cfg, mode, stage, len(rt.chain)):
                return
            ev = {"event": "stage_step", "step": step, "stage": stage, "staleness": result.staleness}
            if stage == len(rt.chain) - 1:   # the tail knows the loss
                loss = result.loss_sum / max(size, 1)
                if not math.isfinite(loss):
                    raise JobError(nonfinite_loss(loss, mode, step, rt))
                ev.update(event="step", steps=rt.progress["steps"], samples=result.samples, loss=loss,
                          correct=result.correct)
            events.put_nowait(ev)

        async for event in self.reported(rt, lambda: rt.run_pass(mode, on_step), events):
            if event.get("event") == "end" and mode == "train":   # (as the summary's stages count them)
                for kind in KINDS:
                    self.m_seconds.labels(kind).inc(event.get(f"{kind}_s", 0.0))
            yield event

    async def reported(self, rt, work, events: asyncio.Queue):
        """Run a pass or round (work(): its coroutine) as the runtime's task; yield the events it queues, then
        "end" with its result, or an error saying how it failed (cause_of). One at a time per runtime."""
        if rt.task is not None and not rt.task.done():
            raise ProtocolError("busy", f"job {rt.job} is already running a pass or round on peer {self.node.peer_id}")

        async def run():
            poller = asyncio.create_task(_poll()) if self.node.busy_poll else None
            try:
                events.put_nowait({"event": "end", **await work()})
            except (JobError, TimeoutError, ProtocolError, ConnectionError, aiohttp.ClientError) as e:
                log.error("job %s: failed: %s", rt.job, e)
                events.put_nowait({"error": str(e), "cause": cause_of(e)})
            except Exception as e:   # the stage's own computation failed: its real cause goes to the coordinator
                log.exception("job %s: failed", rt.job)
                events.put_nowait({"error": f"{type(e).__name__}: {e}", "cause": "job"})
            finally:
                if poller:
                    poller.cancel()
                events.put_nowait(None)
        rt.task = task = asyncio.create_task(run())
        task.add_done_callback(lambda t: aborted(events) if t.cancelled() else None)
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            task.cancel()

    # --- client/helper schemes ----------------------------------------------------------------------
    @serves("round_plan")
    async def round_plan(self, msg, request):
        rt = self.runtime(msg["job"], ParallelRuntime)
        return await self.node.compute_call(rt.plan, msg["round"], msg["assignment"], msg["orders"], msg["samples"],
                                            msg["test_samples"])

    @serves("run_round")
    async def run_round(self, msg, request):
        """Run this peer's part of a round; each client step is an event, then "end" with what was measured,
        or an error saying how the round failed."""
        rt, mode = self.runtime(msg["job"], ParallelRuntime), msg["mode"]
        if msg["round"] != rt.rotation or mode not in ("train", "eval"):
            raise ProtocolError("stale", f"round {msg['round']} ({mode}); this peer is at round {rt.rotation}")
        events: asyncio.Queue = asyncio.Queue()

        async def on_step(ev):
            if not math.isfinite(ev["loss"]):
                raise JobError(f"non-finite loss ({ev['loss']}) at step {ev['step'] + 1} of client {ev['client']} "
                               f"in round {rt.rotation + 1}: the job stops here; lower --lr, or check that peer's data")
            events.put_nowait(ev)

        async for event in self.reported(rt, lambda: rt.run_round(mode, on_step), events):
            yield event

    @serves("part_set")
    async def part_set(self, msg, request):
        rt = self.runtime(msg["job"], ParallelRuntime)
        return {"layers": await self.node.compute_call(rt.set_part, msg["round"], msg["layers"], msg["checksum"])}

    async def part(self, request):
        """A client/helper job's part of this peer, with the samples it trained on this round (CBOR)."""
        try:
            rt = self.runtime(request.match_info["job"], ParallelRuntime)
        except ProtocolError as e:
            return web.json_response({"error": e.code, "message": e.message}, status=400)
        if rt.task is not None and not rt.task.done():
            return web.json_response({"error": "busy", "message": "a round is running; its part is not ready"},
                                     status=409)
        part = await self.node.compute_call(rt.part)
        return web.Response(body=await self.node.codec.encode(part), content_type="application/cbor")

    @serves("swap_send")
    async def swap_send(self, msg, request):
        return await self.runtime(msg["job"], JobRuntime).swap_send(msg["rotation"], msg["moves"])

    @serves("swap_receive")
    async def swap_receive(self, msg, request):
        rt = self.runtime(msg["job"], JobRuntime)
        fault = faults.reach("swap_receive")
        if fault == "corrupt":
            faults.corrupt(msg["layers"])
        digest = await self.node.compute_call(rt.receive_layers, msg["rotation"], msg["attempt"], msg["layers"],
                                              msg["checksum"])
        return {"checksum": "0" * 64 if fault == "lie" else digest}

    @serves("abort")
    async def abort(self, msg, request):
        rt = self.retire(msg["job"])
        if rt:
            log.warning("job %s aborted: %s", msg["job"], msg["reason"])
            rt.abort(msg["reason"])
        return {"aborted": rt is not None}

    @serves("end")
    async def end(self, msg, request):
        return {"ended": self.retire(msg["job"]) is not None}

    async def params(self, request):
        """The layers this peer holds for a job (CBOR): what the coordinator collects at the end."""
        try:
            rt = self.runtime(request.match_info["job"])
        except ProtocolError as e:
            return web.json_response({"error": e.code, "message": e.message}, status=400)
        return web.Response(body=await self.node.codec.encode({"layers": rt.layers()}), content_type="application/cbor")


def aborted(events: asyncio.Queue) -> None:
    """A pass or round cancelled (aborted, or held when its coordinator fell silent), even before it began:
    its stream ends with an error, never as if it had finished."""
    events.put_nowait({"error": "the pass was aborted on this peer", "cause": "job"})
    events.put_nowait(None)


async def _poll():
    """Keep the event loop turning: with a task always ready it polls its sockets without sleeping."""
    while True:
        await asyncio.sleep(0)


def cause_of(e: Exception) -> str:
    """How a pass failed, for the coordinator to tell the root cause from its echoes: a stage's own error
    ("job"), or waiting on a neighbour that fell silent ("timeout"), or a broken link ("link")."""
    if isinstance(e, TimeoutError):
        return "timeout"
    return "link" if isinstance(e, (ConnectionError, aiohttp.ClientError)) else "job"


def nonfinite_loss(loss: float, mode: str, step: int, rt: JobRuntime) -> str:
    what = "training" if mode == "train" else "evaluation"
    return (f"non-finite loss ({loss}) at step {step + 1} of the {what} pass of rotation {rt.rotation} (epoch "
            f"{rt.epoch + 1}, head {rt.chain[0]}): the job stops here; lower --lr, or check "
            f"that peer's data")
