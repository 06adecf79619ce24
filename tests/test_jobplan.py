"""The job plan as data, and the coordinator carrying it out against a fake ring, in one process."""
import asyncio
import dataclasses

import pytest
import torch

from peer.client import Unanswered
from peer.coordinator import Coordinator
from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.jobplan import Facts, JobPlan, PlanError, kept_room, reporting_programs, reports_step
from pipeline.planner import Device, LayerCost
from pipeline.swaps import even_split, swap_moves

LAYER = LayerCost(forward_s=0.001, backward_s=0.002, param_bytes=4000, optim_bytes=0, activation_bytes=512)


def facts(samples: dict[str, int], tests: dict[str, int] | None = None, layers: int = 6, budget=None) -> Facts:
    ring = tuple(sorted(samples))
    devices = {p: Device(p, memory_budget=budget, forward_s=(0.001,) * layers, backward_s=(0.002,) * layers)
               for p in ring}
    return Facts(ring, devices, [LAYER] * layers, samples, tests or {p: 0 for p in ring})


def test_a_plan_visits_every_head_with_data_once_per_epoch_and_swaps_between_passes():
    cfg = JobConfig(epochs=2, batch_size=10, split="even")
    plan = JobPlan(cfg, facts({"a": 25, "b": 0, "c": 10}, {"a": 5, "b": 0, "c": 0}))
    passes = list(plan)
    assert [(p.epoch, p.rotation, p.head) for p in passes] == [(0, 0, "a"), (0, 2, "c"), (1, 3, "a"), (1, 5, "c")]
    assert [p.steps for p in passes] == [3, 1, 3, 1] and plan.total_steps == 8 and plan.passes == 4
    assert [p.ends_epoch for p in passes] == [False, True, False, True]
    assert not any(p.evaluate for p in passes)   # c ends each epoch, and holds no held-out data
    for before, after in zip(passes, passes[1:]):
        assert after.moves == tuple(swap_moves(before.ranges, after.ranges))
        assert after.bytes_moved == len(after.moves) * LAYER.param_bytes > 0
    assert passes[0].moves == () and passes[0].bytes_moved == 0
    for p in passes:   # an even split over the chain, head first
        assert [p.ranges[q] for q in p.chain] == even_split(6, 3)
        assert p.active == list(p.chain)


def test_evaluation_follows_the_epochs_last_pass_when_its_head_has_held_out_data():
    plan = JobPlan(JobConfig(epochs=1, split="even"), facts({"a": 5, "b": 5}, {"a": 0, "b": 3}))
    assert [(p.head, p.ends_epoch, p.evaluate) for p in plan] == [("a", False, False), ("b", True, True)]


def test_a_plan_is_lazy_so_a_long_job_keeps_nothing_per_pass():
    plan = JobPlan(JobConfig(epochs=100_000, split="even"), facts({"a": 5, "b": 5}))
    assert plan.passes == 200_000 and plan.total_steps == 200_000
    first = next(iter(plan))
    assert first.index == 0 and first.rotation == 0


def test_plans_that_cannot_run_say_why():
    with pytest.raises(PlanError, match="no peer of the ring has training data"):
        list(JobPlan(JobConfig(), facts({"a": 0, "b": 0})))
    with pytest.raises(PlanError, match="cannot hold the model"):
        next(iter(JobPlan(JobConfig(), facts({"a": 5, "b": 5}, budget=1000))))
    with pytest.raises(PlanError, match="a chain of 2 stages"):
        JobPlan(JobConfig(scheme="fast-async", backward_at=[[1, 0]]), facts({"a": 5, "b": 5}))
    one = list(JobPlan(JobConfig(split="even"), facts({"a": 5, "b": 5})).one_epoch())   # what `splitring plan` shows
    assert [p.rotation for p in one] == [0, 1]


