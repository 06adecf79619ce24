"""Running a job from the peer that received it: snapshot the ring, prepare every peer, then for
each rotation commit an assignment (swapping layers in two phases), run the pass, and evaluate at
epoch ends. Emits progress events (dicts) as it goes."""
from __future__ import annotations

import asyncio
import copy
import math
import logging
import time
import uuid

from collections import deque
from dataclasses import asdict, dataclass, field, replace

import aiohttp
import torch

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.models import footprint, input_shape, spec_hash
from pipeline.jobplan import (Facts, JobPlan, facts_from_dict, facts_to_dict, holders, reporting_programs,
                              successor)
from pipeline.planner import Device, LayerCost, too_big
from pipeline.profiling import microbatch_rows, optimizer_state_ratio
from peer.limits import JOB_LIMITS
from peer import faults
from peer.client import JobError, PeerClient, Unanswered
from peer.trace import History, clock_offset, timeline, valid_spans

log = logging.getLogger("splitring.coordinator")
EVENTS_KEPT = 256   # a job's last events, for /jobs/ID and /status (listeners get every one as it happens)
ECHO_S = 1.0        # after a stage's failure, how long to wait for the other stages' reports of it
SILENT_S = 2.0      # a peer that does not answer a heartbeat within this is named as the silent one
MAX_RECOVERIES = 32  # peers lost in one job before it stops (resumable) rather than roll back again
TRANSFER_S = 600.0   # deadline of a call that moves or restores stage state (the heartbeats watch the peer meanwhile)
NOTED = ("lost", "rollback", "rejoined", "resumed", "replanned", "failed", "stopped")   # shown on a dashboard
HEADLINE = ("final_loss", "accuracy", "samples_per_s", "seconds", "epochs", "rounds")   # of a summary, in a list


