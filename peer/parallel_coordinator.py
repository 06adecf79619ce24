"""Coordinating a client/helper job (sl, splitfed-v1, splitfed-v2) from the peer that received it: roles,
measured costs, the client-to-helper schedule (pipeline/scheduling), then each round: every peer's round
facts, the round itself, averaging (or sl's relay), held-out accuracy, and a re-solve when the measured
makespan drifts from the prediction. See docs/parallel-sl.md."""
from __future__ import annotations

import asyncio
import math
import time
from urllib.parse import urlsplit

from peer.client import JobError
from peer.coordinator import ECHO_S, Coordinator, PassFailed
from peer.dataplane import tensor_bytes
from peer.limits import JOB_LIMITS
from pipeline.data import num_steps
from pipeline.models import spec_hash
from pipeline.parallel import (Costs, ParallelError, build_instance, drifted, fedavg, helper_orders,
                               measured_instance, parts, predict_round, round_sizes, solve_with, split_roles,
                               transfer_s)
from pipeline.profiling import optimizer_state_ratio
from pipeline.scheduling import Infeasible
from pipeline.scheduling.solution import BACKWARD, FORWARD
from pipeline.stage import checksum

KIND = {FORWARD: "F", BACKWARD: "B"}
SLOWEST_LINK = 1e6   # bytes/s: a part's transfer is given the time it takes at this rate, and a minute more


def part_timeout(layers) -> float:
    return 60 + tensor_bytes(layers) / SLOWEST_LINK


