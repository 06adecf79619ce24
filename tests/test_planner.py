"""The split planner against brute force, and its edges: infeasibility, rotations, scale, CLI."""
from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.planner import solve
from pipeline.planner import (Device, LayerCost, PlanInfeasible, even_split, evaluate, layers_from_profile, plan_chain,
                              moved_bytes, place_backward, plan, plan_rotations, proportional_split, swap_moves)

ROOT = Path(__file__).resolve().parent.parent


# --- an independent statement of the cost and memory model --------------------------------------

STALENESS = 2   # max_staleness of fast-async plans here


def async_held(j, n, m):
    """fast-async at position j: (buffers, pairs, copies) at the worst point of a long pass (schedule.held)."""
    from pipeline import schedule as S
    points = S.held(S.asynchronous(j, n, [m] * 40, STALENESS))
    return max(b + p for b, p, _ in points) - m, m, max(c for _, _, c in points)


def reference(devices, layers, ranges, scheme, m):
    """(step seconds, bytes per stage) straight from the model's definition."""
    one_pass, busy, memory = 0.0, [], []
    for j, (d, (a, b)) in enumerate(zip(devices, ranges)):
        # forward buffers, microbatches of weight-gradient pairs, weight copies of stale forwards
        buffers, pairs, copies = async_held(j, len(devices), m) if scheme == "fast-async" else \
            {"nsplit": (1, 0, 0), "fast": (0, m, 0)}[scheme]
        if a == b:
            memory.append(0)
            continue
        own = d.forward_s is not None
        compute = sum(d.forward_s[i] + d.backward_s[i] if own
                      else (layers[i].forward_s + layers[i].backward_s) / d.speed for i in range(a, b))
        one_pass += compute
        busy.append(compute)
        if b < len(layers):
            wire = layers[b - 1].activation_bytes / d.bandwidth
            one_pass += 2 * (d.latency + wire)
            busy.append(wire)
        inp = layers[a - 1].activation_bytes if a else 0
        outs = [l.activation_bytes for l in layers[a:b]]
        saved = sum(l.saved_bytes for l in layers[a:b])   # what autograd keeps inside the layers
        buffer = inp + sum(outs) + saved               # a forward buffer: input, every layer's output, saved
        pair = inp + sum(outs[:-1]) + sum(outs) + saved   # weight-gradient pairs: each Linear's input and output
        # gradient (and what the forward buffer saved, as microbatch_bytes counts it)
        memory.append(sum((2 + copies) * l.param_bytes + l.optim_bytes for l in layers[a:b])
                      + buffers * buffer + pairs * pair)
    step = m * one_pass if scheme == "nsplit" else one_pass + (m - 1) * max(busy)
    return step, memory


def fits(devices, memory):
    return all(d.memory_budget is None or used <= d.memory_budget for d, used in zip(devices, memory))


def all_splits(n_layers, n_devices):
    """Every contiguous split in chain order with a non-empty head."""
    for cuts in itertools.combinations_with_replacement(range(1, n_layers + 1), n_devices - 1):
        bounds = (0, *cuts, n_layers)
        yield list(zip(bounds, bounds[1:]))


def brute_force(devices, layers, scheme, m):
    """[(step, ranges)] of every split that fits, fastest first."""
    found = []
    for ranges in all_splits(len(layers), len(devices)):
        step, memory = reference(devices, layers, ranges, scheme, m)
        if fits(devices, memory):
            found.append((step, ranges))
    return sorted(found)


def scale(devices, layers):
    """Tolerance unit: every time in the instance added up."""
    return 1 + sum(l.forward_s + l.backward_s for l in layers) * sum(1 + 1 / d.speed for d in devices) + sum(
        2 * (d.latency + l.activation_bytes / d.bandwidth) for d in devices for l in layers) + sum(
        sum(d.forward_s) + sum(d.backward_s) for d in devices if d.forward_s is not None)


# --- random small instances ----------------------------------------------------------------------

seconds = st.floats(0, 1, allow_subnormal=False)
size = st.integers(0, 1000)


