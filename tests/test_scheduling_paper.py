"""The workflow paper's own instances (pipeline/scheduling/paper.py) against its source, the FCFS baseline
counted on every helper, and the lower bound checked against the exact optimum on them."""
from __future__ import annotations

import random

import pytest

from pipeline.scheduling import Instance, lower_bound, milp, paper, simulate, solve
from pipeline.scheduling.baselines import fcfs_schedule
from pipeline.scheduling.bounds import integral_bound
from pipeline.scheduling.exact import by_client_sets
from pipeline.scheduling.instance import KIB_TO_MBIT

VGG_ACT_A, VGG_ACT_B = 9249.568359375, 2049.568359375   # KiB out of VGG-19's layers 2 and 22 (cuts 3, 23)


def slots(p: paper.PaperInstance, field: str, j: int, h: int) -> int:
    return round(getattr(p.instance, field)[j][h] / p.slot_ms)


def test_seed_42_gives_the_sources_instance():
    """VGG-19, scenario 1, K=20, H=10: values the source's create_scenario gives (v1.0.1), by hand."""
    p = paper.generate("vgg19_cifar", 20, 10, 1)
    # The largest client-side time: a d2 client's part-1 forward (1909 ms) with cut a's 9249.568 KiB over
    # 1 Mbit/s at the source's 0.0008 Mbit per KiB (7399.65 ms): rint(9308.65) = 9309 ms is 100 slots.
    assert p.slot_ms == pytest.approx(93.09)
    # Client 0 is a d1 on helper 0, a VM, over 9 Mbit/s. d1: part 1 forward 1156.2311 ms, backward
    # 3056.15741; part 3 forward 323.3076, backward 896.846115. VM's part 2: 440.53852 and 1921.921674.
    assert p.bandwidth[0][0] == 9
    up_a, up_b = VGG_ACT_A * 0.0008 / 9 * 1000, VGG_ACT_B * 0.0008 / 9 * 1000   # 822.18 and 182.18 ms
    ceil = lambda ms: -(-ms * 100 // 9309)
    assert slots(p, "release", 0, 0) == ceil(up_a + 1156.2311) == 22
    assert slots(p, "forward", 0, 0) == ceil(440.53852) == 5
    assert slots(p, "delay", 0, 0) == ceil(up_b) + ceil(323.3076) + ceil(up_b + 896.846115) == 2 + 4 + 12
    assert slots(p, "backward", 0, 0) == ceil(1921.921674) == 21
    assert slots(p, "tail", 0, 0) == ceil(up_a) + ceil(3056.15741) == 9 + 33
    # Client 5 on helper 3 (a VM) over 18 Mbit/s, also a d1
    assert p.bandwidth[5][3] == 18
    assert [slots(p, f, 5, 3) for f in ("release", "forward", "delay", "backward", "tail")] == [17, 5, 1 + 4 + 11, 21,
                                                                                                5 + 33]


def test_the_sources_random_baseline_and_room_for_all():
    assert paper.random_assignment(20, 10) == [8, 0, 3, 0, 3, 6, 8, 2, 3, 9, 4, 5, 1, 3, 9, 6, 9, 1, 6, 4]
    assert paper.random_assignment(7, 3) == [2, 0, 0, 0, 0, 0, 0]
    inst = paper.generate("resnet101_cifar", 7, 3, 1).instance
    assert all(c >= sum(inst.demand) for c in inst.capacity)


def test_link_classes_and_scenario_1_devices():
    p = paper.generate("resnet101_cifar", 20, 5, 1)
    links = sorted(v for row in p.bandwidth for v in row)
    # 30 / 42 / 0 / 28 of 100 pairs: the 11-15 class only gets what flooring leaves, here nothing
    assert [sum(lo <= v <= hi for v in links) for lo, hi in ((1, 4), (5, 10), (11, 15), (16, 20))] == [30, 42, 0, 28]
    # scenario 1 draws clients among d1 and d2 only: a part-1 backward of 33 slots (d1's 3056 ms) or 67 (d2's
    # 6230 ms), never a Jetson's (90 or 2)
    v = paper.generate("vgg19_cifar", 30, 5, 1)
    down_a = lambda j, h: -(-VGG_ACT_A * 0.0008 / v.bandwidth[j][h] * 1000 * 100 // 9309)
    assert {slots(v, "tail", j, h) - down_a(j, h) for j in range(30) for h in range(5)} == {33, 67}


def test_scenario_2_quirks_and_their_fix():
    quirky = paper.generate("vgg19_cifar", 20, 5, 2)
    fixed = paper.generate("vgg19_cifar", 20, 5, 2, fix_sampler=True)
    assert quirky.bandwidth == fixed.bandwidth   # the fix changes times, not the links
    down_a = lambda p, j, h: -(-VGG_ACT_A * 0.0008 / p.bandwidth[j][h] * 1000 // p.slot_ms)
    # the source's part-1 backward is always 0: a client's tail is only the gradient's download
    assert all(slots(quirky, "tail", j, h) == down_a(quirky, j, h) for j in range(20) for h in range(5))
    assert all(slots(fixed, "tail", j, h) > down_a(fixed, j, h) for j in range(20) for h in range(5))
    # part 3's forward ranges over jetson-cpu's part-1 forward (9086 ms), not only part-3 times (at most 467)
    third = lambda p: max(slots(p, "delay", j, 0) for j in range(20)) * p.slot_ms
    assert third(quirky) > third(fixed)


def _source_fifo(inst, assignment: list[int], helpers) -> float:
    """FCFS as the source's utils.fifo computes it, with its return moved after the helper loop: each
    helper pops the job whose input arrived first (ties: earliest queued), a forward queues its backward."""
    ends = []
    for h in helpers:
        queue = [[inst.release[j][h], j, "F"] for j in range(inst.clients) if assignment[j] == h]
        t = 0.0
        while queue:
            k = min(range(len(queue)), key=lambda i: (queue[i][0], i))
            value, j, kind = queue.pop(k)
            start = max(t, value)
            if kind == "F":
                t = start + inst.forward[j][h]
                queue.append([t + inst.delay[j][h], j, "B"])
            else:
                t = start + inst.backward[j][h]
                ends.append(t + inst.tail[j][h])
    return max(ends)


@pytest.mark.parametrize("model,scenario,clients,helpers", [("resnet101_cifar", 1, 50, 10), ("vgg19_cifar", 2, 30, 5),
                                                            ("vgg19_cifar", 1, 20, 10)])
def test_fcfs_counts_every_helper(model, scenario, clients, helpers):
    """Our FCFS equals the source's with its bug fixed; the released one returned after helper 0."""
    p = paper.generate(model, clients, helpers, scenario)
    drawn = paper.random_assignment(clients, helpers)
    ours = simulate(p.instance, fcfs_schedule(p.instance, drawn))
    assert ours == pytest.approx(_source_fifo(p.instance, drawn, range(helpers)))
    assert ours > _source_fifo(p.instance, drawn, [0])


@pytest.mark.parametrize("model,scenario,seed", [(m, s, seed) for m in ("resnet101_cifar", "vgg19_cifar")
                                                 for s in (1, 2) for seed in range(2)])
@pytest.mark.parametrize("clients,helpers", [(6, 2), (8, 3)])
@pytest.mark.parametrize("kib_to_mbit", [paper.PAPER_KIB_TO_MBIT, KIB_TO_MBIT])
def test_ours_within_five_percent_of_the_optimum_and_the_bounds_below_it(model, scenario, seed, clients, helpers,
                                                                         kib_to_mbit):
    inst = paper.generate(model, clients, helpers, scenario, seed, kib_to_mbit=kib_to_mbit).instance
    schedule, optimal = milp(inst, 60)
    best = simulate(inst, schedule)
    assert optimal
    assert simulate(inst, solve(inst)) <= best * 1.05
    assert lower_bound(inst) <= integral_bound(inst, 10) <= best * (1 + 1e-9)
    assert best <= simulate(inst, fcfs_schedule(inst, paper.random_assignment(clients, helpers, seed))) * (1 + 1e-9)


@pytest.mark.parametrize("model,scenario,seed",
                         [("vgg19_cifar", 1, 0), ("vgg19_cifar", 2, 1), ("resnet101_cifar", 2, 0)])
def test_exact_by_client_sets_agrees_with_the_milp(model, scenario, seed):
    inst = paper.generate(model, 8, 3, scenario, seed).instance
    sets, proven = by_client_sets(inst, slack=0.1)   # sets up to 10% above ours: the MILP must choose
    schedule, optimal = milp(inst, 60)
    assert proven and optimal
    assert simulate(inst, sets) == pytest.approx(simulate(inst, schedule), rel=1e-6)


@pytest.mark.parametrize("model,scenario,seed", [("resnet101_cifar", 1, 0), ("vgg19_cifar", 2, 3)])
def test_fcfs_and_the_milp_agree_on_the_fcfs_schedule(model, scenario, seed):
    """The MILP's model, with its assignment and task orders fixed to FCFS's, ends exactly when the
    simulator says FCFS ends: two independent models of one schedule agree."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint
    from scipy.optimize import milp as scipy_milp
    from scipy.sparse import lil_matrix

    from pipeline.scheduling.exact import SCALE, _Columns, _rows

    inst = paper.generate(model, 6, 2, scenario, seed).instance
    fcfs = fcfs_schedule(inst, paper.random_assignment(6, 2, seed))
    c = _Columns(inst)
    rows = _rows(inst, c, big_m=1e3 * simulate(inst, fcfs) * SCALE)
    matrix = lil_matrix((len(rows), c.count))
    for i, (coefficients, _, _) in enumerate(rows):
        for col, value in coefficients.items():
            matrix[i, col] = value
    low, high = np.zeros(c.count), np.full(c.count, np.inf)
    for j, h in enumerate(fcfs.assignment):
        for i in range(inst.helpers):
            low[c.x(j, i)] = high[c.x(j, i)] = float(i == h)
    for p, (t, u) in enumerate(c.pairs):
        first = fcfs.starts[t[0]][t[1]] < fcfs.starts[u[0]][u[1]]
        low[c.order(p)], high[c.order(p)] = (float(first), float(first)) if \
            fcfs.assignment[t[0]] == fcfs.assignment[u[0]] else (0.0, 1.0)
    cost = np.zeros(c.count)
    cost[c.makespan] = 1.0
    binary = np.ones(c.count)
    binary[c.k * c.h:c.makespan + 1] = 0
    result = scipy_milp(cost, integrality=binary, bounds=Bounds(low, high),
                        constraints=LinearConstraint(matrix.tocsr(), [r[1] for r in rows], [r[2] for r in rows]))
    assert result.status == 0
    assert result.fun / SCALE == pytest.approx(simulate(inst, fcfs), rel=1e-6)


@pytest.mark.parametrize("key", ["vgg19_cifar/2/20/5", "resnet101_cifar/1/20/10", "resnet101_cifar/2/7/3"])
def test_every_value_equals_the_sources_own_output(key):
    """Every array create_scenario returned (and the assignment random_benchmark drew), saved from the source."""
    import json
    from pathlib import Path

    want = json.loads((Path(__file__).parent / "data" / "paper_source_instances.json").read_text())["instances"][key]
    model, scenario, clients, helpers = key.split("/")
    k, h = int(clients), int(helpers)
    p = paper.generate(model, k, h, int(scenario))
    pairs = [(j, i) for j in range(k) for i in range(h)]
    assert [slots(p, "release", j, i) for j, i in pairs] == [want["release_date"][j][i] for j, i in pairs]
    assert [slots(p, "forward", j, i) for j, i in pairs] == [want["proc"][j][i] for j, i in pairs]
    assert [slots(p, "backward", j, i) for j, i in pairs] == [want["proc_bck"][j][i] for j, i in pairs]
    assert [slots(p, "delay", j, i) for j, i in pairs] == \
        [want["trans_back"][j][i] + want["proc_local"][j] + want["release_date_back"][j][i] for j, i in pairs]
    assert [slots(p, "tail", j, i) for j, i in pairs] == \
        [want["trans_back_gradients"][j][i] + want["proc_local_back"][j] for j, i in pairs]
    assert paper.random_assignment(k, h) == want["random_y"]


def tiny(seed: int) -> Instance:
    """3-4 clients, 2 helpers, integer times from 0 (zero-length tasks included), memory sometimes tight."""
    rng = random.Random(seed)
    k = rng.randint(3, 4)
    table = lambda hi: tuple(tuple(float(rng.randint(0, hi)) for _ in range(2)) for _ in range(k))
    demand = tuple(float(rng.randint(1, 2)) for _ in range(k))
    return Instance(release=table(10), forward=table(6), delay=table(10), backward=table(8), tail=table(10),
                    demand=demand, capacity=(sum(demand) - (1 if seed % 3 == 0 else 0),) * 2)


@pytest.mark.parametrize("seed", range(40))
def test_exact_order_bounds_and_client_sets_against_brute_force(seed):
    """Independent of milp: brute force tries every assignment and every task order."""
    from pipeline.scheduling import brute_force
    from pipeline.scheduling.exact import _best_sequence
    from pipeline.scheduling.sequencing import exact_order

    inst = tiny(seed)
    optimum = simulate(inst, brute_force(inst))
    assert lower_bound(inst) <= integral_bound(inst) <= optimum * (1 + 1e-9)
    sets, proven = by_client_sets(inst)
    assert proven and simulate(inst, sets) == pytest.approx(optimum)
    for h in range(2):
        clients = tuple(range(inst.clients))
        value, order, complete = exact_order(inst, h, [(j, kind) for j in clients for kind in (0, 1)])
        assert complete and value == pytest.approx(_best_sequence(inst, h, clients)[0])