class ParallelCoordinator(Coordinator):

    async def plan_only(self) -> list[dict]:
        raise JobError("splitring plan is for the N-split schemes; a client/helper job reports its schedule as "
                       "it starts (the 'schedule' event)")

    async def _run(self, t0: float) -> None:
        """The rounds, every peer heartbeaten: a lost peer fails the job (recovery is N-split's for now)."""
        await self._watched(self._rounds(t0))

    async def _rounds(self, t0: float) -> None:
        cfg = self.cfg
        self.ring = ring = await self.snapshot_ring()
        clients, helpers = split_roles(cfg, ring)
        p = parts(cfg, len(self.sizes))
        by_id = {q["peer"]: q for q in ring}
        peers = [by_id[x] for x in clients + helpers]
        self.ring = peers   # only they are prepared, and aborted on failure
        self.watched = list(peers)   # from before prepare (see WorkService.watch)
        prepared = await self.call_all(peers, "prepare", job=self.job, config=cfg.to_dict(), ring=peers,
                                       coordinator=self.me["peer"], spec_hash=spec_hash(cfg.model))
        self.prepared = time.monotonic()   # from here, a peer that no longer runs the job has restarted
        samples = {x: r["samples"] for x, r in zip(clients + helpers, prepared) if x in clients}
        tests = {x: r["test_samples"] for x, r in zip(clients + helpers, prepared) if x in clients}
        costs, prof = await self.measure(peers)
        shapes = [shape for shape, _ in self.sizes]
        cut_bytes = (cfg.batch_size * 4 * math.prod(shapes[p.a - 1]),
                     cfg.batch_size * 4 * math.prod(shapes[p.b - 1]) if p.u_shaped else 0)
        inst = build_instance(cfg, p, [costs[j] for j in clients], [costs[h] for h in helpers], cut_bytes,
                              prof["param_bytes"], optimizer_state_ratio(cfg), prof["activation_bytes"])
        links = [[1000 * transfer_s(cut_bytes[0], costs[j], costs[h]) for h in helpers] for j in clients]
        schedule = self.solve(inst, clients, helpers)
        sl = cfg.scheme == "sl"
        # sl: the client part (with its optimizer state) goes through this peer from each client to the next
        part_bytes = sum(sum(prof["param_bytes"][a:b]) for a, b in p.client) * (1 + optimizer_state_ratio(cfg))
        # the relay's seconds per round, for the prediction: estimated from the part's bytes, then as last measured
        relay_s = sum(2 * (costs[j].latency + part_bytes / costs[j].bandwidth) for j in clients[1:]) if sl else 0.0
        per_round = sum(cfg.local_steps or num_steps(samples[j], cfg.batch_size) for j in clients)
        self.emit({"event": "started", "job": self.job, "ring": [q["peer"] for q in peers],
                   "coordinator": self.me["peer"], "urls": {q["peer"]: q["url"] for q in peers},
                   "missing": self.view.missing(), "layers": len(self.sizes), "samples": samples,
                   "config": cfg.to_dict(), "total_steps": per_round * cfg.rounds,
                   "clients": clients, "helpers": helpers, "labels": p.labels()})
        loss, accuracy, trained, resolved, all_bytes = None, None, 0, False, 0
        train_seconds = 0.0
        for rnd in range(cfg.rounds):
            assignment, orders = schedule
            sizes = [round_sizes(samples[j], cfg, rnd) for j in clients]
            predicted = predict_round(inst, assignment, orders, sizes, cfg.batch_size, sl) / 1000 + relay_s
            plan = {"assignment": {j: helpers[h] for j, h in zip(clients, assignment)},
                    "orders": {helpers[h]: [[clients[j], KIND[k]] for j, k in order] for h, order in enumerate(orders)}}
            if rnd == 0 or resolved:
                self.emit({"event": "schedule", "round": rnd, **plan, "predicted_s": predicted, "resolved": resolved})
            t_round = time.perf_counter()
            await self.call_all(peers, "round_plan", job=self.job, round=rnd, **plan, samples=samples,
                                test_samples=tests)
            tr = time.perf_counter()
            ends, reports, losses, moved, relayed_s = await self._round(rnd, clients, by_id, plan,
                                                                        {j: len(v) for j, v in zip(clients, sizes)})
            relay_s = relayed_s if sl else 0.0
            makespan = max(ends.values())
            train_seconds += time.perf_counter() - tr
            moved += await self._average(rnd, clients, helpers, by_id)
            round_s = time.perf_counter() - t_round   # the round with its averaging (evaluation left out)
            if any(tests.values()):
                accuracy = await self._evaluate_round(rnd, clients, helpers, by_id)
            n = sum(w for _, w in losses)
            trained += n
            loss = sum(v * w for v, w in losses) / n if n else loss
            busy = {h: sum(t["end"] - t["start"] for t in reports[h]["tasks"]) / makespan
                    for h in helpers if h in reports}
            data_bytes = sum(self._data_bytes(p, shapes, v) for v in sizes)
            ran = {h: [[t["client"], t["kind"]] for t in reports[h]["tasks"] if t["step"] == 0] for h in helpers
                   if h in reports}
            all_bytes += data_bytes + moved
            record = {"round": rnd, "seconds": time.perf_counter() - self.t0, "loss": loss, "accuracy": accuracy,
                      "makespan_s": makespan, "predicted_s": predicted,
                      "round_s": round_s, "helper_busy": busy, "bytes": data_bytes + moved, "resolved": resolved,
                      "helper_compute_s": {h: sum(t["end"] - t["start"] for t in reports[h]["tasks"])
                                           for h in helpers if h in reports}}
            self.emit({"event": "round", **record, **plan, "ran": ran})
            # the summary keeps the rounds' figures (at most 1000, evenly spread: peer.trace.History), and the
            # schedules of the first rounds (and re-solved ones)
            self.history.add("rounds", {**record, **plan, "ran": ran} if rnd < JOB_LIMITS.summary_plans or resolved
                             else record)
            # what this round measured replaces the instance's times; a drift from the prediction re-solves,
            # and the new schedule is taken if it is predicted to be shorter on the measured times
            seen = self.measured(reports, clients, helpers, assignment, links, sizes, cfg.batch_size, p.u_shaped, sl)
            inst = measured_instance(inst, assignment, seen)
            resolved = False
            if cfg.scheme != "sl" and drifted(predicted, makespan, cfg.resolve_drift) and rnd + 1 < cfg.rounds:
                new = self.solve(inst, clients, helpers)
                nxt = [round_sizes(samples[j], cfg, rnd + 1) for j in clients]
                resolved = predict_round(inst, *new, nxt, cfg.batch_size) < \
                    predict_round(inst, *schedule, nxt, cfg.batch_size)
                schedule = new if resolved else schedule
        model = await self._collect([by_id[clients[0]], by_id[helpers[schedule[0][0]]]])
        path = await asyncio.to_thread(self.save_model, self.job, model)
        self.summary = {"job": self.job, "scheme": cfg.scheme, "rounds": cfg.rounds,
                        "final_loss": loss, "accuracy": accuracy, "samples": trained,
                        "samples_per_s": trained / max(train_seconds, 1e-9), "seconds": time.perf_counter() - t0,
                        "ring": [q["peer"] for q in peers], "clients": clients, "helpers": helpers,
                        "cut": [p.a, p.b], "labels": p.labels(), "assign": cfg.assign,
                        "local_steps": cfg.local_steps, "layers": len(self.sizes), "history": self.history.to_dict(),
                        "bytes_per_round": all_bytes / cfg.rounds,
                        "model_file": str(path)}
        await self.call_all(peers, "end", job=self.job)
        self.emit({"event": "done", "summary": self.summary})

    # --- facts ------------------------------------------------------------------------------------
    async def measure(self, peers: list[dict]) -> tuple[dict[str, Costs], dict]:
        """Each peer's per-layer costs (the existing profile, at the job's batch size) and link. Peers that
        share a host are profiled one at a time (at once, they would time each other's contention, which
        the round does not have to the same degree); hosts at once."""
        hosts: dict[str, list[dict]] = {}
        for q in peers:
            hosts.setdefault(urlsplit(q["url"]).hostname, []).append(q)

        async def one_by_one(group):
            return [(q["peer"], await self.client.call(q, "profile", config=self.cfg.to_dict())) for q in group]
        found = dict(x for group in await asyncio.gather(*map(one_by_one, hosts.values())) for x in group)
        replies = [found[q["peer"]] for q in peers]
        costs = {}
        for q, r in zip(peers, replies):
            bw, lat = await self.client.probe_link(q)
            prof = r["profile"]
            costs[q["peer"]] = Costs(tuple(prof["forward_s"]),   # a backward task includes the update
                                     tuple(b + u for b, u in zip(prof["backward_s"], prof["update_s"])), bw, lat,
                                     r["memory_budget"])
        return costs, replies[0]["profile"]

    def solve(self, inst, clients: list[str], helpers: list[str]) -> tuple[list[int], list[list[tuple[int, int]]]]:
        """(helper of each client, each helper's task order). sl: every client on the one helper that finishes
        them soonest in turn."""
        try:
            if self.cfg.scheme == "sl":
                fits = [h for h in range(inst.helpers) if max(inst.demand) <= inst.capacity[h]]   # one at a time
                if not fits:
                    raise Infeasible("no helper can hold part 2 for the clients in turn")
                best = min(fits, key=lambda h: predict_round(inst, [h] * inst.clients, [], [[1]] * inst.clients, 1, True))
                return [best] * inst.clients, [[] for _ in helpers]
            s = solve_with(inst, self.cfg.assign, self.cfg.seed)
        except Infeasible as e:
            room = sum(int(c // d) for c, d in zip(inst.capacity, inst.demand)) if self.cfg.scheme != "sl" else 0
            raise ParallelError(f"the helpers cannot hold the clients' part 2: each client's needs "
                                f"{inst.demand[0]:.0f} KiB on its helper, the helpers have room for "
                                f"{', '.join(f'{c:.0f}' for c in inst.capacity)} KiB, so at most {room} of the "
                                f"{len(clients)} clients fit ({e}); add helpers or memory, or use fewer clients") from None
        return list(s.assignment), helper_orders(s, inst.helpers)

    @staticmethod
    def measured(reports: dict, clients: list[str], helpers: list[str], assignment: list[int],
                 links: list[list[float]], sizes: list[list[int]], batch_size: int, u_shaped: bool,
                 in_turn: bool) -> dict[int, dict[str, float]]:
        """Per client, the round's measured times (ms) on its helper: the instance's five columns, each task's
        scaled to a full batch (sizes[j]: the rows of client j's batches this round). Release: when the helper
        got the first activations after the round started; clients in turn (sl): the client's part-1 forward
        and the link's estimate. Delay: single cut, none (the helper's wait between its tasks is queueing)."""
        seen = {}
        for j, c in enumerate(clients):
            h = assignment[j]
            full = lambda step: batch_size / sizes[j][step]
            tasks = [t for t in reports.get(helpers[h], {}).get("tasks", []) if t["client"] == c]
            times = reports.get(c, {}).get("client_times", [])
            fw = {t["step"]: t for t in tasks if t["kind"] == "F"}
            bw = {t["step"]: t for t in tasks if t["kind"] == "B"}
            if not fw or set(fw) != set(bw) or len(times) != len(fw):
                continue
            mean = lambda values: 1000 * sum(values) / len(values)
            part1 = mean([t["part1_forward"] * full(s) for s, t in enumerate(times)])
            seen[j] = {"release": part1 + links[j][h] if in_turn else 1000 * full(0) * max(0.0, fw[0]["arrived"]),
                       "forward": mean([(t["end"] - t["start"]) * full(s) for s, t in fw.items()]),
                       "delay": mean([max(0.0, bw[s]["arrived"] - t["end"]) * full(s) for s, t in fw.items()])
                       if u_shaped else 0.0,
                       "backward": mean([(t["end"] - t["start"]) * full(s) for s, t in bw.items()]),
                       "tail": mean([t["part1_backward"] * full(s) for s, t in enumerate(times)]) + links[j][h]}
        return seen

    @staticmethod
    def _data_bytes(p, shapes, sizes: list[int]) -> int:
        """Activations and gradients a client and its helper exchange over these batches."""
        per_row = math.prod(shapes[p.a - 1]) + (math.prod(shapes[p.b - 1]) if p.u_shaped else 0)
        return 2 * 4 * per_row * sum(sizes)

    # --- a round ----------------------------------------------------------------------------------
    async def _round(self, rnd: int, clients, by_id, plan, total: dict) -> tuple[dict, dict, list, int]:
        """Run a training round on every client and helper; returns (each client's end, s after the start),
        the peers' end reports, (loss, samples) of every client step, and the bytes and seconds relayed (sl)."""
        t0 = time.perf_counter()
        ends, reports, losses, moved, relay_s = {}, {}, [], 0, 0.0

        def on_step(peer: str, ev: dict):
            losses.append((ev["loss"], ev["samples"]))
            self.emit({"event": "step", "round": rnd + 1, "client": peer, "step": ev["step"] + 1,
                       "steps": total[peer], "loss": ev["loss"], "epoch": rnd + 1, "head": peer, "samples_per_s": 0.0})

        async def follow(peer: str):
            reports[peer] = await self._follow(by_id[peer], rnd, "train", on_step)
            if peer in clients:
                ends[peer] = time.perf_counter() - t0

        async def in_turn():   # sl: one client after another, the client part relayed to the next
            nonlocal moved, relay_s
            for j, nxt in zip(clients, clients[1:] + [None]):
                await follow(j)
                if nxt:
                    t = time.perf_counter()
                    moved += await self._send_part(rnd, by_id[j], [by_id[nxt]])
                    relay_s += time.perf_counter() - t

        used = sorted(set(plan["assignment"].values()))
        if self.cfg.scheme == "sl":
            work = [follow(h) for h in used] + [in_turn()]
        else:
            work = [follow(x) for x in clients + used]
        await self._together(work, [by_id[x] for x in clients + used])
        return ends, reports, losses, moved, relay_s

    async def _together(self, work: list, peers: list[dict]) -> list:
        """Run the coroutines at once; their results, or the root cause of the first failures (root_cause)."""
        tasks = [asyncio.create_task(w) for w in work]
        try:
            done, rest = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failures = [t.exception() for t in done if t.exception()]
            if failures:
                more, _ = await asyncio.wait(rest, timeout=ECHO_S) if rest else (set(), set())
                failures += [t.exception() for t in more if not t.cancelled() and t.exception()]
                raise await self.root_cause(failures, peers)
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()

    async def _send_part(self, rnd: int, source: dict, targets: list[dict]) -> int:
        """Relay a client's part (with its optimizer state) to other clients; returns the bytes sent."""
        layers = (await self.client.part(source, self.job))["layers"]
        digest = await asyncio.to_thread(checksum, layers)
        await self.call_all(targets, "part_set", timeout=part_timeout(layers), job=self.job, round=rnd, layers=layers,
                            checksum=digest)
        return tensor_bytes(layers) * (1 + len(targets))

    async def _average(self, rnd: int, clients, helpers, by_id) -> int:
        """FedAvg of the client parts, and of the helper parts across helpers (sl: the last client's part to
        every client, the one helper's part as it is). Returns the bytes moved."""
        if self.cfg.scheme == "sl":
            return await self._send_part(rnd, by_id[clients[-1]], [by_id[j] for j in clients[:-1]]) \
                if len(clients) > 1 else 0
        moved = 0
        for group in (clients, helpers):
            got = await asyncio.gather(*(self.client.part(by_id[x], self.job) for x in group))
            got = [g for g in got if g["samples"]] or got[:1]
            mean = await asyncio.to_thread(fedavg, [({i: e["params"] for i, e in g["layers"].items()},
                                                     max(g["samples"], 1)) for g in got])
            layers = {i: {"params": v, "optim": {}} for i, v in mean.items()}
            digest = await asyncio.to_thread(checksum, layers)
            await self.call_all([by_id[x] for x in group], "part_set", timeout=part_timeout(layers), job=self.job,
                                round=rnd, layers=layers, checksum=digest)
            moved += tensor_bytes(layers) * len(group) + sum(tensor_bytes(g["layers"]) for g in got)
        return moved

    async def _follow(self, peer: dict, rnd: int, mode: str, on_step=None) -> dict:
        """A peer's part of a round: its client steps to on_step(peer id, event); returns its "end" report."""
        async for ev in self.client.stream(peer, "run_round", job=self.job, round=rnd, mode=mode):
            if "error" in ev:
                raise PassFailed(peer["peer"], ev["error"], ev.get("cause", "job"))
            if ev.get("event") == "client_step" and on_step:
                on_step(peer["peer"], ev)
            elif ev.get("event") == "end":
                return ev
        raise PassFailed(peer["peer"], "its round stream ended without a report", "link")

    async def _evaluate_round(self, rnd: int, clients, helpers, by_id) -> float:
        """Held-out accuracy: every client's test set through its (averaged) parts and its helper's."""
        peers = [by_id[x] for x in clients + helpers]
        ends = await self._together([self._follow(q, rnd, "eval") for q in peers], peers)
        return sum(e.get("correct", 0) for e in ends) / max(sum(e.get("samples", 0) for e in ends), 1)