def test_who_reports_each_step():
    fast, asyn = JobConfig(scheme="fast"), JobConfig(scheme="fast-async")
    assert reporting_programs(fast, S.Roles(3)) == 1 and reporting_programs(asyn, S.Roles(3, {1: 2})) == 4
    assert [reports_step(fast, "train", j, 3) for j in range(3)] == [False, False, True]
    assert [reports_step(asyn, "train", j, 3) for j in range(3)] == [True, True, True]
    assert [reports_step(asyn, "eval", j, 3) for j in range(3)] == [False, False, True]


class FakeView:
    def __init__(self, peers, conflicts=()):
        self._peers, self.conflicts = peers, list(conflicts)

    def peers(self):
        return self._peers

    def missing(self):
        return []


class Peer:
    def __init__(self, peer):
        self.peer, self.url = peer, f"fake://{peer}"


class FakeRing:
    """Peers that answer the coordinator's calls from memory: each holds `samples`, passes run `steps`
    steps of `loss`; `fail` maps a peer to the error its pass reports. Records every call."""

    def __init__(self, samples: dict[str, int], fail: dict[str, str] | None = None, hang: str | None = None):
        self.samples, self.fail, self.hang = samples, fail or {}, hang
        self.calls: list[tuple[str, str]] = []
        self.held: dict[str, tuple[int, int]] = {}
        self.passing = asyncio.Event()

    async def status(self, peer, timeout=5):
        if peer["peer"] == self.hang and self.passing.is_set():   # hangs once the pass has started
            return None
        return {"peer": peer["peer"], "memory_budget": None, "conflicts": []}

    async def call(self, peer, name, timeout=60, params=None, **body):
        self.calls.append((peer["peer"], name))
        if name in ("prepare", "profile"):
            return {"samples": self.samples[peer["peer"]], "test_samples": 0, "memory_budget": None,
                    "pending_messages": 4,
                    "profile": {"forward_s": [0.001] * 4, "backward_s": [0.002] * 4, "param_bytes": [4000] * 4,
                                "optim_bytes": [0] * 4, "activation_bytes": [512] * 4}}
        if name == "commit":
            self.held[peer["peer"]] = tuple(body["ranges"][peer["peer"]])
            return {"layers": list(self.held[peer["peer"]]), "checksum": f"sha-{body['rotation']}"}
        if name == "heartbeat":
            if peer["peer"] == self.hang and self.passing.is_set():
                raise Unanswered(f"peer {peer['peer']} did not answer")
            return {"known": True, "attempt": 0}
        return {}

    async def stream(self, peer, name, **body):
        self.calls.append((peer["peer"], name))
        self.passing.set()
        if peer["peer"] == self.hang:
            await asyncio.sleep(3600)
        if peer["peer"] in self.fail:
            yield {"error": self.fail[peer["peer"]], "cause": "job"}
            return
        if body["rotation"] is not None and peer["peer"] == max(self.held, key=lambda q: self.held[q][1]):
            head = S.chain_order(sorted(self.samples), body["rotation"])[0]
            steps = -(-self.samples[head] // 32)
            for s in range(steps):
                yield {"event": "step", "step": s, "stage": 1, "staleness": 0, "steps": steps, "samples": 32,
                       "loss": 1.0 / (s + 1), "correct": 1}
        yield {"event": "end"}

    async def probe_link(self, peer):
        return 1e9, 1e-4

    async def layers(self, peer, job):
        a, b = self.held[peer["peer"]]
        return {i: {"weight": torch.full((2,), float(i))} for i in range(a, b)}


def coordinator(ring: FakeRing, cfg: JobConfig, saved: dict) -> Coordinator:
    peers = sorted(ring.samples)
    return Coordinator(cfg, {"peer": peers[0], "url": f"fake://{peers[0]}", "memory_budget": None},
                       FakeView([Peer(p) for p in peers[1:]]), ring,
                       lambda job, state: saved.setdefault("model", state) and "saved", sizes=[((8,), 4000)] * 4)


def run(coord: Coordinator) -> list[dict]:
    async def go():
        coord.task = asyncio.current_task()
        await coord.run()
    asyncio.run(go())
    return list(coord.events)


def test_the_coordinator_carries_out_a_jobs_plan():
    ring, saved = FakeRing({"a": 64, "b": 32}), {}
    events = run(coordinator(ring, JobConfig(epochs=2, split="even"), saved))
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["accepted", "started"] and kinds[-1] == "done" and kinds.count("plan") == 4 and kinds.count("epoch") == 2
    assert [(e["head"], e["step"]) for e in events if e["event"] == "step"] == [("a", 1), ("a", 2), ("b", 1)] * 2
    assert kinds.count("swap") == 3   # the chain turns before every pass but the first
    summary = events[-1]["summary"]
    assert summary["passes"] == 4 and summary["final_loss"] == 1.0 and summary["model_file"] == "saved"
    assert sorted(saved["model"]) == [f"{i}.weight" for i in range(4)]
    names = [name for _, name in ring.calls]
    assert names.index("prepare") < names.index("commit") < names.index("run_pass") < names.index("end")


def test_a_failing_peer_is_reported_with_its_cause_and_every_stage_aborted():
    ring = FakeRing({"a": 64, "b": 64}, fail={"b": "ValueError: boom"})
    events = run(coordinator(ring, JobConfig(split="even"), {}))
    assert events[-1] == {"event": "failed", "job": events[0]["job"], "error": "peer b: ValueError: boom",
                          "resumable": True}   # its journal began before the failure
    assert {p for p, name in ring.calls if name == "abort"} == {"a", "b"}


def test_a_silent_peer_is_named_when_the_others_only_report_waiting():
    ring = FakeRing({"a": 64, "b": 64}, fail={"a": "peer b sent nothing for 3 s"}, hang="b")
    coord = coordinator(ring, JobConfig(split="even", rejoin_timeout=0), {})
    original = ring.stream

    async def timing_out(peer, name, **body):   # a's report is a timeout, not its own error
        async for ev in original(peer, name, **body):
            yield {**ev, "cause": "timeout"} if "error" in ev else ev
    ring.stream = timing_out
    events = run(coord)
    lost = next(e for e in events if e["event"] == "lost")
    assert lost["peer"] == "b" and "peer b stopped answering" in lost["error"]
    # b does not come back (rejoin_timeout 0): the job goes on without it (where a's fake pass fails again)
    assert next(e for e in events if e["event"] == "replanned")["lost"] == ["b"]


def test_cancel_aborts_every_stage():
    ring = FakeRing({"a": 64, "b": 64}, hang="b")
    coord = coordinator(ring, JobConfig(split="even"), {})

    async def go():
        coord.task = asyncio.create_task(coord.run())
        await ring.passing.wait()
        coord.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await coord.task
    asyncio.run(go())
    assert coord.events[-1] == {"event": "stopped", "job": coord.job, "rotation": 0, "reason": "job stopped",
                                "resumable": True}
    assert {p for p, name in ring.calls if name == "abort"} == {"a", "b"}
    assert coord.journal["state"] == "stopped" and coord.journal["rotation"] == 0


def test_a_ring_with_a_duplicate_id_is_refused_before_anything_starts():
    ring = FakeRing({"a": 64, "b": 64})
    coord = coordinator(ring, JobConfig(), {})
    coord.view.conflicts = ["duplicate peer id b: used by two live agents, at u1 and u2"]
    events = run(coord)
    assert events[1:] == [{"event": "failed", "job": coord.job, "error": "two live agents share a peer id, so the ring "
                       "cannot tell their data apart: duplicate peer id b: used by two live agents, at u1 and u2",
                           "resumable": False}]   # it failed before its journal began
    assert all(name == "abort" for _, name in ring.calls)


def test_a_pass_that_cannot_run_fails_the_check_before_the_job_starts():
    """b can hold a small layer but not the big first one: the first pass (a at the head) fits, the second
    (b at the head) does not; JobPlan.check finds that before any pass runs."""
    big = LayerCost(forward_s=0.001, backward_s=0.002, param_bytes=40_000, optim_bytes=0, activation_bytes=512)
    f = facts({"a": 5, "b": 5})
    f.devices["b"] = Device("b", memory_budget=10_000, forward_s=(0.001,) * 6, backward_s=(0.002,) * 6)
    f = Facts(f.ring, f.devices, [big] + [LAYER] * 5, f.samples, f.test_samples)
    plan = JobPlan(JobConfig(), f)
    assert next(iter(plan)).rotation == 0   # the first pass alone would have started the job
    with pytest.raises(PlanError, match="cannot hold the model"):
        plan.check()


def swap_peaks(held: dict[int, str], moves, kept_bytes, sent_bytes) -> dict[str, int]:
    """What each peer that receives layers in a swap holds at its peak: every layer it held (kept until the
    commit, so that a failed swap loses nothing) and the largest layer it receives (layers come one at a time;
    one that does not fit beside the rest waits on disk until the commit has freed the old ones)."""
    largest: dict[str, int] = {}
    for i, _, to in moves:
        largest[to] = max(largest.get(to, 0), sent_bytes(i))
    return {to: sum(kept_bytes(i) for i, p in held.items() if p == to) + big for to, big in largest.items()}


def test_swap_peaks_count_kept_and_received_layers():
    held = {0: "a", 1: "a", 2: "b", 3: "b"}
    moves = [(1, "a", "b"), (2, "b", "c")]
    assert swap_peaks(held, moves, lambda i: 10 * (i + 1), lambda i: i + 1) == {"b": 30 + 40 + 2, "c": 3}
    assert swap_peaks(held, [(0, "a", "c"), (1, "a", "c")], lambda i: 0, lambda i: i + 1) == {"c": 2}   # the larger


@pytest.mark.parametrize("pending", [0, 3, 5])
def test_every_budget_keeps_room_for_the_messages_its_peer_lets_wait(pending):
    """A pass holds each stage's 3 layers and buffers (24 000 + 4 activations of 512 bytes), and per kind (fwd,
    bwd) the `pending` messages its peer lets wait unread and one more read, each at most 512 bytes; a swap
    holds a received layer (4 000) instead. A budget of 31 000 holds the larger of the two up to 3 messages
    waiting of each kind."""
    f = facts({"a": 5, "b": 5}, budget=31_000)
    f.devices.update({p: dataclasses.replace(d, pending_messages=pending) for p, d in f.devices.items()})
    plan = JobPlan(JobConfig(split="even"), f)
    room = max(4_000, 2 * (pending + 1) * 512)
    assert room == max(kept_room([LAYER] * 6, 2, pending))
    if pending > 3:
        assert 24_000 + 4 * 512 + room > 31_000
        with pytest.raises(PlanError, match=f"for the messages it lets wait unread .*a {room} bytes"):
            plan.check()
    else:
        plan.check()


@pytest.mark.parametrize("budget", [30_000, 32_000, 40_000, None])
def test_every_planned_swap_stays_within_the_budgets(budget):
    """Each of a, b holds 3 layers (parameters and gradients: 24 000 bytes); rotating the chain moves all 6, one
    at a time, and a peer keeps its old layers until the commit: it holds 24 000 and a received layer (4 000)
    at once. The plan leaves that room in every budget, or refuses the job saying so."""
    layers = [LAYER] * 6
    plan = JobPlan(JobConfig(split="even", epochs=2), facts({"a": 5, "b": 5}, budget=budget))
    if budget is not None and budget < 24_000 + 4 * LAYER.activation_bytes + 4_000:   # its buffers: 4 activations
        with pytest.raises(PlanError, match="room for a layer received in a swap"):
            plan.check()
        return
    passes = list(plan)
    for before, after in zip(passes, passes[1:]):
        held = {i: p for p, (a, b) in before.ranges.items() for i in range(a, b)}
        peaks = swap_peaks(held, after.moves, lambda i: 2 * layers[i].param_bytes + layers[i].optim_bytes,
                           lambda i: layers[i].param_bytes + layers[i].optim_bytes)
        assert peaks and all(need <= (budget or need) for need in peaks.values()), peaks
