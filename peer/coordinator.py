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

import aiohttp
import torch

from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.models import num_layers, spec_hash
from pipeline.swaps import even_split, swap_moves
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
        replies = dict(zip(ids, await self.call_all(ring, "/job/prepare", lambda p: prep)))
        samples = {p: r["samples"] for p, r in replies.items()}
        tests = {p: r["test_samples"] for p, r in replies.items()}
        n = len(ring)
        rotations = [r for r in range(cfg.epochs * n) if samples[S.chain_order(ids, r)[0]] > 0]
        if not rotations:
            raise JobError("no peer of the ring has training data")
        steps_per_pass = {p: -(-samples[p] // cfg.batch_size) for p in ids}
        self.emit({"event": "started", "job": self.job, "ring": ids, "coordinator": self.agent.peer_id,
                   "layers": n_layers, "samples": samples, "config": cfg.to_dict(),
                   "total_steps": sum(steps_per_pass[S.chain_order(ids, r)[0]] for r in rotations)})
        assignment: dict[str, tuple[int, int]] | None = None
        total_samples, last_loss, accuracy, swapped_bytes = 0, None, None, 0
        train_seconds = 0.0
        for r in rotations:
            chain = S.chain_order(ids, r)
            ranges = dict(zip(chain, even_split(n_layers, n)))
            active = [p for p in chain if ranges[p][1] > ranges[p][0]]
            if assignment is not None:
                moves = swap_moves(assignment, ranges)
                senders = sorted({src for _, src, _ in moves})
                body = message("swap_send", job=self.job, rotation=r, moves=[list(m) for m in moves])
                await self.call_all([by_id[s] for s in senders], "/job/swap/send", lambda p: body)
                self.emit({"event": "swap", "rotation": r, "layers_moved": len(moves)})
            head = chain[0]
            commit = message("job_commit", job=self.job, rotation=r, chain=active,
                             ranges={p: list(v) for p, v in ranges.items()}, head_samples=samples[head],
                             head_test_samples=tests[head])
            await self.call_all(ring, "/job/commit", lambda p: commit)
            assignment = ranges
            epoch = r // n
            tp = time.perf_counter()
            steps = await self._pass(active, by_id, r, "train", epoch)
            train_seconds += time.perf_counter() - tp
            total_samples += samples[head]
            if steps:
                last_loss = steps[-1]["loss"]
            epoch_end = r == rotations[-1] or rotations[rotations.index(r) + 1] // n != epoch
            if epoch_end:
                accuracy = None
                if tests[head] > 0:
                    accuracy = await self._evaluate(active, by_id, r)
                self.emit({"event": "epoch", "epoch": epoch + 1, "loss": last_loss, "accuracy": accuracy,
                           "eval_peer": head if tests[head] else None})
        self.state_dict = await self._collect(ring)
        self.summary = {"job": self.job, "epochs": cfg.epochs, "final_loss": last_loss, "accuracy": accuracy,
                        "samples": total_samples, "samples_per_s": total_samples / max(train_seconds, 1e-9),
                        "seconds": time.perf_counter() - t0, "ring": ids, "layers": n_layers,
                        "passes": len(rotations), "scheme": cfg.scheme, "pipeline": cfg.pipeline,
                        "microbatches": cfg.microbatches}
        await asyncio.gather(*(self.call(p, "/job/end", message("job_end", job=self.job)) for p in ring))
        self.emit({"event": "done", "summary": self.summary})

    async def _pass(self, active: list[str], by_id: dict, rotation: int, mode: str, epoch: int) -> list[dict]:
        """Start the pass on every stage; returns the step results the tail streams back."""
        results: list[dict] = []
        body = encode_frame(message("job_pass", job=self.job, rotation=rotation, mode=mode))
        t0 = time.perf_counter()
        seen = 0

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
                            if mode == "train":
                                self.emit({"event": "step", "epoch": epoch + 1, "rotation": rotation,
                                           "head": active[0], "step": ev["step"] + 1, "steps": ev["steps"],
                                           "loss": ev["loss"],
                                           "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)})
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