class Coordinator:
    """One job, coordinated from this agent. Nothing it keeps grows with the job's length: events are a
    window, fast-async's staleness a histogram, throughput a running sum, plans the first few; the
    finished model goes to the state dir (served from disk)."""

    def __init__(self, cfg: JobConfig, me: dict, view, client: PeerClient, save_model,
                 job: str | None = None, sizes: list[tuple[tuple[int, ...], int]] | None = None,
                 journal: dict | None = None):
        """me: this peer ({"peer", "url", "memory_budget"}); view: who else is in the ring (peers(), conflicts,
        missing(), as peer.discovery.Discovery); client: calls to peers (peer.client.PeerClient);
        save_model(job, state_dict) -> path: where a finished model goes; journal: a job's journal, to resume
        it from its last commit."""
        self.cfg, self.me, self.view, self.client, self.save_model = cfg, me, view, client, save_model
        self.job = journal["job"] if journal else (job or uuid.uuid4().hex[:12])
        self.journal = journal
        self.attempt = journal["attempt"] + 1 if journal else 0   # resumptions: a new attempt after each failure
        self.prepared: float | None = None   # when every peer had a runtime of this attempt (None: not yet)
        self.facts: Facts | None = None
        self.progress = Progress()
        self.watched: list[dict] = []   # the peers heartbeaten (see _watched)
        self.recoveries: list[dict] = (journal or {}).get("recoveries", [])
        self.lost_at: float | None = None
        self.stop_reason = "job stopped"
        self.sizes = sizes if sizes is not None else footprint(cfg.model)   # per layer: output shape, param bytes
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.listeners: set[asyncio.Queue] = set()
        self.observers: list = []   # callables given each event as it is emitted (the agent's metrics)
        self.ring: list[dict] = []
        self.summary: dict | None = None
        self.staleness: list[int] = []   # fast-async: how many steps had forward weights 0, 1, ... steps old
        self.steady = SteadyRate()
        self.history = History()   # loss, samples/s and accuracy over the job, for the dashboard and plots
        self.t0 = time.perf_counter()
        self.current_pass: dict | None = None   # the pass running now: its plan (the plan event's fields)
        self.timeline: dict | None = None  # one training step of every stage, at the job's end
        self.latest: dict[str, dict] = {}   # the latest event of each kind
        self._live: tuple[float, dict] | None = None   # (when, timeline) for watchers, fetched at most once a second
        self._live_lock = asyncio.Lock()
        self.correct = self.evaluated = self.loss_sum = 0   # the last evaluation's (loss: summed per sample)
        self.task: asyncio.Task | None = None

    # --- events -------------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        self.latest[event["event"]] = event
        self.events.append(event)
        for q in self.listeners:
            q.put_nowait(event)
        for observe in self.observers:
            observe(event)

    # --- calls to peers -----------------------------------------------------------------------
    async def call_all(self, peers: list[dict], name: str, **fields) -> list[dict]:
        """Every peer's reply; the first failure is raised once no call is left in flight (so an abort that
        follows cannot overtake a call still on its way)."""
        replies = await asyncio.gather(*(self.client.call(p, name, **fields) for p in peers), return_exceptions=True)
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        return replies

    # --- the job ------------------------------------------------------------------------------
    async def snapshot_ring(self) -> list[dict]:
        """The peers that answer now, in ring order, with their memory budgets. Refused while two live agents
        share a peer id (as this agent or any member sees it)."""
        seen = [{"peer": r.peer, "url": r.url} for r in self.view.peers()]
        answers = await asyncio.gather(*(self.client.status(p) for p in seen))
        alive, conflicts = [dict(self.me)], list(self.view.conflicts)
        for p, st in zip(seen, answers):
            if st is None:
                log.warning("peer %s at %s is not answering; left out of the ring", p["peer"], p["url"])
                continue
            alive.append({**p, "memory_budget": st.get("memory_budget"), "role": st.get("role"),
                          "samples": st.get("data", {}).get("samples", 0)})
            conflicts += [c for c in st.get("conflicts", []) if c not in conflicts]
        if conflicts:
            raise JobError("two live agents share a peer id, so the ring cannot tell their data apart: "
                           + "; ".join(conflicts))
        return sorted(alive, key=lambda p: p["peer"])

    def check_fits(self, ring: list[dict]) -> None:
        """Refuse, before any peer builds a layer, a model whose parameters, gradients and optimizer state
        exceed the ring's memory budgets together, or have a layer no single peer can hold."""
        budgets = {p["peer"]: p.get("memory_budget") for p in ring}
        shapes = [input_shape(self.cfg.model)] + [shape for shape, _ in self.sizes]
        rows = microbatch_rows(self.cfg)
        acts = [rows * 4 * (math.prod(a) + math.prod(b)) for a, b in zip(shapes, shapes[1:])]
        problem = too_big([b for _, b in self.sizes], optimizer_state_ratio(self.cfg), budgets, acts)
        if problem:
            raise JobError(f"the ring cannot hold the model {self.cfg.model['name']!r}: {problem}")

    async def gather_devices(self, ring: list[dict]) -> tuple[dict[str, Device], list[LayerCost], dict]:
        """Each peer's measured layer costs and budget, and a probe of its link: what the planner needs."""
        replies = dict(zip([p["peer"] for p in ring], await self.call_all(ring, "profile", config=self.cfg.to_dict())))
        links = {p["peer"]: await self.client.probe_link(p) for p in ring}
        devices = {pid: Device(pid, memory_budget=r["memory_budget"], forward_s=tuple(r["profile"]["forward_s"]),
                               backward_s=tuple(r["profile"]["backward_s"]), bandwidth=links[pid][0],
                               latency=links[pid][1], pending_messages=r["pending_messages"])
                   for pid, r in replies.items()}
        prof = replies[ring[0]["peer"]]["profile"]  # sizes are the same on every peer; times are each one's own
        saved = [max(s) for s in zip(*(r["profile"].get("saved_bytes") or [0] * len(prof["param_bytes"])
                                       for r in replies.values()))]   # (0: not built there)
        layers = [LayerCost(f, b, pb, ob, ab, sb) for f, b, pb, ob, ab, sb in zip(
            prof["forward_s"], prof["backward_s"], prof["param_bytes"], prof["optim_bytes"], prof["activation_bytes"],
            saved)]
        return devices, layers, replies

    async def gather_facts(self, ring: list[dict]) -> Facts:
        devices, layers, replies = await self.gather_devices(ring)
        return Facts(tuple(p["peer"] for p in ring), devices, layers,
                     {p: r["samples"] for p, r in replies.items()}, {p: r["test_samples"] for p, r in replies.items()})

    async def plan_only(self) -> list[dict]:
        """Every rotation's plan for the ring as it is now (no job is started)."""
        self.ring = await self.snapshot_ring()
        self.check_fits(self.ring)
        plan = JobPlan(self.cfg, await self.gather_facts(self.ring))
        return [{**p.split.to_dict(), "bytes_moved": p.bytes_moved, "backward_at": p.to_dict()["backward_at"]}
                for p in plan.one_epoch()]

    async def run(self) -> None:
        t0 = self.t0 = time.perf_counter()
        self.emit({"event": "accepted", "job": self.job})
        try:
            await self._run(t0)
        except asyncio.CancelledError:
            await self._stop(self.stop_reason)
            raise
        except Unanswered as e:   # a call that timed out: name whichever peer stopped answering
            await self._fail(str(await self.root_cause([e], self.ring)))
        except (JobError, ValueError) as e:
            await self._fail(str(e))
        except Exception as e:  # a bug: still tell the CLI, and stop the peers
            log.exception("job %s failed", self.job)
            await self._fail(repr(e))

    async def _fail(self, reason: str):
        """Stop every stage, then say so: the failed event is emitted even if a cancel interrupts the abort
        (else whoever follows the job would wait for it forever)."""
        try:
            await self._abort(reason)
            await self._record("failed", error=reason)
        finally:
            self.emit({"event": "failed", "job": self.job, "error": reason, "resumable": self.journal is not None})

    async def _stop(self, reason: str):
        """A stop asked for (Ctrl-C, `splitring cancel`): free every stage, keep the journal: resumable."""
        try:
            await self._abort(reason)
            await self._record("stopped", error=reason)
        finally:
            rotation = self.journal["rotation"] if self.journal else None
            self.emit({"event": "stopped", "job": self.job, "rotation": rotation, "reason": reason,
                       "resumable": self.journal is not None})

    async def _abort(self, reason: str):
        await asyncio.gather(*(self.client.call(p, "abort", timeout=5, job=self.job, reason=reason)
                               for p in self.ring), return_exceptions=True)

    # --- watching the peers of a job ------------------------------------------------------------
    async def _watched(self, coro):
        """Run coro while heartbeating the peers in self.watched; a peer that answers none for the job's
        peer_timeout, or answers that it no longer knows the job (restarted), ends coro with PeerLost."""
        lost = asyncio.get_running_loop().create_future()
        self.watched = []
        watch = asyncio.create_task(self._watch(lost))
        work = asyncio.create_task(coro)
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                raise lost.result()
            return work.result()
        finally:
            watch.cancel()
            work.cancel()

    async def _watch(self, lost: asyncio.Future) -> None:
        timeout = self.cfg.peer_timeout
        every = min(1.0, timeout / 4)
        heard: dict[str, float] = {}
        beats: set[asyncio.Task] = set()

        async def beat(p: dict):
            sent = time.monotonic()
            try:
                r = await self.client.call(p, "heartbeat", timeout=timeout / 2, job=self.job)
            except JobError:
                return
            heard[p["peer"]] = time.monotonic()
            # a peer prepared for this attempt before the heartbeat left that no longer runs it has restarted
            if self.prepared is not None and sent > self.prepared and r["attempt"] != self.attempt \
                    and not lost.done():
                lost.set_result(PeerLost(p["peer"], "no longer runs the job (it restarted)"))

        try:
            while not lost.done():
                now = time.monotonic()
                for p in self.watched:
                    last = heard.setdefault(p["peer"], now)
                    if now - last > timeout and not lost.done():
                        lost.set_result(PeerLost(p["peer"], f"answered no heartbeat for {now - last:.1f} s "
                                                            f"(peer_timeout {timeout:.0f} s): hung, stopped or cut off"))
                for p in self.watched:
                    task = asyncio.create_task(beat(p))
                    beats.add(task)
                    task.add_done_callback(beats.discard)
                await asyncio.sleep(every)
        finally:
            for task in beats:
                task.cancel()

    # --- the journal ----------------------------------------------------------------------------
    def journal_record(self, state: str, **extra) -> dict:
        j = self.journal or {}
        return {**j, "job": self.job, "state": state, "attempt": self.attempt, "coordinator": self.me["peer"],
                "coordinator_url": self.me["url"], "config": self.cfg.to_dict(), "ring": self.ring,
                "recoveries": self.recoveries, "updated": time.time(), **extra}

    async def _record(self, state: str, **extra) -> None:
        """Write the journal's state to every peer that answers (a stop or failure: best effort)."""
        if self.journal is None:
            return
        self.journal = self.journal_record(state, **extra)
        await asyncio.gather(*(self.client.call(p, "journal_put", timeout=5, job=self.job, journal=self.journal)
                               for p in self.ring), return_exceptions=True)

    async def _commit_journal(self, step, version: int, checksums: dict) -> None:
        """The commit point: once every peer has checkpointed (and replicated) commit `version`, of `step`,
        record it on every peer. Rolling back means going back to the last such record."""
        self.journal = self.journal_record("running", version=version, commit_attempt=self.attempt,
                                           rotation=step.rotation, ranges={p: list(r) for p, r in step.ranges.items()},
                                           checksums=checksums, progress=asdict(self.progress))
        await self.call_all(self.ring, "journal_put", job=self.job, journal=self.journal)

    # --- the job --------------------------------------------------------------------------------
    async def _run(self, t0: float) -> None:
        """Attempts until the job ends: after a lost peer, the next attempt resumes from the last commit."""
        if self.journal is not None:
            await self._resume()
        while True:
            try:
                await self._watched(self._attempt(t0))
                return
            except PeerLost as e:
                if self.journal is None:   # lost before the job began: nothing to roll back to
                    raise
                await self._recover(e)

    async def _begin(self) -> None:
        """A new job: snapshot the ring, prepare and profile every peer, plan; the journal starts here."""
        self.ring = ring = await self.snapshot_ring()
        if any(p.get("memory_budget") is not None for p in ring):   # evaluating holds no more than training
            self.cfg = replace(self.cfg, eval_batch=min(self.cfg.eval_batch, microbatch_rows(self.cfg)))
        cfg = self.cfg
        self.check_fits(ring)
        self.watched = list(ring)   # from before prepare: see WorkService.watch
        await self.call_all(ring, "prepare", timeout=TRANSFER_S, job=self.job, config=cfg.to_dict(), ring=ring,
                            coordinator=self.me["peer"], spec_hash=spec_hash(cfg.model))
        self.prepared = time.monotonic()
        self.facts = await self.gather_facts(ring)
        plan = JobPlan(cfg, self.facts)
        plan.check()   # a pass that cannot run fails before "started"
        self.emit_started(plan)
        self.journal = self.journal_record("running", version=None, commit_attempt=None, rotation=None, ranges={},
                                           checksums={}, lost=[], skipped=[], facts=facts_to_dict(self.facts),
                                           progress=asdict(self.progress))
        await self.call_all(ring, "journal_put", job=self.job, journal=self.journal)

    async def _resume(self) -> None:
        """A job resumed from its journal (`splitring train --resume`): its peers, each given rejoin_timeout
        to answer; at most one may be missing, and the job goes on without it."""
        j = self.journal
        self.facts = facts_from_dict(j["facts"])
        self.ring = [dict(p) for p in j["ring"]]
        answered = await asyncio.gather(*(self._rejoin(p["peer"]) for p in self.ring))
        missing = [p["peer"] for p, ok in zip(self.ring, answered) if not ok]
        if len(missing) > 1:
            raise JobError(f"peers {', '.join(missing)} did not answer within {self.cfg.rejoin_timeout:.0f} s: "
                           f"the job can go on without one lost peer, not more; start them with their state dirs "
                           f"and resume again")
        self.emit_started(JobPlan(self.cfg, self.facts, j["lost"]))
        for peer in missing:
            self._go_on_without(peer)
        self.emit({"event": "resumed", "rotation": j["rotation"], "attempt": self.attempt})

    def emit_started(self, plan: JobPlan) -> None:
        self.emit({"event": "started", "job": self.job, "ring": [p["peer"] for p in self.ring],
                   "coordinator": self.me["peer"], "urls": {p["peer"]: p["url"] for p in self.ring},
                   "missing": self.view.missing(), "layers": len(self.sizes), "samples": self.facts.samples,
                   "config": self.cfg.to_dict(), "total_steps": plan.total_steps,
                   "done_steps": self.journal["progress"]["steps"] if self.journal else 0,
                   "attempt": self.attempt})

    async def _attempt(self, t0: float) -> None:
        """Run the job from its last commit to its end (the whole job on a first attempt)."""
        try:
            if self.journal is None:
                await self._begin()
            await self._passes(t0)
        except PeerLost:
            raise
        except JobError as e:   # any failure while a peer is gone (a refusal may be an echo of it) is its loss
            raise await self.root_cause([e], self.ring) from None

    async def _prepare_attempt(self) -> None:
        """A new attempt after a rollback or for --resume: recorded first (so that a coordinator resuming the
        job after this one counts on), then every peer restores the last commit (a lost peer's layers from
        the replica its successor keeps)."""
        cfg, j, ring = self.cfg, self.journal, self.ring
        await self._record("running")
        adopt: dict[str, list] = {}
        for peer in j["lost"]:
            if peer in j["checksums"]:
                adopt.setdefault(successor(self.facts.ring, peer, j["lost"]), []).append(peer)
        restore = {"restore": {"version": j["version"], "attempt": j["commit_attempt"], "checksums": j["checksums"],
                               "adopt": adopt}} if j["version"] is not None else {}
        replies = await self.call_all(ring, "prepare", timeout=TRANSFER_S, job=self.job, config=cfg.to_dict(),
                                      ring=ring, coordinator=self.me["peer"], spec_hash=spec_hash(cfg.model),
                                      attempt=self.attempt, **restore)
        if self.lost_at is not None and restore:   # what each peer restored, for the report
            self.recoveries[-1]["restored"] = {p["peer"]: r.get("restored") for p, r in zip(ring, replies)}
        self.prepared = time.monotonic()

    async def _passes(self, t0: float) -> None:
        cfg, j = self.cfg, self.journal
        plan = JobPlan(cfg, self.facts, j["lost"])
        if j["version"] is None:   # the first attempt, or nothing committed yet: every peer builds its layers
            passes, version = iter(plan), 0
        else:   # every peer restores the last commit, then goes on from there
            passes, version = plan.resume(j["rotation"], holders(j["ranges"], self.facts.ring, j["lost"])), \
                j["version"] + 1
        ring = self.ring
        by_id = {p["peer"]: p for p in ring}
        self.watched = list(ring)   # from before prepare (see WorkService.watch); itself too, so a stage of a job
        if self.prepared is None:   # whose coordination ended is freed here as anywhere
            await self._prepare_attempt()
        prog = self.progress = Progress(**copy.deepcopy(j["progress"]))   # (the journal's own stays as it was)
        self.history.cut("job_step", prog.steps)   # after a rollback: the steps done again replace those undone
        for step in passes:
            if len(prog.plans) < JOB_LIMITS.summary_plans:
                prog.plans.append(step.to_dict())
            prog.bytes_moved += step.bytes_moved
            self.current_pass = {**step.to_dict(), "chain": step.active, "epoch": step.epoch,
                            "predicted": {s.peer: {"compute_s": s.compute_s, "send_s": s.send_s}
                                          for s in step.split.stages}}
            self.emit({"event": "plan", **step.to_dict()})
            if faults.reach("rotation") == "hold":
                await faults.hold()
            tc = time.perf_counter()
            await self._commit(step, version, by_id)
            prog.commit_seconds += time.perf_counter() - tc
            version += 1
            if self.lost_at is not None:
                self.recoveries[-1]["recovery_s"] = time.monotonic() - self.lost_at
                self.lost_at = None
            tp = time.perf_counter()
            steps, loss = await self._pass(step.active, by_id, step.rotation, "train", step.epoch, step.backward_at)
            prog.train_seconds += time.perf_counter() - tp
            prog.steps += steps
            prog.samples += self.facts.samples[step.head]
            prog.last_loss = loss if loss is not None else prog.last_loss
            if step.ends_epoch:
                prog.accuracy = await self._evaluate(step.active, by_id, step.rotation) if step.evaluate else None
                point = {"seconds": time.perf_counter() - self.t0, "job_step": prog.steps, "epoch": step.epoch + 1,
                         "loss": prog.last_loss, "accuracy": prog.accuracy,
                         "held_out_loss": prog.held_out_loss if step.evaluate else None}
                self.history.add("epochs", point)
                self.emit({"event": "epoch", **point, "eval_peer": step.head if step.evaluate else None})
        self.timeline = await self.traces(self.current_pass["chain"] if self.current_pass else [], by_id)
        model = await self._collect(ring)
        path = await asyncio.to_thread(self.save_model, self.job, model)
        del model
        self.summary = self.summarize(plan, t0, str(path))
        # the model is saved: the job is done, whatever happens to a peer from here on
        self.watched, self.prepared = [], None
        await self._record("done", model_file=str(path))
        await asyncio.gather(*(self.client.call(p, "end", timeout=10, job=self.job) for p in ring),
                             return_exceptions=True)
        self.emit({"event": "done", "summary": self.summary})

    async def _commit(self, step, version: int, by_id: dict) -> None:
        """The swap into `step` (moving layers to their new owners), every peer's commit of it (checkpoint and
        replica), then the journal: commit number `version` of the job."""
        ring = self.ring
        if step.moves:
            senders = sorted({src for _, src, _ in step.moves})
            await self.call_all([by_id[s] for s in senders], "swap_send", timeout=TRANSFER_S, job=self.job,
                                rotation=step.rotation, moves=[list(m) for m in step.moves])
            self.emit({"event": "swap", "rotation": step.rotation, "layers_moved": len(step.moves),
                       "bytes_moved": step.bytes_moved})
        replies = await self.call_all(ring, "commit", timeout=TRANSFER_S, job=self.job, rotation=step.rotation,
                                      version=version, epoch=step.epoch, chain=step.active,
                                      ranges={p: list(v) for p, v in step.ranges.items()},
                                      head_samples=self.facts.samples[step.head],
                                      head_test_samples=self.facts.test_samples[step.head],
                                      backward_at=step.to_dict()["backward_at"])
        await self._commit_journal(step, version, {p["peer"]: r["checksum"] for p, r in zip(ring, replies)})

    def summarize(self, plan: JobPlan, t0: float, model_file: str) -> dict:
        cfg, prog = self.cfg, self.progress
        language = len(self.sizes[-1][0]) > 1   # scores at every position: a language model
        return {"job": self.job, "epochs": cfg.epochs, "final_loss": prog.last_loss, "accuracy": prog.accuracy,
                "held_out_loss": prog.held_out_loss,
                "perplexity": math.exp(min(prog.held_out_loss, 700)) if language and prog.held_out_loss is not None
                else None,
                "samples": prog.samples, "samples_per_s": prog.samples / max(prog.train_seconds, 1e-9),
                "steady_samples_per_s": self.steady.rate,
                "seconds": time.perf_counter() - t0, "ring": [p["peer"] for p in self.ring],
                "layers": len(self.sizes), "passes": len(plan.schedule()),
                "seconds_per_step": prog.train_seconds / max(prog.steps, 1), "commit_seconds": prog.commit_seconds,
                "plans": prog.plans, "bytes_moved": prog.bytes_moved,
                "split": cfg.split, "scheme": cfg.scheme, "pipeline": cfg.pipeline,
                "microbatches": cfg.microbatches, "wire_dtype": cfg.wire_dtype, "compress": cfg.compress,
                "max_staleness": cfg.max_staleness if cfg.scheme == "fast-async" else 0,
                "staleness": self.staleness, "model_file": model_file,
                "attempts": self.attempt + 1, "recoveries": self.recoveries, "lost": self.journal["lost"],
                "skipped": self.journal["skipped"], "history": self.history.to_dict(), "stages": prog.stages,
                "timeline": self.timeline}

    async def job_view(self, after: dict) -> dict:
        """What a dashboard shows of this job: its facts, the pass running now with its plan, the history
        points past `after` (series -> seconds of the last point the watcher has), each stage's time per
        kind so far, one recent step of every stage (the timeline) and, once done, the summary's headline."""
        last = self.events[-1] if self.events else {}
        running = self.task is not None and not self.task.done()
        if running and self.current_pass:
            async with self._live_lock:   # one fetch for every watcher, at most once a second
                now = time.monotonic()
                if self._live is None or now - self._live[0] > 1.0:
                    self._live = (now, await self.traces(self.current_pass["chain"], {p["peer"]: p for p in self.ring}))
            timeline_now = self._live[1]
        else:
            timeline_now = self.timeline
        ring = self.latest.get("replanned") or self.latest.get("started", {})   # (going on without a lost peer)
        after = {k: v for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"job": self.job, "attempt": self.attempt, "scheme": self.cfg.scheme, "coordinator": self.me["peer"],
                "state": "running" if running else last.get("event", "starting"), "ring": ring.get("ring", []),
                "total_steps": ring.get("total_steps"), "current": self.current_pass,
                "last_step": self.latest.get("step"), "notes": [e for e in self.events if e["event"] in NOTED][-8:],
                "schedule": self.latest.get("schedule"),
                "history": {name: self.history.points(name, after.get(name)) for name in self.history.series},
                "stages": self.progress.stages, "timeline": timeline_now,
                "summary": {k: self.summary.get(k) for k in HEADLINE} if self.summary else None}

    async def traces(self, peers: list[str], by_id: dict) -> dict:
        """One training step of each of these peers' stages (their latest, as they traced it), on this
        peer's clock (peer.trace.timeline): for the summary's and the dashboard's timeline."""
        async def one(peer: str):
            sent = time.monotonic()
            reply = await self.client.call(by_id[peer], "trace", timeout=5, params={"job": self.job})
            return valid_spans(reply["spans"]), clock_offset(sent, time.monotonic(), reply["now"])
        replies = await asyncio.gather(*(one(p) for p in peers), return_exceptions=True)
        got = {p: r for p, r in zip(peers, replies) if not isinstance(r, BaseException)}
        return timeline({p: r[0] for p, r in got.items()}, {p: r[1] for p, r in got.items()})

    # --- recovery -------------------------------------------------------------------------------
    async def _recover(self, e: "PeerLost") -> None:
        """Roll back to the last commit: free every stage, wait (rejoin_timeout) for the lost peer to come
        back with its state dir; if it does not, go on without it. The next attempt restores every stage
        from its checkpoint (and the lost peer's layers from their replica)."""
        self.lost_at = time.monotonic()
        self.recoveries.append({"peer": e.peer, "error": str(e), "rotation": self.journal["rotation"],
                                "ranges": self.journal["ranges"], "attempt": self.attempt, "at": time.time()})
        self.current_pass = None   # (its chain names the lost peer: nothing to trace until the next pass)
        self.emit({"event": "lost", "peer": e.peer, "error": str(e)})
        if len(self.recoveries) > MAX_RECOVERIES:
            raise JobError(f"{len(self.recoveries)} peers lost in one job; the job stops here (resumable): {e}")
        await self._abort(f"peer {e.peer} was lost; the job rolls back to its last commit")
        self.prepared = None
        self.emit({"event": "rollback", "rotation": self.journal["rotation"]})
        if not await self._rejoin(e.peer):
            self._go_on_without(e.peer)
        self.attempt += 1
        self.emit({"event": "resumed", "rotation": self.journal["rotation"], "attempt": self.attempt})

    def _go_on_without(self, peer: str) -> None:
        """A lost peer that did not come back: the job goes on on the others, from the last commit (its layers
        from the replica its successor keeps); its own passes are skipped from then on."""
        j = self.journal
        if j["lost"]:
            raise JobError(f"peer {peer} is lost too, after {', '.join(j['lost'])}: the job can go on without one "
                           f"lost peer, not more; it is held at its last commit: start {peer} with its state dir "
                           f"and run `splitring train --resume {self.job}`")
        before, after = JobPlan(self.cfg, self.facts), JobPlan(self.cfg, self.facts, [peer])
        start = j["rotation"] if j["rotation"] is not None else -1
        kept = {r for _, r, _ in after.schedule()}
        skipped = [{"peer": peer, "epoch": e, "rotation": r} for e, r, _ in before.schedule()
                   if r >= start and r not in kept]
        survivors = [p for p in self.ring if p["peer"] != peer]
        self.check_fits(survivors)   # (the model, and the first pass left if any: a ring too small fails here)
        next(after.resume(start, holders(j["ranges"], self.facts.ring, [peer])), None)
        self.ring, self.journal = survivors, {**j, "lost": [peer], "skipped": skipped}
        self.emit({"event": "replanned", "lost": [peer], "ring": [p["peer"] for p in self.ring],
                   "skipped": skipped, "total_steps": after.total_steps})

    async def _rejoin(self, peer: str) -> bool:
        """Wait up to rejoin_timeout for a peer of the job to answer as itself, at its last address or any
        address discovery has seen it at since. Whether it did."""
        entry = next(p for p in self.ring if p["peer"] == peer)
        if peer == self.me["peer"]:   # (a coordinator resuming a job it is a peer of: here, at its address now)
            entry["url"] = self.me["url"]
            return True
        deadline = time.monotonic() + self.cfg.rejoin_timeout
        while True:
            urls = [entry["url"]] + [r.url for r in self.view.peers() if r.peer == peer and r.url != entry["url"]]
            for url in urls:
                if await self.client.status({"peer": peer, "url": url}, timeout=2) is not None:
                    entry["url"] = url
                    self.emit({"event": "rejoined", "peer": peer})
                    return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)

    async def _pass(self, active: list[str], by_id: dict, rotation: int, mode: str, epoch: int,
                    remote: dict[int, int] | None = None) -> tuple[int, float | None]:
        """Run the pass on every stage; returns (steps, last step's loss). Evaluation adds up into
        self.correct / self.evaluated. A failure raises the root cause (see root_cause)."""
        t0 = time.perf_counter()
        seen, steps, loss = 0, 0, None
        pending: dict[int, list[dict]] = {}   # step -> the stages' reports so far
        self.correct = self.evaluated = self.loss_sum = 0
        if mode == "train":
            self.steady.new_pass()

        reporting = reporting_programs(self.cfg, S.Roles(len(active), remote))

        def report(ev: dict):
            """A step is reported once every reporting stage is done with it: the loss comes from the tail,
            fast-async's staleness from every stage."""
            got = pending.setdefault(ev["step"], [])
            got.append(ev)
            if len(got) < reporting:
                return
            tail = next(e for e in pending.pop(ev["step"]) if e["event"] == "step")
            staleness = max(e["staleness"] for e in got)
            if self.cfg.scheme == "fast-async":
                self.staleness += [0] * (staleness + 1 - len(self.staleness))
                self.staleness[staleness] += 1
            now = time.perf_counter()
            self.steady.step(now, tail["samples"])
            point = {"seconds": now - self.t0, "job_step": self.progress.steps + tail["step"] + 1, "epoch": epoch + 1,
                     "rotation": rotation, "loss": tail["loss"], "samples_per_s": seen / max(now - t0, 1e-9)}
            self.history.add("steps", point)
            self.emit({"event": "step", **point, "head": active[0], "step": tail["step"] + 1, "steps": tail["steps"],
                       "staleness": staleness})

        async def run(peer: str):
            nonlocal seen, steps, loss
            try:
                async for ev in self.client.stream(by_id[peer], "run_pass", job=self.job, rotation=rotation, mode=mode):
                    if "error" in ev:
                        raise PassFailed(peer, ev["error"], ev.get("cause", "job"))
                    if ev.get("event") == "step":
                        seen += ev["samples"]
                        steps, loss = steps + 1, ev["loss"]
                        self.correct += ev["correct"]
                        self.evaluated += ev["samples"]
                        self.loss_sum += ev["loss"] * ev["samples"]
                    if mode == "train" and ev.get("event") in ("step", "stage_step"):
                        report(ev)
                    if mode == "train" and ev.get("event") == "end":
                        self.progress.add_stage(peer, ev)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise PassFailed(peer, f"its connection to the coordinator broke during the pass ({e!r})",
                                 "link") from None

        tasks = [asyncio.create_task(run(p)) for p in active]
        try:
            done, rest = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failures = [t.exception() for t in done if t.exception()]
            if failures:   # the other stages' reports of the same failure follow within moments
                more, _ = await asyncio.wait(rest, timeout=ECHO_S) if rest else (set(), set())
                failures += [t.exception() for t in more if not t.cancelled() and t.exception()]
                raise await self.root_cause(failures, [by_id[p] for p in active])
        finally:
            for t in tasks:
                t.cancel()
        return steps, loss

    async def root_cause(self, failures: list[Exception], peers: list[dict]) -> JobError:
        """One error for a failed pass or call: a peer that no longer answers (hung, stopped or gone) or no
        longer runs the job (restarted) is lost (PeerLost: the job can recover); else a stage's own error
        (its peer and cause) if any stage reported one; else the first report."""
        async def attempt_of(p: dict) -> int | None:
            try:
                return (await self.client.call(p, "heartbeat", timeout=SILENT_S, job=self.job))["attempt"]
            except JobError:
                return None
        others = [p for p in peers if p["peer"] != self.me["peer"]]
        answers = await asyncio.gather(*(attempt_of(p) for p in others))
        silent = [p["peer"] for p, a in zip(others, answers) if a is None]
        if silent:
            return PeerLost(silent[0], f"stopped answering (no reply within {SILENT_S:.0f} s: hung, stopped or "
                                       f"unreachable); reported: {failures[0]}")
        # (a peer refusing before every peer was prepared, e.g. a restore it cannot make, has not restarted)
        restarted = [p["peer"] for p, a in zip(others, answers) if a != self.attempt and self.prepared is not None]
        if restarted:
            return PeerLost(restarted[0], f"no longer runs the job (it restarted); reported: {failures[0]}")
        own = [f for f in failures if isinstance(f, PassFailed) and f.cause == "job"]
        return JobError(str(own[0] if own else failures[0]))

    async def _evaluate(self, active, by_id, rotation) -> float:
        """Held-out accuracy (a language model's: of its next-token predictions); the held-out loss goes to
        progress.held_out_loss."""
        await self._pass(active, by_id, rotation, "eval", 0)
        self.progress.held_out_loss = self.loss_sum / max(self.evaluated, 1)
        return self.correct / max(self.evaluated, 1)

    async def _collect(self, ring: list[dict]) -> dict:
        """Assemble the full model's state dict (keys as in build_model) from every stage."""
        state: dict[str, torch.Tensor] = {}
        for p in ring:
            for i, params in (await self.client.layers(p, self.job)).items():
                state.update({f"{i}.{k}": v.clone() for k, v in params.items()})
        return state