@st.composite
def instances(draw, identical=False):
    """(devices, layers, scheme, microbatches). identical: equal devices and values that make ties
    exact and common (short binary fractions, activations mostly 0, maybe free links)."""
    n_layers, n_devices = draw(st.integers(1, 10)), draw(st.integers(2 if identical else 1, 4))
    seconds_ = st.integers(0, 8).map(lambda i: i / 8) if identical else seconds
    activation = st.sampled_from([0, 0, 64]) if identical else size
    layers = [LayerCost(draw(seconds_), draw(seconds_), draw(size), draw(size), draw(activation), draw(activation))
              for _ in range(n_layers)]
    budget = st.one_of(st.none(), st.integers(0, 12000))
    if identical:
        latency = draw(st.sampled_from([0.0, 0.25]))
        devices = [Device(f"p{k}", draw(budget), bandwidth=64.0, latency=latency) for k in range(n_devices)]
    else:
        devices = []
        for k in range(n_devices):
            own = draw(st.booleans())
            devices.append(Device(
                f"p{k}", draw(budget), speed=draw(st.floats(0.1, 10)),
                forward_s=tuple(draw(seconds) for _ in layers) if own else None,
                backward_s=tuple(draw(seconds) for _ in layers) if own else None,
                bandwidth=draw(st.floats(10, 1e5)), latency=draw(st.floats(0, 0.1))))
    return devices, layers, draw(st.sampled_from(["nsplit", "fast"])), draw(st.integers(1, 12))


def check_plan(p, devices, layers, scheme, m):
    assert [s.peer for s in p.stages] == [d.name for d in devices]
    assert p.ranges in list(all_splits(len(layers), len(devices)))
    step, memory = reference(devices, layers, p.ranges, scheme, m)
    assert math.isclose(p.step_s, step, rel_tol=1e-9, abs_tol=1e-12)
    assert [s.memory_bytes for s in p.stages] == memory
    assert p.fits and fits(devices, memory)


@pytest.mark.parametrize("scheme, batch", [("nsplit", solve.BATCH), ("fast", solve.BATCH), ("fast", 1),
                                           ("fast-async", solve.BATCH)])
@settings(max_examples=300, deadline=None)
@given(instance=instances())
def test_optimal_as_brute_force(scheme, batch, instance):
    devices, layers, _, m = instance
    found = brute_force(devices, layers, scheme, m)
    with patch.object(solve, "BATCH", batch):   # 1: the "fast" search goes one cap at a time
        if not found:
            with pytest.raises(PlanInfeasible):
                plan(devices, layers, scheme, m, max_staleness=STALENESS)
            return
        p = plan(devices, layers, scheme, m, max_staleness=STALENESS)
    check_plan(p, devices, layers, scheme, m)
    assert math.isclose(p.step_s, found[0][0], rel_tol=1e-9, abs_tol=1e-9 * scale(devices, layers))


