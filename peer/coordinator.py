"""Running a job from the peer that received it: snapshot the ring, prepare every peer, then for
each rotation commit an assignment (swapping layers in two phases), run the pass, and evaluate at
epoch ends. Emits progress events (dicts) as it goes."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace

from collections import deque

import aiohttp
import torch

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.models import footprint, spec_hash
from pipeline.planner import Device, LayerCost, Plan, PlanInfeasible, moved_bytes, over_budget, plan_chain, too_big
from pipeline.profiling import optimizer_state_ratio
from pipeline.swaps import swap_moves
from peer.limits import JOB_LIMITS
from peer.worker import JobError
from protocols import encode_frame, message

log = logging.getLogger("splitring.coordinator")
EVENTS_KEPT = 256   # a job's last events, for /jobs/ID and /status (listeners get every one as it happens)
ECHO_S = 1.0        # after a stage's failure, how long to wait for the other stages' reports of it
SILENT_S = 2.0      # a peer that does not answer /status within this is named as the silent one


class Coordinator:
    """One job, coordinated from this agent. Nothing it keeps grows with the job's length: events are a
    window, fast-async's staleness a histogram, throughput a running sum, plans the first few; the
    finished model goes to the state dir (served from disk)."""

    def __init__(self, agent, cfg: JobConfig, job: str | None = None,
                 sizes: list[tuple[tuple[int, ...], int]] | None = None):
        self.agent, self.cfg = agent, cfg
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
    async def call(self, peer: dict, path: str, body: dict, timeout: float | None = 60) -> dict:
        session: aiohttp.ClientSession = self.agent.session
        try:
            async with session.post(peer["url"] + path, data=encode_frame(body),
                                    headers={"Content-Type": "application/cbor"},
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                reply = await r.json()
        except aiohttp.ContentTypeError:
            raise JobError(f"peer {peer['peer']} answered {path} with HTTP {r.status} and no explanation") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise JobError(f"peer {peer['peer']} at {peer['url']} did not answer {path}: {e!r}") from None
        if r.status != 200:
            raise JobError(f"peer {peer['peer']} refused {path}: {reply.get('message', reply)}")
        return reply

    async def call_all(self, peers: list[dict], path: str, body_for) -> list[dict]:
        return await asyncio.gather(*(self.call(p, path, body_for(p)) for p in peers))

    # --- the job ------------------------------------------------------------------------------
    async def status_of(self, peer: dict, timeout: float = 5) -> dict | None:
        """A peer's /status, or None if it does not answer as itself within `timeout` seconds."""
        try:
            async with self.agent.session.get(peer["url"] + "/status",
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                st = await r.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return st if isinstance(st, dict) and st.get("peer") == peer["peer"] else None

    async def snapshot_ring(self) -> list[dict]:
        """The peers that answer now, in ring order, with their memory budgets. Refused while two live agents
        share a peer id (as this agent or any member sees it)."""
        me = {"peer": self.agent.peer_id, "url": self.agent.url, "memory_budget": self.agent.memory_budget}
        seen = [{"peer": r.peer, "url": r.url} for r in self.agent.discovery.peers()]
        answers = await asyncio.gather(*(self.status_of(p) for p in seen))
        alive, conflicts = [me], list(self.agent.discovery.conflicts)
        for p, st in zip(seen, answers):
            if st is None:
                log.warning("peer %s at %s is not answering; left out of the ring", p["peer"], p["url"])
                continue
            alive.append({**p, "memory_budget": st.get("memory_budget")})
            conflicts += [c for c in st.get("conflicts", []) if c not in conflicts]
        if conflicts:
            raise JobError("two live agents share a peer id, so the ring cannot tell their data apart: "
                           + "; ".join(conflicts))
        return sorted(alive, key=lambda p: p["peer"])

    def check_fits(self, ring: list[dict]) -> None:
        """Refuse, before any peer builds a layer, a model whose parameters, gradients and optimizer state
        exceed the ring's memory budgets together, or have a layer no single peer can hold."""
        budgets = {p["peer"]: p.get("memory_budget") for p in ring}
        problem = too_big([b for _, b in self.sizes], optimizer_state_ratio(self.cfg), budgets)
        if problem:
            raise JobError(f"model {self.cfg.model['name']!r} cannot fit this ring: {problem}")

    async def gather_devices(self, ring: list[dict]) -> tuple[dict[str, Device], list[LayerCost], dict]:
        """Each peer's measured layer costs and budget, and a probe of its link: what the planner needs."""
        body = message("job_profile", config=self.cfg.to_dict())
        replies = dict(zip([p["peer"] for p in ring], await self.call_all(ring, "/job/profile", lambda p: body)))
        links = {p["peer"]: await self.probe_link(p) for p in ring}
        devices = {pid: Device(pid, memory_budget=r["memory_budget"], forward_s=tuple(r["profile"]["forward_s"]),
                               backward_s=tuple(r["profile"]["backward_s"]), bandwidth=links[pid][0],
                               latency=links[pid][1]) for pid, r in replies.items()}
        prof = replies[ring[0]["peer"]]["profile"]  # sizes are the same on every peer; times are each one's own
        layers = [LayerCost(f, b, pb, ob, ab) for f, b, pb, ob, ab in zip(
            prof["forward_s"], prof["backward_s"], prof["param_bytes"], prof["optim_bytes"], prof["activation_bytes"])]
        return devices, layers, replies

    async def probe_link(self, peer: dict, size: int = 1 << 21) -> tuple[float, float]:
        """(bytes/s, one-way seconds) between the coordinator and a peer: a small and a 2 MiB POST.
        A link between two peers is taken as the slower of their links to the coordinator (a star LAN)."""
        times = []
        for n in (1, size):
            t0 = time.perf_counter()
            async with self.agent.session.post(peer["url"] + "/probe", data=b"\0" * n) as r:
                await r.read()
            times.append(time.perf_counter() - t0)
        latency = times[0] / 2
        return size / max(times[1] - times[0], 1e-6), latency

    def plan_chain(self, chain: list[str], devices: dict[str, Device], layers: list[LayerCost],
                   previous: dict[str, tuple[int, int]] | None) -> tuple[Plan, dict[int, int]]:
        """The split of one rotation, and its remote backwards ({stage: host} chain positions): the
        planner's split (fewest bytes moved among the fastest), or an even split, checked against the
        same memory model with the remote backwards given, or placed (`--backward-at auto`)."""
        chained = [replace(devices[p], bandwidth=min(devices[p].bandwidth, devices[q].bandwidth))
                   for p, q in zip(chain, chain[1:] + chain[:1])]
        cfg = self.cfg
        try:
            p, remote = plan_chain(chained, layers, cfg.scheme, cfg.microbatches, cfg.max_staleness, cfg.split,
                                   "auto" if cfg.backward_at == "auto" else cfg.remote_backward(), previous)
        except PlanInfeasible as e:
            raise JobError(f"the ring cannot hold the model: {e}") from None
        if not p.fits:
            raise JobError(f"the {cfg.split} split does not fit the memory budgets"
                           f"{' with --backward-at' if cfg.backward_at else ''}: {over_budget(p)}")
        return p, remote

    async def plan_only(self) -> list[dict]:
        """Every rotation's plan for the ring as it is now (no job is started)."""
        self.ring = await self.snapshot_ring()
        self.check_fits(self.ring)
        devices, layers, _ = await self.gather_devices(self.ring)
        ids, plans, previous = [p["peer"] for p in self.ring], [], None
        for r in range(len(ids)):
            p, remote = self.plan_chain(S.chain_order(ids, r), devices, layers, previous)
            previous = p.assignment
            plans.append({**p.to_dict(), "backward_at": [[j, h] for j, h in remote.items()]})
        return plans

    async def run(self) -> None:
        t0 = time.perf_counter()
        try:
            await self._run(t0)
        except asyncio.CancelledError:
            await self._abort("job cancelled")
            self.emit({"event": "failed", "job": self.job, "error": "job cancelled"})
            raise
        except (JobError, ValueError) as e:
            await self._abort(str(e))
            self.emit({"event": "failed", "job": self.job, "error": str(e)})
        except Exception as e:  # a bug: still tell the CLI, and stop the peers
            log.exception("job %s failed", self.job)
            await self._abort(repr(e))
            self.emit({"event": "failed", "job": self.job, "error": repr(e)})

    async def _abort(self, reason: str):
        body = message("job_abort", job=self.job, reason=reason)
        await asyncio.gather(*(self.call(p, "/job/abort", body, timeout=5) for p in self.ring),
                             return_exceptions=True)

    async def _run(self, t0: float) -> None:
        cfg, n_layers = self.cfg, len(self.sizes)
        self.ring = ring = await self.snapshot_ring()
        self.check_fits(ring)
        ids = [p["peer"] for p in ring]
        by_id = {p["peer"]: p for p in ring}
        prep = message("job_prepare", job=self.job, config=cfg.to_dict(), ring=ring,
                       coordinator=self.agent.peer_id, spec_hash=spec_hash(cfg.model))
        await self.call_all(ring, "/job/prepare", lambda p: prep)
        devices, layers, replies = await self.gather_devices(ring)
        samples = {p: r["samples"] for p, r in replies.items()}
        tests = {p: r["test_samples"] for p, r in replies.items()}
        n = len(ring)
        heads = [r for r in range(n) if samples[S.chain_order(ids, r)[0]] > 0]   # the rotations that train
        if not heads:
            raise JobError("no peer of the ring has training data")
        try:
            S.Roles(n, cfg.remote_backward())
        except ValueError as e:
            raise JobError(f"a chain of {n} stages: {e}") from None
        steps_per_pass = {p: -(-samples[p] // cfg.batch_size) for p in ids}
        self.emit({"event": "started", "job": self.job, "ring": ids, "coordinator": self.agent.peer_id,
                   "urls": {p["peer"]: p["url"] for p in ring}, "missing": self.agent.discovery.missing(),
                   "layers": n_layers, "samples": samples, "config": cfg.to_dict(),
                   "total_steps": cfg.epochs * sum(steps_per_pass[S.chain_order(ids, r)[0]] for r in heads)})
        assignment: dict[str, tuple[int, int]] | None = None
        total_samples, last_loss, accuracy = 0, None, None
        train_seconds, plans, steps_done, bytes_moved = 0.0, [], 0, 0
        passes = cfg.epochs * len(heads)
        for k in range(passes):   # pass k: rotation r (epochs of n rotations, skipping heads without data)
            epoch = k // len(heads)
            r = epoch * n + heads[k % len(heads)]
            chain = S.chain_order(ids, r)
            split, remote = self.plan_chain(chain, devices, layers, assignment)
            ranges = split.assignment
            moved = moved_bytes(assignment, ranges, layers) if assignment else 0
            bytes_moved += moved
            plan = {"rotation": r, "ranges": {k: list(v) for k, v in ranges.items()},
                    "predicted_step_s": split.step_s, "bytes_moved": moved,
                    "backward_at": [[j, h] for j, h in remote.items()]}
            if len(plans) < JOB_LIMITS.summary_plans:
                plans.append(plan)
            self.emit({"event": "plan", **plan})
            active = [p for p in chain if ranges[p][1] > ranges[p][0]]
            if remote and len(active) < n:
                raise JobError(f"--backward-at names chain positions, but the plan leaves {n - len(active)} peer(s) "
                               "without layers; use --split even")
            if assignment is not None:
                moves = swap_moves(assignment, ranges)
                senders = sorted({src for _, src, _ in moves})
                body = message("swap_send", job=self.job, rotation=r, moves=[list(m) for m in moves])
                await self.call_all([by_id[s] for s in senders], "/job/swap/send", lambda p: body)
                self.emit({"event": "swap", "rotation": r, "layers_moved": len(moves), "bytes_moved": moved})
            head = chain[0]
            commit = message("job_commit", job=self.job, rotation=r, chain=active,
                             ranges={p: list(v) for p, v in ranges.items()}, head_samples=samples[head],
                             head_test_samples=tests[head], backward_at=plan["backward_at"])
            await self.call_all(ring, "/job/commit", lambda p: commit)
            assignment = ranges
            tp = time.perf_counter()
            steps, loss = await self._pass(active, by_id, r, "train", epoch, remote)
            train_seconds += time.perf_counter() - tp
            steps_done += steps
            total_samples += samples[head]
            last_loss = loss if loss is not None else last_loss
            if (k + 1) % len(heads) == 0:  # the epoch's last pass
                accuracy = None
                if tests[head] > 0:
                    accuracy = await self._evaluate(active, by_id, r)
                self.emit({"event": "epoch", "epoch": epoch + 1, "loss": last_loss, "accuracy": accuracy,
                           "eval_peer": head if tests[head] else None})
        model = await self._collect(ring)
        path = await asyncio.to_thread(self.agent.state.save_model, self.job, model, JOB_LIMITS.kept_models,
                                       JOB_LIMITS.kept_model_s)
        del model
        self.summary = {"job": self.job, "epochs": cfg.epochs, "final_loss": last_loss, "accuracy": accuracy,
                        "samples": total_samples, "samples_per_s": total_samples / max(train_seconds, 1e-9),
                        "steady_samples_per_s": self.steady.rate,
                        "seconds": time.perf_counter() - t0, "ring": ids, "layers": n_layers,
                        "passes": passes, "seconds_per_step": train_seconds / max(steps_done, 1),
                        "plans": plans, "bytes_moved": bytes_moved,
                        "split": cfg.split, "scheme": cfg.scheme, "pipeline": cfg.pipeline,
                        "microbatches": cfg.microbatches, "wire_dtype": cfg.wire_dtype, "compress": cfg.compress,
                        "max_staleness": cfg.max_staleness if cfg.scheme == "fast-async" else 0,
                        "staleness": self.staleness, "model_file": str(path)}
        await asyncio.gather(*(self.call(p, "/job/end", message("job_end", job=self.job)) for p in ring))
        self.emit({"event": "done", "summary": self.summary})

    async def _pass(self, active: list[str], by_id: dict, rotation: int, mode: str, epoch: int,
                    remote: dict[int, int] | None = None) -> tuple[int, float | None]:
        """Run the pass on every stage; returns (steps, last step's loss). Evaluation adds up into
        self.correct / self.evaluated. A failure raises the root cause (see root_cause)."""
        body = encode_frame(message("job_pass", job=self.job, rotation=rotation, mode=mode))
        t0 = time.perf_counter()
        seen, steps, loss = 0, 0, None
        pending: dict[int, list[dict]] = {}   # step -> the stages' reports so far
        self.correct = self.evaluated = 0
        if mode == "train":
            self.steady.new_pass()

        # programs that report each step: under fast-async every stage (and every remote backward role)
        reporting = S.Roles(len(active), remote).programs if self.cfg.scheme == "fast-async" else 1

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
            url = by_id[peer]["url"] + "/job/pass"
            try:
                async with self.agent.session.post(url, data=body, headers={"Content-Type": "application/cbor"},
                                                   timeout=aiohttp.ClientTimeout(total=None)) as r:
                    if r.status != 200:
                        raise PassFailed(peer, f"refused the pass: {(await r.json()).get('message')}", "job")
                    async for line in r.content:
                        ev = json.loads(line)
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
        answers = await asyncio.gather(*(self.status_of(p, timeout=SILENT_S) for p in peers))
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
            async with self.agent.session.get(f"{p['url']}/job/{self.job}/params") as r:
                if r.status != 200:
                    raise JobError(f"could not collect layers from {p['peer']}")
                layers = (await self.agent.codec.decode(await r.read(), 1 << 34))["layers"]
            for i, params in layers.items():
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