class PeerLost(JobError):
    """A peer of the job is gone, hung or restarted: the job rolls back to its last commit."""

    def __init__(self, peer: str, text: str):
        super().__init__(f"peer {peer} {text}")
        self.peer = peer


@dataclass
class Progress:
    """What a job has done, as of its last commit (kept in the journal, so a resumed job reports the whole)."""
    samples: int = 0
    steps: int = 0
    train_seconds: float = 0.0
    commit_seconds: float = 0.0   # swaps, commits (checkpoint and replica) and journal writes
    bytes_moved: int = 0
    last_loss: float | None = None
    accuracy: float | None = None
    held_out_loss: float | None = None   # mean per sample (a language model's: per token)
    plans: list = field(default_factory=list)
    stages: dict = field(default_factory=dict)   # peer -> seconds busy, waiting and sending, and steps, in training

    def add_stage(self, peer: str, end: dict) -> None:
        """A stage's report at the end of its pass (JobRuntime.run_pass): time summed, peaks kept."""
        mine = self.stages.setdefault(peer, {"busy_s": 0.0, "wait_s": 0.0, "send_s": 0.0, "steps": 0,
                                             "peak_memory_bytes": 0, "peak_stage_bytes": 0, "peak_swap_bytes": 0,
                                             "peak_rss_bytes": 0, "swap_spills": 0})
        for k in ("busy_s", "wait_s", "send_s", "steps"):
            mine[k] += end.get(k, 0)
        for k in ("peak_memory_bytes", "peak_stage_bytes", "peak_swap_bytes", "peak_rss_bytes", "swap_spills"):
            mine[k] = max(mine.get(k, 0), end.get(k, 0))


class PassFailed(JobError):
    """A stage's report that its pass failed: its peer, what it said, and how (peer.agent.cause_of)."""

    def __init__(self, peer: str, text: str, cause: str):
        super().__init__(f"peer {peer}: {text}")
        self.peer, self.cause = peer, cause


class SteadyRate:
    """Samples per second once each pass is running: from the end of its first step to the end of its last
    (the first step, which fills the pipeline and warms allocators, is left out, as benchmarks time a
    process after a warm-up step). A running sum: nothing kept per step."""

    def __init__(self):
        self.samples, self.seconds = 0, 0.0
        self._last: float | None = None

    def new_pass(self) -> None:
        self._last = None

    def step(self, at: float, samples: int) -> None:
        if self._last is not None:
            self.samples += samples
            self.seconds += at - self._last
        self._last = at

    @property
    def rate(self) -> float | None:
        """None without a pass of two steps or more."""
        return self.samples / self.seconds if self.samples and self.seconds > 0 else None