def test_fast_search_on_seeded_random_instances():
    """Hypothesis favours simple values; dense random ones give the "fast" search more splits to weigh."""
    rng = random.Random(4)
    for _ in range(300):
        layers = [LayerCost(rng.random(), rng.random(), rng.randrange(1000), rng.randrange(1000), rng.randrange(1000))
                  for _ in range(rng.randint(2, 10))]
        devices = [Device(f"p{k}", rng.choice([None, rng.randrange(2000, 12000)]), speed=rng.uniform(0.1, 10),
                          bandwidth=rng.uniform(100, 1e5), latency=rng.uniform(0, 0.1))
                   for k in range(rng.randint(2, 4))]
        m = rng.randint(2, 12)
        found = brute_force(devices, layers, "fast", m)
        if found:
            with patch.object(solve, "BATCH", rng.choice([1, 2, solve.BATCH])):
                p = plan(devices, layers, "fast", m)
            check_plan(p, devices, layers, "fast", m)
            assert math.isclose(p.step_s, found[0][0], rel_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(instances(identical=True), st.randoms(use_true_random=False))
def test_ties_go_to_fewest_bytes_moved(instance, rng):
    devices, layers, scheme, m = instance
    found = brute_force(devices, layers, scheme, m)
    if not found:
        return
    bounds = sorted(rng.choices(range(len(layers) + 1), k=len(devices) - 1))
    previous = {d.name: r for d, r in zip(rng.sample(devices, len(devices)), zip([0, *bounds], [*bounds, len(layers)]))}
    fewest = min(moved_bytes(previous, {d.name: r for d, r in zip(devices, ranges)}, layers)
                 for step, ranges in found if step == found[0][0])
    p = plan(devices, layers, scheme, m, previous=previous)
    check_plan(p, devices, layers, scheme, m)
    assert p.step_s == found[0][0]
    assert p.bytes_moved == fewest


def test_rotations_replan_each_chain_and_count_moves():
    layers = [LayerCost(0.01 * (1 + i % 3), 0.02, 4096 * (i + 1), 4096 * (i + 1), 1024) for i in range(12)]
    ring = [Device("a", 10 ** 6, speed=1.0), Device("b", 10 ** 6, speed=1.0), Device("c", 10 ** 6, speed=2.0)]
    plans = plan_rotations(ring, layers, "fast", 4)
    for r, p in enumerate(plans):
        chain = ring[r:] + ring[:r]
        assert [s.peer for s in p.stages] == [d.name for d in chain]
        assert math.isclose(p.step_s, plan(chain, layers, "fast", 4).step_s)
        before = plans[r - 1].assignment if r else None
        assert p.bytes_moved == (moved_bytes(before, p.assignment, layers) if before else 0)
        if before:   # nothing faster, and nothing as fast that moves less
            for step, ranges in brute_force(chain, layers, "fast", 4):
                moved = moved_bytes(before, {d.name: x for d, x in zip(chain, ranges)}, layers)
                assert step > p.step_s * (1 + 1e-9) or moved >= p.bytes_moved


def test_free_links_make_every_split_tie_so_rotations_move_least():
    layers = [LayerCost(0.01, 0.02, 1000, 1000, 100) for _ in range(9)]   # 2000 B move with each layer
    ring = [Device(name, latency=0.0, bandwidth=float("inf")) for name in "abc"]
    plans = plan_rotations(ring, layers, "nsplit", 1, previous={"a": (0, 3), "b": (3, 6), "c": (6, 9)})
    # the new head must take layer 0: b takes 0-5 (moves 0-2); then c takes 0 and b 1-8 (moves 0, 6-8)
    assert [p.ranges for p in plans[1:]] == [[(0, 6), (6, 9), (9, 9)], [(0, 1), (1, 1), (1, 9)]]
    assert [p.bytes_moved for p in plans] == [0, 3 * 2000, 4 * 2000]


def test_swap_moves_lists_owner_changes():
    assert swap_moves({"a": (0, 2), "b": (2, 3)}, {"b": (0, 1), "a": (1, 3)}) == [(0, "a", "b"), (2, "b", "a")]


# --- infeasible --------------------------------------------------------------------------------------

def test_shortfall_names_bytes_layers_and_peers():
    layers = [LayerCost(0.01, 0.01, 100, 100, 10) for _ in range(6)]   # 300 B fixed + 10 B output each
    devices = [Device("head", 650), Device("mid", 320), Device("tail", 320)]
    with pytest.raises(PlanInfeasible) as info:
        plan(devices, layers)
    e = info.value
    # head takes layers 0-1 (620 B), mid layer 2 (320 B: its input 10 B too), tail layer 3; 4-5 are left over
    assert e.layers == (4, 6) and e.peers == ("head", "mid", "tail")
    assert e.short_bytes == 3 * 310 + 10 - 320
    text = str(e)
    assert "layers 4..5" in text and "tail" in text and "620 bytes" in text and "mid layer 2" in text


def test_head_must_hold_layer_zero():
    layers = [LayerCost(0.01, 0.01, 1000, 0, 0), LayerCost(0.01, 0.01, 1, 0, 0)]
    with pytest.raises(PlanInfeasible, match=r"head peer h must hold layer 0.*1000 bytes\) short"):
        plan([Device("h", 1000), Device("big", None)], layers)


def test_fast_keeps_every_microbatch_in_flight():
    layers = [LayerCost(0.01, 0.01, 0, 0, 100) for _ in range(2)]
    devices = [Device("a", 250), Device("b", 400)]
    assert plan(devices, layers, "nsplit", 4).ranges == [(0, 2), (2, 2)]   # 200 B of activations on a
    assert plan(devices, layers, "fast", 2).ranges == [(0, 1), (1, 2)]     # 2 x 100 B; b keeps its input too
    with pytest.raises(PlanInfeasible):
        plan(devices, layers, "fast", 3)


# --- baselines, scale, profiles, CLI -----------------------------------------------------------------

def test_baselines():
    assert even_split(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert even_split(2, 3) == [(0, 1), (1, 2), (2, 2)]
    layers = [LayerCost(0.5, 0.5, 0, 0, 0) for _ in range(12)]
    devices = [Device("slow", speed=1.0), Device("fast", speed=2.0), Device("fastest", speed=3.0)]
    assert proportional_split(devices, layers) == [(0, 2), (2, 6), (6, 12)]
    assert evaluate(devices, layers, [(0, 2), (2, 6), (6, 12)]).step_s == pytest.approx(6.0 + 2 * 2 * 1e-3)


def test_scale_1000_layers_64_devices():
    rng = random.Random(1)
    layers = [LayerCost(rng.uniform(1e-3, 1e-2), rng.uniform(1e-3, 2e-2), rng.randrange(10 ** 6),
                        rng.randrange(10 ** 6), rng.randrange(10 ** 6)) for _ in range(1000)]
    devices = [Device(f"p{k}", rng.randrange(2 * 10 ** 8, 10 ** 9), speed=rng.uniform(0.2, 5),
                      bandwidth=rng.uniform(1e7, 1e9)) for k in range(64)]
    for scheme, m in (("nsplit", 1), ("fast", 8)):
        p = plan(devices, layers, scheme, m)
        assert p.fits and p.ranges[-1][1] == 1000
        assert p.step_s <= evaluate(devices, layers, even_split(1000, 64), scheme, m).step_s


def test_layers_from_profile():
    layers = layers_from_profile("resnet101_cifar")
    assert len(layers) == 37
    assert layers[0].forward_s == pytest.approx(3.23077e-3)
    assert layers[1].param_bytes == layers[1].optim_bytes == round(5.353515625 * 1024)
    assert layers[0].activation_bytes == round(8193.568359375 * 1024)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peer", "plan", *args], cwd=ROOT, capture_output=True, text=True)


def test_cli_json():
    out = run_cli("--profile", "resnet101_cifar", "--devices", "VM,laptop,d1,jetson-cpu",
                  "--memory-budget", "d1=256MiB,VM=300MiB", "--bandwidth", "100Mbit", "--microbatches", "2",
                  "--scheme", "fast", "--json")
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert [s["peer"] for s in p["stages"]] == ["VM", "laptop", "d1", "jetson-cpu"]
    assert p["stages"][0]["layers"][0] == 0 and p["stages"][-1]["layers"][1] == 37
    assert p["stages"][0]["memory_budget"] == 300 * 2 ** 20
    assert all(s["memory_budget"] is None or s["memory_bytes"] <= s["memory_budget"] for s in p["stages"])
    assert p["scheme"] == "fast" and p["microbatches"] == 2 and p["step_s"] > 0


def test_cli_table_and_shortfall():
    out = run_cli("--profile", "vgg19_cifar", "--devices", "laptop,d1", "--memory-budget", "2GiB")
    assert out.returncode == 0, out.stderr
    assert "predicted step time" in out.stdout and "laptop" in out.stdout
    out = run_cli("--profile", "vgg19_cifar", "--devices", "laptop,d1", "--memory-budget", "50MiB,1GiB")
    assert out.returncode == 1 and "short" in out.stderr and "laptop" in out.stderr


def test_a_remote_backward_moves_the_backward_and_the_memory_to_its_host():
    """Stage 1 of 3 runs only forwards; its backward (with a recomputed forward), gradients, K+1 weight
    versions, the inputs in flight and the step's activations are the host's. A memory-poor middle
    device then fits."""
    layers = [LayerCost(1.0, 2.0, 100, 100, 10) for _ in range(6)]
    even = [(0, 2), (2, 4), (4, 6)]
    devices = [Device("a"), Device("b", memory_budget=650), Device("c")]
    alone = evaluate(devices, layers, even, "fast-async", 4, 1)
    assert not alone.stages[1].fits   # params, grads, 1 stashed copy, optimizer state; 4 microbatches' weight-
    # gradient pairs (input 10, outputs 20 and their gradients 20 but the last output's) and 1 forward buffer (10 + 20)
    assert alone.stages[1].memory_bytes == 2 * ((2 + 1) * 100 + 100) + 4 * (10 + 20 + 10) + 1 * (10 + 20)
    moved = evaluate(devices, layers, even, "fast-async", 4, 1, remote={1: 2})
    owner, host = moved.stages[1], moved.stages[2]
    assert owner.fits and owner.memory_bytes == 200 + 2 * 200    # weights + K+1 versions sent back, unread
    assert owner.compute_s == 4 * 2 * 1.0                          # forwards only
    extra = 2 * 200 + (1 + 2) * 200 + 2 * 4 * 10 + 4 * 40   # state, grads + 2 versions, (K+1)M inputs, pairs
    assert host.memory_bytes == alone.stages[2].memory_bytes + extra
    assert host.compute_s == alone.stages[2].compute_s + 4 * 2 * (1.0 + 3.0)   # forward again + both
    assert moved.step_s > alone.step_s   # the host is now the bottleneck


def test_a_stage_can_be_remote_and_host_a_remote_backward():
    """Stage 2's backward runs on the head while it hosts stage 1's: both costs count, in any order."""
    layers = [LayerCost(1.0, 2.0, 100, 100, 10) for _ in range(8)]
    devices = [Device(n) for n in "abcd"]
    even = even_split(8, 4)

    def memory(remote):
        return [s.memory_bytes for s in evaluate(devices, layers, even, "fast-async", 4, 1, remote).stages]
    both = memory({1: 2, 2: 0})
    assert both == memory({2: 0, 1: 2})
    hosted = memory({1: 2})[2] - memory({})[2]
    assert both[2] == memory({2: 0})[2] + hosted > memory({2: 0})[2]


def test_place_backward_relieves_the_stages_that_do_not_fit():
    layers = [LayerCost(1.0, 2.0, 100, 100, 10) for _ in range(6)]
    even = [(0, 2), (2, 4), (4, 6)]
    poor = [Device("a"), Device("b", memory_budget=650), Device("c", memory_budget=3000)]
    assert place_backward(poor, layers, even, "fast-async", 4, 1) == {1: 0}   # a has no budget: the most room
    assert place_backward(poor, layers, even, "fast", 4, 1) == {}             # only fast-async has the roles
    full = [Device("a", memory_budget=1200), Device("b", memory_budget=650), Device("c", memory_budget=3000)]
    assert place_backward(full, layers, even, "fast-async", 4, 1) == {1: 2}   # a cannot take it, c can
    assert evaluate(full, layers, even, "fast-async", 4, 1, {1: 2}).fits
    none = [Device("a", memory_budget=1200), Device("b", memory_budget=650), Device("c", memory_budget=1200)]
    assert place_backward(none, layers, even, "fast-async", 4, 1) == {}
    roomy = [Device("a"), Device("b"), Device("c")]
    assert place_backward(roomy, layers, even, "fast-async", 4, 1) == {}      # everything fits: nothing moves


def test_plan_chain_proportional_gives_each_device_work_by_its_speed():
    """--split proportional: a baseline a job can run; a device twice as fast gets twice the layers here."""
    layers = [LayerCost(1.0, 2.0, 100, 100, 10) for _ in range(6)]
    devices = [Device("a", speed=2.0), Device("b", speed=1.0)]
    p, remote = plan_chain(devices, layers, "nsplit", 1, split="proportional")
    assert p.ranges == [(0, 4), (4, 6)] and remote == {}
    assert p == evaluate(devices, layers, [(0, 4), (4, 6)], "nsplit", 1)


def test_plan_chain_places_backwards_over_the_planned_or_an_even_split():
    """plan_chain, as the coordinator and `splitring plan` use it: given pairs are counted; with auto, a split
    the solver finds fitting needs no remote roles, and when it finds none, the even split with placed roles."""
    layers = [LayerCost(1.0, 2.0, 100, 100, 10) for _ in range(6)]
    even = [(0, 2), (2, 4), (4, 6)]
    roomy = [Device("a"), Device("b"), Device("c")]
    p, remote = plan_chain(roomy, layers, "fast-async", 4, 1, "even", {1: 2})
    assert remote == {1: 2} and p == evaluate(roomy, layers, even, "fast-async", 4, 1, {1: 2})
    assert plan_chain(roomy, layers, "fast-async", 4, 1, backward_at="auto")[1] == {}
    full = [Device("a", memory_budget=1200), Device("b", memory_budget=650), Device("c", memory_budget=3000)]
    with patch("pipeline.planner.chain.plan", side_effect=PlanInfeasible("no split fits", 1, (0, 6), ("b",))):
        p, remote = plan_chain(full, layers, "fast-async", 4, 1, backward_at="auto")
        assert remote == {1: 2} and p.fits and p.ranges == even
        with pytest.raises(PlanInfeasible):   # without auto the solver's verdict stands
            plan_chain(full, layers, "fast-async", 4, 1, backward_at={1: 2})


def test_cli_shows_where_backwards_run():
    base = ["--profile", "resnet101_cifar", "--devices", "VM,laptop,d1", "--scheme", "fast-async", "--microbatches", "4"]
    proc = run_cli(*base, "--backward-at", "1:2")
    assert proc.returncode == 0 and "backward of stage 1 (laptop) runs on d1 (--backward-at 1:2)" in proc.stdout
    out = json.loads(run_cli(*base, "--backward-at", "1:2", "--json").stdout)
    assert out["backward_at"] == [[1, 2]] and out["stages"][2]["memory_bytes"] > 0   # the host holds the role
    assert "backward_at" not in json.loads(run_cli(*base, "--backward-at", "auto", "--json").stdout)   # all fits
    proc = run_cli(*base[:4], "--scheme", "fast", "--backward-at", "1:2")
    assert proc.returncode == 1 and "--scheme fast-async" in proc.stderr
