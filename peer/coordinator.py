"""Running a job from the peer that received it: snapshot the ring, prepare every peer, then for
each rotation commit an assignment (swapping layers in two phases), run the pass, and evaluate at
epoch ends. Emits progress events (dicts) as it goes."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import uuid
from dataclasses import replace

import aiohttp
import torch

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.models import num_layers, spec_hash
from pipeline.planner import Device, LayerCost, Plan, PlanInfeasible, over_budget, plan_chain
from pipeline.swaps import swap_moves
from peer.worker import JobError
from protocols import encode_frame, message

log = logging.getLogger("splitring.coordinator")


class Coordinator:
    def __init__(self, agent, cfg: JobConfig, job: str | None = None):
        self.agent, self.cfg = agent, cfg
        self.job = job or uuid.uuid4().hex[:12]
        self.events: list[dict] = []
        self.listeners: set[asyncio.Queue] = set()
        self.state_dict: dict | None = None
        self.ring: list[dict] = []
        self.summary: dict | None = None
        self.staleness: list[int] = []   # fast-async, per step: the most steps old any stage's forward weights were
        self.finished: list[list[tuple[float, int]]] = []   # per training pass: (time, samples) as each step ended
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
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise JobError(f"peer {peer['peer']} at {peer['url']} did not answer {path}: {e!r}") from None
        if r.status != 200:
            raise JobError(f"peer {peer['peer']} refused {path}: {reply.get('message', reply)}")
        return reply

    async def call_all(self, peers: list[dict], path: str, body_for) -> list[dict]:
        return await asyncio.gather(*(self.call(p, path, body_for(p)) for p in peers))

    # --- the job ------------------------------------------------------------------------------
    async def snapshot_ring(self) -> list[dict]:
        me = {"peer": self.agent.peer_id, "url": self.agent.url}
        seen = [{"peer": r.peer, "url": r.url} for r in self.agent.discovery.peers()]
        alive = [me]
        for p in seen:
            try:
                async with self.agent.session.get(p["url"] + "/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    st = await r.json()
                if st.get("peer") == p["peer"]:
                    alive.append(p)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                log.warning("peer %s at %s is not answering; left out of the ring", p["peer"], p["url"])
        return sorted(alive, key=lambda p: p["peer"])

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
        cfg, n_layers = self.cfg, num_layers(self.cfg.model)
        self.ring = ring = await self.snapshot_ring()
        ids = [p["peer"] for p in ring]
        by_id = {p["peer"]: p for p in ring}
        prep = message("job_prepare", job=self.job, config=cfg.to_dict(), ring=ring,
                       coordinator=self.agent.peer_id, spec_hash=spec_hash(cfg.model))
        await self.call_all(ring, "/job/prepare", lambda p: prep)
        devices, layers, replies = await self.gather_devices(ring)
        samples = {p: r["samples"] for p, r in replies.items()}
        tests = {p: r["test_samples"] for p, r in replies.items()}
        n = len(ring)
        rotations = [r for r in range(cfg.epochs * n) if samples[S.chain_order(ids, r)[0]] > 0]
        if not rotations:
            raise JobError("no peer of the ring has training data")
        try:
            S.Roles(n, cfg.remote_backward())
        except ValueError as e:
            raise JobError(f"a chain of {n} stages: {e}") from None
        steps_per_pass = {p: -(-samples[p] // cfg.batch_size) for p in ids}
        self.emit({"event": "started", "job": self.job, "ring": ids, "coordinator": self.agent.peer_id,
                   "layers": n_layers, "samples": samples, "config": cfg.to_dict(),
                   "total_steps": sum(steps_per_pass[S.chain_order(ids, r)[0]] for r in rotations)})
        assignment: dict[str, tuple[int, int]] | None = None
        total_samples, last_loss, accuracy = 0, None, None
        train_seconds, plans, steps_done = 0.0, [], 0
        for k, r in enumerate(rotations):
            chain = S.chain_order(ids, r)
            split, remote = self.plan_chain(chain, devices, layers, assignment)
            ranges = split.assignment
            plans.append({"rotation": r, "ranges": {k: list(v) for k, v in ranges.items()},
                          "predicted_step_s": split.step_s, "bytes_moved": split.bytes_moved if assignment else 0,
                          "backward_at": [[j, h] for j, h in remote.items()]})
            self.emit({"event": "plan", **plans[-1]})
            active = [p for p in chain if ranges[p][1] > ranges[p][0]]
            if remote and len(active) < n:
                raise JobError(f"--backward-at names chain positions, but the plan leaves {n - len(active)} peer(s) "
                               "without layers; use --split even")
            if assignment is not None:
                moves = swap_moves(assignment, ranges)
                senders = sorted({src for _, src, _ in moves})
                body = message("swap_send", job=self.job, rotation=r, moves=[list(m) for m in moves])
                await self.call_all([by_id[s] for s in senders], "/job/swap/send", lambda p: body)
                self.emit({"event": "swap", "rotation": r, "layers_moved": len(moves)})
            head = chain[0]
            commit = message("job_commit", job=self.job, rotation=r, chain=active,
                             ranges={p: list(v) for p, v in ranges.items()}, head_samples=samples[head],
                             head_test_samples=tests[head], backward_at=plans[-1]["backward_at"])
            await self.call_all(ring, "/job/commit", lambda p: commit)
            assignment = ranges
            epoch = r // n
            tp = time.perf_counter()
            steps = await self._pass(active, by_id, r, "train", epoch, remote)
            train_seconds += time.perf_counter() - tp
            steps_done += len(steps)
            total_samples += samples[head]
            if steps:
                last_loss = steps[-1]["loss"]
            if k == len(rotations) - 1 or rotations[k + 1] // n != epoch:  # the epoch's last pass
                accuracy = None
                if tests[head] > 0:
                    accuracy = await self._evaluate(active, by_id, r)
                self.emit({"event": "epoch", "epoch": epoch + 1, "loss": last_loss, "accuracy": accuracy,
                           "eval_peer": head if tests[head] else None})
        self.state_dict = await self._collect(ring)
        self.summary = {"job": self.job, "epochs": cfg.epochs, "final_loss": last_loss, "accuracy": accuracy,
                        "samples": total_samples, "samples_per_s": total_samples / max(train_seconds, 1e-9),
                        "steady_samples_per_s": steady_rate(self.finished),
                        "seconds": time.perf_counter() - t0, "ring": ids, "layers": n_layers,
                        "passes": len(rotations), "seconds_per_step": train_seconds / max(steps_done, 1),
                        "plans": plans, "bytes_moved": sum(p["bytes_moved"] for p in plans),
                        "split": cfg.split, "scheme": cfg.scheme, "pipeline": cfg.pipeline,
                        "microbatches": cfg.microbatches, "wire_dtype": cfg.wire_dtype, "compress": cfg.compress,
                        "max_staleness": cfg.max_staleness if cfg.scheme == "fast-async" else 0,
                        "staleness": self.staleness}
        await asyncio.gather(*(self.call(p, "/job/end", message("job_end", job=self.job)) for p in ring))
        self.emit({"event": "done", "summary": self.summary})

    async def _pass(self, active: list[str], by_id: dict, rotation: int, mode: str, epoch: int,
                    remote: dict[int, int] | None = None) -> list[dict]:
        """Start the pass on every stage; returns the step results the tail streams back."""
        results: list[dict] = []
        body = encode_frame(message("job_pass", job=self.job, rotation=rotation, mode=mode))
        t0 = time.perf_counter()
        seen = 0
        pending: dict[int, list[dict]] = {}   # step -> the stages' reports so far
        finished: list[tuple[float, int]] = []
        if mode == "train":
            self.finished.append(finished)

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
                self.staleness.append(staleness)
            finished.append((time.perf_counter(), tail["samples"]))
            self.emit({"event": "step", "epoch": epoch + 1, "rotation": rotation, "head": active[0],
                       "step": tail["step"] + 1, "steps": tail["steps"], "loss": tail["loss"], "staleness": staleness,
                       "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)})

        async def run(peer: str):
            nonlocal seen
            url = by_id[peer]["url"] + "/job/pass"
            try:
                async with self.agent.session.post(url, data=body, headers={"Content-Type": "application/cbor"},
                                                   timeout=aiohttp.ClientTimeout(total=None)) as r:
                    if r.status != 200:
                        raise JobError(f"peer {peer} refused the pass: {(await r.json()).get('message')}")
                    async for line in r.content:
                        ev = json.loads(line)
                        if "error" in ev:
                            raise JobError(f"peer {peer}: {ev['error']}")
                        if ev.get("event") == "step":
                            seen += ev["samples"]
                            results.append(ev)
                        if mode == "train" and ev.get("event") in ("step", "stage_step"):
                            report(ev)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise JobError(f"lost peer {peer} during the pass: {e!r}") from None

        tasks = [asyncio.create_task(run(p)) for p in active]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
        return results

    async def _evaluate(self, active, by_id, rotation) -> float:
        results = await self._pass(active, by_id, rotation, "eval", 0)
        return sum(e["correct"] for e in results) / max(sum(e["samples"] for e in results), 1)

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

    def model_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict, buf)
        return buf.getvalue()


def steady_rate(passes: list[list[tuple[float, int]]]) -> float | None:
    """Samples per second once each pass is running: from the end of its first step to the end of its last
    (the first step, which fills the pipeline and warms allocators, is left out, as benchmarks time a
    process after a warm-up step). None without a pass of two steps or more."""
    samples = sum(n for steps in passes for _, n in steps[1:])
    seconds = sum(steps[-1][0] - steps[0][0] for steps in passes if len(steps) > 1)
    return samples / seconds if samples and seconds > 0 else None
