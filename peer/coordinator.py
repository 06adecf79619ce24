"""Running a job from the peer that received it: snapshot the ring, prepare every peer, then for
each rotation commit an assignment (swapping layers in two phases), run the pass, and evaluate at
epoch ends. Emits progress events (dicts) as it goes."""
from __future__ import annotations

import asyncio
import itertools
import math
import logging
import time
import uuid

from collections import deque

import aiohttp
import torch

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.models import footprint, input_shape, spec_hash
from pipeline.jobplan import Facts, JobPlan, reporting_programs
from pipeline.planner import Device, LayerCost, too_big
from pipeline.profiling import microbatch_rows, optimizer_state_ratio
from peer.limits import JOB_LIMITS
from peer.client import JobError, PeerClient, Unanswered

log = logging.getLogger("splitring.coordinator")
EVENTS_KEPT = 256   # a job's last events, for /jobs/ID and /status (listeners get every one as it happens)
ECHO_S = 1.0        # after a stage's failure, how long to wait for the other stages' reports of it
SILENT_S = 2.0      # a peer that does not answer /status within this is named as the silent one


class Coordinator:
    """One job, coordinated from this agent. Nothing it keeps grows with the job's length: events are a
    window, fast-async's staleness a histogram, throughput a running sum, plans the first few; the
    finished model goes to the state dir (served from disk)."""

    def __init__(self, cfg: JobConfig, me: dict, view, client: PeerClient, save_model,
                 job: str | None = None, sizes: list[tuple[tuple[int, ...], int]] | None = None):
        """me: this peer ({"peer", "url", "memory_budget"}); view: who else is in the ring (peers(), conflicts,
        missing(), as peer.discovery.Discovery); client: calls to peers (peer.client.PeerClient);
        save_model(job, state_dict) -> path: where a finished model goes."""
        self.cfg, self.me, self.view, self.client, self.save_model = cfg, me, view, client, save_model
        self.job = job or uuid.uuid4().hex[:12]
        self.sizes = sizes if sizes is not None else footprint(cfg.model)   # per layer: output shape, param bytes
        self.events: deque[dict] = deque(maxlen=EVENTS_KEPT)
        self.listeners: set[asyncio.Queue] = set()
        self.ring: list[dict] = []
        self.summary: dict | None = None
        self.staleness: list[int] = []   # fast-async: how many steps had forward weights 0, 1, ... steps old
        self.steady = SteadyRate()
        self.correct = self.evaluated = 0   # the last evaluation's
        self.task: asyncio.Task | None = None

    # --- events -------------------------------------------------------------------------------
    def emit(self, event: dict) -> None:
        self.events.append(event)
        for q in self.listeners:
            q.put_nowait(event)

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
                               latency=links[pid][1]) for pid, r in replies.items()}
        prof = replies[ring[0]["peer"]]["profile"]  # sizes are the same on every peer; times are each one's own
        layers = [LayerCost(f, b, pb, ob, ab) for f, b, pb, ob, ab in zip(
            prof["forward_s"], prof["backward_s"], prof["param_bytes"], prof["optim_bytes"], prof["activation_bytes"])]
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
        t0 = time.perf_counter()
        try:
            await self._run(t0)
        except asyncio.CancelledError:
            await self._fail("job cancelled")
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
        finally:
            self.emit({"event": "failed", "job": self.job, "error": reason})

    async def _abort(self, reason: str):
        await asyncio.gather(*(self.client.call(p, "abort", timeout=5, job=self.job, reason=reason)
                               for p in self.ring), return_exceptions=True)

    async def _run(self, t0: float) -> None:
        cfg, n_layers = self.cfg, len(self.sizes)
        self.ring = ring = await self.snapshot_ring()
        self.check_fits(ring)
        by_id = {p["peer"]: p for p in ring}
        await self.call_all(ring, "prepare", job=self.job, config=cfg.to_dict(), ring=ring, coordinator=self.me["peer"],
                            spec_hash=spec_hash(cfg.model))
        facts = await self.gather_facts(ring)
        plan = JobPlan(cfg, facts)
        passes = iter(plan)   # the first pass is planned here, so a plan that cannot run fails before "started"
        first = next(passes)
        self.emit({"event": "started", "job": self.job, "ring": list(facts.ring), "coordinator": self.me["peer"],
                   "urls": {p["peer"]: p["url"] for p in ring}, "missing": self.view.missing(),
                   "layers": n_layers, "samples": facts.samples, "config": cfg.to_dict(),
                   "total_steps": plan.total_steps})
        total_samples, last_loss, accuracy = 0, None, None
        train_seconds, plans, steps_done, bytes_moved = 0.0, [], 0, 0
        for step in itertools.chain([first], passes):
            if len(plans) < JOB_LIMITS.summary_plans:
                plans.append(step.to_dict())
            bytes_moved += step.bytes_moved
            self.emit({"event": "plan", **step.to_dict()})
            if step.moves:
                senders = sorted({src for _, src, _ in step.moves})
                await self.call_all([by_id[s] for s in senders], "swap_send", job=self.job, rotation=step.rotation,
                                    moves=[list(m) for m in step.moves])
                self.emit({"event": "swap", "rotation": step.rotation, "layers_moved": len(step.moves),
                           "bytes_moved": step.bytes_moved})
            await self.call_all(ring, "commit", job=self.job, rotation=step.rotation, chain=step.active,
                                ranges={p: list(v) for p, v in step.ranges.items()},
                                head_samples=facts.samples[step.head], head_test_samples=facts.test_samples[step.head],
                                backward_at=step.to_dict()["backward_at"])
            tp = time.perf_counter()
            steps, loss = await self._pass(step.active, by_id, step.rotation, "train", step.epoch, step.backward_at)
            train_seconds += time.perf_counter() - tp
            steps_done += steps
            total_samples += facts.samples[step.head]
            last_loss = loss if loss is not None else last_loss
            if step.ends_epoch:
                accuracy = await self._evaluate(step.active, by_id, step.rotation) if step.evaluate else None
                self.emit({"event": "epoch", "epoch": step.epoch + 1, "loss": last_loss, "accuracy": accuracy,
                           "eval_peer": step.head if step.evaluate else None})
        model = await self._collect(ring)
        path = await asyncio.to_thread(self.save_model, self.job, model)
        del model
        self.summary = {"job": self.job, "epochs": cfg.epochs, "final_loss": last_loss, "accuracy": accuracy,
                        "samples": total_samples, "samples_per_s": total_samples / max(train_seconds, 1e-9),
                        "steady_samples_per_s": self.steady.rate,
                        "seconds": time.perf_counter() - t0, "ring": list(facts.ring), "layers": n_layers,
                        "passes": plan.passes, "seconds_per_step": train_seconds / max(steps_done, 1),
                        "plans": plans, "bytes_moved": bytes_moved,
                        "split": cfg.split, "scheme": cfg.scheme, "pipeline": cfg.pipeline,
                        "microbatches": cfg.microbatches, "wire_dtype": cfg.wire_dtype, "compress": cfg.compress,
                        "max_staleness": cfg.max_staleness if cfg.scheme == "fast-async" else 0,
                        "staleness": self.staleness, "model_file": str(path)}
        await self.call_all(ring, "end", job=self.job)
        self.emit({"event": "done", "summary": self.summary})

    async def _pass(self, active: list[str], by_id: dict, rotation: int, mode: str, epoch: int,
                    remote: dict[int, int] | None = None) -> tuple[int, float | None]:
        """Run the pass on every stage; returns (steps, last step's loss). Evaluation adds up into
        self.correct / self.evaluated. A failure raises the root cause (see root_cause)."""
        t0 = time.perf_counter()
        seen, steps, loss = 0, 0, None
        pending: dict[int, list[dict]] = {}   # step -> the stages' reports so far
        self.correct = self.evaluated = 0
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
            self.steady.step(time.perf_counter(), tail["samples"])
            self.emit({"event": "step", "epoch": epoch + 1, "rotation": rotation, "head": active[0],
                       "step": tail["step"] + 1, "steps": tail["steps"], "loss": tail["loss"], "staleness": staleness,
                       "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)})

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
                    if mode == "train" and ev.get("event") in ("step", "stage_step"):
                        report(ev)
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
        """One error for a failed pass: a stage's own error (its peer and cause) if any stage reported one;
        else the peers that no longer answer /status (hung, stopped or gone) named as the silent ones;
        else the first report."""
        own = [f for f in failures if isinstance(f, PassFailed) and f.cause == "job"]
        if own:
            return JobError(str(own[0]))
        answers = await asyncio.gather(*(self.client.status(p, timeout=SILENT_S) for p in peers))
        silent = [p["peer"] for p, st in zip(peers, answers) if st is None]
        if silent:
            return JobError(f"peer{'s' if len(silent) > 1 else ''} {', '.join(silent)} stopped answering (no "
                            f"reply to /status within {SILENT_S:.0f} s: hung, stopped or unreachable); "
                            f"reported: {failures[0]}")
        return JobError(str(failures[0]))

    async def _evaluate(self, active, by_id, rotation) -> float:
        await self._pass(active, by_id, rotation, "eval", 0)
        return self.correct / max(self.evaluated, 1)

    async def _collect(self, ring: list[dict]) -> dict:
        """Assemble the full model's state dict (keys as in build_model) from every stage."""
        state: dict[str, torch.Tensor] = {}
        for p in ring:
            for i, params in (await self.client.layers(p, self.job)).items():
                state.update({f"{i}.{k}": v.clone() for k, v in params.items()})
        return state


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
