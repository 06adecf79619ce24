"""Client/helper schemes (sl, splitfed-v1, splitfed-v2) in one process: the pure decisions of
pipeline/parallel.py (parts, roles, a round's batches, helpers' queues, the scheduling instance from measured
costs and its prediction, FedAvg, data-plane admission) and the single-process reference
pipeline/reference.py train_parallel against plain training. No agents, no network."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import data, reference
from pipeline.admission import MessageKey
from pipeline.config import ConfigError, JobConfig
from pipeline.data import Dataset, pass_order
from pipeline.parallel import (Costs, ParallelError, Parts, RoundFacts, Task, admit, box, build_instance, drifted,
                               fedavg, helper_orders, helper_queues, measured_instance, parts, predict_round,
                               round_batches, round_sizes, solve_with, split_roles)
from pipeline.scheduling import Instance, Schedule, random_fcfs, simulate, solve
from pipeline.scheduling.sequencing import span, timing
from pipeline.scheduling.solution import BACKWARD, FORWARD
from protocols import ProtocolError
from protocols.messages import message, validate

# 4 layers: Linear+ReLU 8->16, 16->16, 16->16, then Linear 16->3
MODEL = {"name": "mlp", "depth": 3, "width": 16, "in_features": 8, "classes": 3}
SHAPES = [(8,), (16,), (16,), (16,), (3,)]   # one sample's input of each layer, then the output


def cfg_(**kw) -> JobConfig:
    return JobConfig(**{"model": dict(MODEL), "scheme": "splitfed-v1", **kw})


def dataset(name: str, n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    return Dataset(name, torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g),
                   torch.randn(5, 8, generator=g), torch.randint(0, 3, (5,), generator=g))


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


# --- 1. parts ----------------------------------------------------------------------------------------------
def test_parts_default_cut_is_u_shaped_1_and_l_minus_1():
    p = parts(cfg_(), 4)
    assert (p.layers, p.a, p.b) == (4, 1, 3)
    assert p.u_shaped and p.helper == (1, 3) and p.client == [(0, 1), (3, 4)]
    assert p.labels().startswith("stay")
    p3 = parts(cfg_(), 3)
    assert (p3.a, p3.b, p3.u_shaped) == (1, 2, True)
    p2 = parts(cfg_(), 2)   # too few layers for a U: a single cut at 1
    assert (p2.a, p2.b, p2.u_shaped) == (1, 2, False)


def test_parts_single_cut_gives_the_helper_the_rest_and_the_labels():
    p = parts(cfg_(cut=[2]), 4)
    assert (p.a, p.b) == (2, 4) and not p.u_shaped
    assert p.helper == (2, 4) and p.client == [(0, 2)]
    assert p.labels().startswith("travel")


def test_parts_u_shaped_cut_as_given():
    p = parts(cfg_(cut=[2, 3]), 5)
    assert (p.a, p.b, p.u_shaped) == (2, 3, True)
    assert p.client == [(0, 2), (3, 5)] and p.helper == (2, 3)


@pytest.mark.parametrize("cut,layers", [([4], 4), ([7], 4), ([1, 4], 4), ([2, 5], 4), ([], 1)])
def test_parts_refuses_a_cut_outside_the_model(cut, layers):
    with pytest.raises(ParallelError) as e:
        parts(cfg_(cut=cut), layers)
    text = str(e.value)
    assert f"cut {','.join(map(str, cut or [1]))} " in text
    assert f"has {layers} layers" in text and "mlp" in text


# --- 2. roles ------------------------------------------------------------------------------------------------
RING = [{"peer": "a", "samples": 10}, {"peer": "b", "role": "helper"}, {"peer": "c", "samples": 0},
        {"peer": "d", "role": "client", "samples": 5}, {"peer": "e", "samples": 7}]
ALL_DATA = [{"peer": p, "samples": n} for p, n in (("a", 3), ("b", 4), ("c", 5), ("d", 6))]


def test_split_roles_from_the_peers_roles_and_samples():
    assert split_roles(cfg_(), RING) == (["a", "d", "e"], ["b", "c"])


def test_split_roles_clients_only_the_others_become_helpers():
    assert split_roles(cfg_(clients=["e", "a"]), RING) == (["a", "e"], ["b", "c", "d"])   # ring order


def test_split_roles_helpers_only_the_others_become_clients():
    assert split_roles(cfg_(helpers=["c"]), ALL_DATA) == (["a", "b", "d"], ["c"])


def test_split_roles_both_lists_leave_the_others_out():
    assert split_roles(cfg_(clients=["d"], helpers=["b"]), RING) == (["d"], ["b"])
    assert split_roles(cfg_(clients=["a", "e"], helpers=["d"]), RING) == (["a", "e"], ["d"])


def test_split_roles_refuses_an_unknown_peer_naming_it():
    with pytest.raises(ParallelError, match="zz"):
        split_roles(cfg_(clients=["a", "zz"]), RING)
    with pytest.raises(ParallelError, match="qq"):
        split_roles(cfg_(helpers=["qq"]), RING)


def test_split_roles_needs_a_helper():
    with pytest.raises(ParallelError, match="needs at least one helper and the ring has none"):
        split_roles(cfg_(), ALL_DATA)
    with pytest.raises(ParallelError, match="needs at least one helper and the ring has none"):
        split_roles(cfg_(clients=["a", "b", "c", "d"]), ALL_DATA)


def test_split_roles_needs_a_client():
    with pytest.raises(ParallelError, match="needs at least one client"):
        split_roles(cfg_(), [{"peer": "x", "role": "helper"}, {"peer": "y"}])
    with pytest.raises(ParallelError, match="needs at least one client"):
        split_roles(cfg_(helpers=["a", "b", "c", "d"]), ALL_DATA)


def test_split_roles_refuses_a_client_without_samples():
    with pytest.raises(ParallelError, match=r"client\(s\) c hold no training data"):
        split_roles(cfg_(clients=["a", "c"]), RING)
    with pytest.raises(ParallelError, match="hold no training data"):   # a helper turned client by --helpers
        split_roles(cfg_(helpers=["a"]), RING)


# --- 3. a round's batches ------------------------------------------------------------------------------------
def epoch_batches(n: int, cfg: JobConfig, e: int) -> list[torch.Tensor]:
    order = pass_order(n, cfg.seed, e, cfg.shuffle)
    return list(torch.split(order, cfg.batch_size))


@pytest.mark.parametrize("shuffle", [True, False])
def test_round_batches_one_local_epoch_per_round(shuffle):
    n, cfg = 23, cfg_(batch_size=5, seed=4, shuffle=shuffle)
    for rnd in range(3):
        got = round_batches(n, cfg, rnd)
        assert [len(b) for b in got] == [5, 5, 5, 5, 3] == round_sizes(n, cfg, rnd)
        assert torch.equal(torch.cat(got), pass_order(n, 4, rnd, shuffle))
        assert sorted(torch.cat(got).tolist()) == list(range(n))   # every sample once
    if shuffle:
        assert not torch.equal(torch.cat(round_batches(n, cfg, 0)), torch.cat(round_batches(n, cfg, 1)))


@pytest.mark.parametrize("k", [1, 3, 5, 7, 12])
def test_round_batches_local_steps_walk_the_epochs_across_rounds(k):
    n, cfg = 23, cfg_(batch_size=5, seed=1, local_steps=k)   # 5 batches an epoch, the last of 3
    rounds = [round_batches(n, cfg, r) for r in range(6)]
    assert all(len(r) == k for r in rounds)
    walked = [b for r in rounds for b in r]
    epochs = [b for e in range(-(-6 * k // 5)) for b in epoch_batches(n, cfg, e)][:6 * k]
    assert len(walked) == len(epochs) == 6 * k
    assert all(torch.equal(x, y) for x, y in zip(walked, epochs))
    assert torch.equal(torch.cat(walked), torch.cat(epochs))
    assert round_sizes(n, cfg, 1) == [len(b) for b in rounds[1]]


# --- 4. helpers' queues --------------------------------------------------------------------------------------
def test_helper_queues_sl_runs_clients_in_turn():
    cfg = cfg_(scheme="sl")
    got = helper_queues(cfg, {"c1": "h0", "c0": "h0"}, {"h0": [["c0", "F"], ["c1", "F"]]}, {"c0": 1, "c1": 2})
    assert got == {"h0": [Task("c1", 0, "F"), Task("c1", 0, "B"), Task("c1", 1, "F"), Task("c1", 1, "B"),
                          Task("c0", 0, "F"), Task("c0", 0, "B")]}   # the orders play no part


@pytest.mark.parametrize("scheme", ["splitfed-v1", "splitfed-v2"])
def test_helper_queues_splitfed_repeat_the_order_per_local_step(scheme):
    assignment = {"c0": "h0", "c1": "h0", "c2": "h1"}
    orders = {"h0": [["c1", "F"], ["c0", "F"], ["c1", "B"], ["c0", "B"]], "h1": [["c2", "F"], ["c2", "B"]],
              "h2": []}
    got = helper_queues(cfg_(scheme=scheme), assignment, orders, {"c0": 3, "c1": 1, "c2": 2})
    T = Task
    assert got == {
        "h0": [T("c1", 0, "F"), T("c0", 0, "F"), T("c1", 0, "B"), T("c0", 0, "B"),
               T("c0", 1, "F"), T("c0", 1, "B"), T("c0", 2, "F"), T("c0", 2, "B")],
        "h1": [T("c2", 0, "F"), T("c2", 0, "B"), T("c2", 1, "F"), T("c2", 1, "B")],
        "h2": []}


# --- 5. prediction -----------------------------------------------------------------------------------------
def random_instance(seed: int, clients: int, helpers: int, room: float | None = None) -> Instance:
    rng = random.Random(seed)
    grid = lambda lo, hi: tuple(tuple(rng.uniform(lo, hi) for _ in range(helpers)) for _ in range(clients))
    return Instance(release=grid(1, 20), forward=grid(2, 10), delay=grid(0, 30), backward=grid(3, 15),
                    tail=grid(1, 20), demand=tuple(1.0 for _ in range(clients)),
                    capacity=tuple(float(room if room is not None else clients) for _ in range(helpers)))


ORDERS = [[(0, FORWARD), (2, FORWARD), (0, BACKWARD), (2, BACKWARD)], [(1, FORWARD), (1, BACKWARD), (3, FORWARD),
                                                                        (3, BACKWARD)]]
ASSIGNMENT = [0, 1, 0, 1]


def test_predict_round_one_full_step_is_the_helpers_span():
    inst = random_instance(0, 4, 2)
    want = max(span(inst, h, o) for h, o in enumerate(ORDERS))
    assert want == max(timing(inst, h, o)[1] for h, o in enumerate(ORDERS))
    assert predict_round(inst, ASSIGNMENT, ORDERS, [[16]] * 4, 16) == pytest.approx(want, abs=1e-9)


def test_predict_round_scales_with_the_rows_and_sums_the_steps():
    inst = random_instance(1, 4, 2)
    full = max(span(inst, h, o) for h, o in enumerate(ORDERS))
    assert predict_round(inst, ASSIGNMENT, ORDERS, [[8]] * 4, 16) == pytest.approx(full / 2)
    assert predict_round(inst, ASSIGNMENT, ORDERS, [[16, 16, 4]] * 4, 16) == pytest.approx(full * 2.25)
    # clients with different step counts: a later step only times the clients that still have it
    sizes = [[16, 16], [16], [16, 8], [16]]
    half = [[(j, k) for j, k in o if j in (0, 2)] for o in ORDERS]
    scaled_inst = replace(inst, **{n: tuple(tuple(v * f for v in row) for row, f in zip(getattr(inst, n),
                                                                                       [1, 0, 0.5, 0]))
                                   for n in ("release", "forward", "delay", "backward", "tail")})
    step1 = max(span(scaled_inst, h, o) for h, o in enumerate(half))
    assert predict_round(inst, ASSIGNMENT, ORDERS, sizes, 16) == pytest.approx(full + step1)
    assert predict_round(inst, ASSIGNMENT, ORDERS, [[]] * 4, 16) == 0.0


def test_predict_round_sequential_sums_each_clients_whole_path():
    inst = random_instance(2, 3, 2)
    assignment = [1, 1, 1]
    path = lambda j, h: (inst.release[j][h] + inst.forward[j][h] + inst.delay[j][h] + inst.backward[j][h]
                         + inst.tail[j][h])
    want = sum(path(j, 1) for j in range(3)) + path(0, 1) * 0.5   # client 0 has a second, half batch
    assert predict_round(inst, assignment, [], [[10, 5], [10], [10]], 10, sequential=True) == pytest.approx(want)
    # it does not matter what the orders say
    assert predict_round(inst, assignment, [[(0, FORWARD)], []], [[10, 5], [10], [10]], 10, True) == \
        pytest.approx(want)


@pytest.mark.parametrize("seed", range(6))
def test_predict_round_of_a_solved_schedule_equals_the_simulator(seed):
    inst = random_instance(seed, 6, 2 + seed % 2, room=4)
    schedule = solve(inst)
    orders = helper_orders(schedule, inst.helpers)
    assert sorted((j, k) for o in orders for j, k in o) == sorted((j, k) for j in range(6) for k in (0, 1))
    for h, order in enumerate(orders):   # every task on its helper, each client's forward before its backward
        assert all(schedule.assignment[j] == h for j, _ in order)
        assert all(order.index((j, FORWARD)) < order.index((j, BACKWARD)) for j, _ in order)
    got = predict_round(inst, list(schedule.assignment), orders, [[32]] * 6, 32)
    assert got == pytest.approx(simulate(inst, schedule), abs=1e-6)


def test_helper_orders_sort_each_helpers_tasks_by_start():
    s = Schedule(assignment=(1, 0, 1), starts=((5.0, 20.0), (0.0, 3.0), (8.0, 12.0)))
    assert helper_orders(s, 3) == [[(1, FORWARD), (1, BACKWARD)],
                                   [(0, FORWARD), (2, FORWARD), (2, BACKWARD), (0, BACKWARD)], []]


# --- 6. measured times ---------------------------------------------------------------------------------------
COLUMNS = ("release", "forward", "delay", "backward", "tail")


def test_measured_instance_takes_the_measured_row_and_scales_other_helpers():
    inst = random_instance(3, 4, 3)
    assignment = [0, 1, 0, 1]
    seen = {0: dict(release=1.0, forward=2.0, delay=3.0, backward=4.0, tail=5.0),
            2: dict(release=6.0, forward=7.0, delay=8.0, backward=9.0, tail=10.0),
            1: dict(release=11.0, forward=12.0, delay=13.0, backward=14.0, tail=15.0)}
    got = measured_instance(inst, assignment, seen)
    ratio0 = (2 + 4 + 7 + 9) / (inst.forward[0][0] + inst.backward[0][0] + inst.forward[2][0] + inst.backward[2][0])
    ratio1 = (12 + 14) / (inst.forward[1][1] + inst.backward[1][1])
    ratio = [ratio0, ratio1, 1.0]   # helper 2 ran nothing: unchanged
    for j, times in seen.items():
        h = assignment[j]
        for name in COLUMNS:   # the assigned pair: what was measured
            assert getattr(got, name)[j][h] == times[name]
        for other in range(3):
            if other == h:
                continue
            for name in ("forward", "backward"):
                assert getattr(got, name)[j][other] == pytest.approx(getattr(inst, name)[j][other] * ratio[other])
            for name in ("release", "delay", "tail"):   # client side and links: the same whichever helper
                assert getattr(got, name)[j][other] == times[name]
    for name in COLUMNS:   # a client not seen: untouched
        assert getattr(got, name)[3] == getattr(inst, name)[3]
    assert got.demand == inst.demand and got.capacity == inst.capacity
    assert measured_instance(inst, assignment, {}) == inst


def test_drifted():
    assert drifted(10.0, 12.6, 0.25) and drifted(10.0, 7.4, 0.25)
    assert not drifted(10.0, 12.5, 0.25) and not drifted(10.0, 7.5, 0.25) and not drifted(10.0, 10.0, 0.01)
    assert not drifted(0.0, 100.0, 0.25)


# --- 7. the instance from measured costs, and solving it -----------------------------------------------------
C0 = Costs(forward_s=(0.001, 0.002, 0.003, 0.004), backward_s=(0.010, 0.020, 0.030, 0.040), bandwidth=1e6,
           latency=0.0005, memory_budget=None)
C1 = Costs(forward_s=(0.002, 0.004, 0.006, 0.008), backward_s=(0.020, 0.040, 0.060, 0.080), bandwidth=4e6,
           latency=0.001)
H0 = Costs(forward_s=(0.0001, 0.0002, 0.0003, 0.0004), backward_s=(0.001, 0.002, 0.003, 0.004), bandwidth=2e6,
           latency=0.002, memory_budget=10_000)
H1 = Costs(forward_s=(0.0005, 0.0006, 0.0007, 0.0008), backward_s=(0.005, 0.006, 0.007, 0.008), bandwidth=8e6,
           latency=0.0, memory_budget=1_000)
PARAMS, ACTS = [100, 200, 300, 400], [10, 20, 30, 40]


def test_build_instance_u_shaped_columns_in_ms():
    inst = build_instance(cfg_(cut=[1, 3]), Parts(4, 1, 3), [C0, C1], [H0, H1], (1000, 2000), PARAMS, 2.0, ACTS)
    # links: each one's latency, at the slower bandwidth; cut a 1000 bytes, cut b 2000 bytes
    up_a = [[0.0005 + 0.002 + 1000 / 1e6, 0.0005 + 0.0 + 1000 / 1e6],
            [0.001 + 0.002 + 1000 / 2e6, 0.001 + 0.0 + 1000 / 4e6]]
    up_b = [[0.0005 + 0.002 + 2000 / 1e6, 0.0005 + 0.0 + 2000 / 1e6],
            [0.001 + 0.002 + 2000 / 2e6, 0.001 + 0.0 + 2000 / 4e6]]
    cs, hs = [C0, C1], [H0, H1]
    for j, c in enumerate(cs):
        for h, hc in enumerate(hs):
            assert inst.release[j][h] == pytest.approx(1000 * (c.forward_s[0] + up_a[j][h]))
            assert inst.forward[j][h] == pytest.approx(1000 * (hc.forward_s[1] + hc.forward_s[2]))
            assert inst.delay[j][h] == pytest.approx(1000 * (2 * up_b[j][h] + c.forward_s[3] + c.backward_s[3]))
            assert inst.backward[j][h] == pytest.approx(1000 * (hc.backward_s[1] + hc.backward_s[2]))
            assert inst.tail[j][h] == pytest.approx(1000 * (up_a[j][h] + c.backward_s[0]))
    assert inst.release[0][0] == pytest.approx(1 + 0.5 + 2 + 1)        # spelt out once
    assert inst.delay[1][1] == pytest.approx(2 * (1 + 0.5) + 8 + 80)


def test_build_instance_single_cut_columns_in_ms():
    inst = build_instance(cfg_(cut=[2]), Parts(4, 2, 4), [C0, C1], [H0, H1], (1000, 0), PARAMS, 0.0, ACTS)
    assert inst.release[0][0] == pytest.approx(1 + 2 + 0.5 + 2 + 1)
    assert inst.forward[1][0] == pytest.approx(0.3 + 0.4) and inst.forward[0][1] == pytest.approx(0.7 + 0.8)
    assert inst.delay == ((0.0, 0.0), (0.0, 0.0))   # the loss is on the helper: nothing in between
    assert inst.backward[0][1] == pytest.approx(7 + 8)
    assert inst.tail[1][1] == pytest.approx(1 + 0 + 0.25 + 20 + 40)


def test_build_instance_memory_by_scheme():
    # part 2 of Parts(4, 1, 3): params 200 + 300 = 500 bytes, activations 20 + 30 = 50 bytes
    p, ratio = Parts(4, 1, 3), 2.0
    v1 = build_instance(cfg_(scheme="splitfed-v1"), p, [C0, C1], [H0, H1], (1000, 2000), PARAMS, ratio, ACTS)
    assert v1.demand == pytest.approx((500 * 4 / 1024 + 50 / 1024,) * 2)   # a copy with gradients and state each
    assert v1.capacity[0] == pytest.approx((10_000 - 500) / 1024)           # the averaged weights once
    assert v1.capacity[1] == pytest.approx((1_000 - 500) / 1024)
    for scheme, stashed in (("splitfed-v2", 500), ("sl", 0)):
        inst = build_instance(cfg_(scheme=scheme), p, [C0, C1], [H0, H1], (1000, 2000), PARAMS, ratio, ACTS)
        assert inst.demand == pytest.approx(((stashed + 50) / 1024,) * 2)   # v2: a copy of the weights each
        assert inst.capacity[0] == pytest.approx((10_000 - 2000) / 1024)  # part 2 with gradients and state once
        assert inst.capacity[1] == 0.0                                    # budget below the shared part
    none = Costs(H0.forward_s, H0.backward_s, H0.bandwidth, H0.latency, None)
    inst = build_instance(cfg_(), p, [C0, C1, C0], [none], (1000, 2000), PARAMS, ratio, ACTS)
    assert inst.capacity[0] >= sum(inst.demand)   # no budget: room for every client


def test_solve_with_exact_is_refused_on_a_big_instance():
    with pytest.raises(ParallelError, match="9 clients and 2 helpers are too many"):
        solve_with(random_instance(0, 9, 2), "exact", 0)
    with pytest.raises(ParallelError, match="4 helpers"):
        solve_with(random_instance(0, 3, 4), "exact", 0)


def test_solve_with_random_is_seeded():
    inst = random_instance(5, 7, 3)
    assert solve_with(inst, "random", 11) == solve_with(inst, "random", 11) == random_fcfs(inst, 11)
    assert len({solve_with(inst, "random", s).assignment for s in range(8)}) > 1


@pytest.mark.parametrize("clients", [3, 5])
def test_solve_with_every_method_gives_a_valid_schedule(clients):
    inst = random_instance(7, clients, 2, room=clients - 1)   # nobody holds every client
    spans = {m: simulate(inst, solve_with(inst, m, 3)) for m in ("ours", "random", "greedy", "exact")}
    assert spans["exact"] <= min(spans.values()) + 1e-6
    assert solve_with(inst, "ours", 0) == solve(inst)


# --- 8. FedAvg ------------------------------------------------------------------------------------------------
def test_fedavg_sample_weighted_mean():
    s1 = {0: {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, 2: {"b": torch.tensor([0.0])}}
    s2 = {0: {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(9)}, 2: {"b": torch.tensor([6.0])}}
    got = fedavg([(s1, 1), (s2, 2)])
    assert set(got) == {0, 2} and set(got[0]) == {"w", "n"}
    assert torch.allclose(got[0]["w"], torch.tensor([3.0, 6.0])) and torch.allclose(got[2]["b"], torch.tensor([4.0]))
    assert got[0]["w"].dtype == torch.float32
    assert torch.equal(got[0]["n"], torch.tensor(3)) and got[0]["n"].dtype == torch.int64   # the first's counter
    assert got[0]["n"] is not s1[0]["n"]   # a copy
    half = fedavg([({0: {"h": torch.tensor([1.0], dtype=torch.float16)}}, 1),
                   ({0: {"h": torch.tensor([2.0], dtype=torch.float16)}}, 1)])
    assert half[0]["h"].dtype == torch.float16 and half[0]["h"].item() == 1.5


def test_fedavg_accumulates_in_float64():
    big, one = torch.tensor([2.0 ** 24]), torch.tensor([1.0])
    states = [({0: {"w": big}}, 1)] + [({0: {"w": one}}, 1)] * 4
    want = torch.tensor([(2.0 ** 24 + 4) / 5], dtype=torch.float64).float()
    naive = torch.zeros(1)
    for (s, w) in states:
        naive += s[0]["w"] * (w / 5)
    assert not torch.equal(naive, want)   # float32 accumulation would lose the ones
    assert torch.equal(fedavg(states)[0]["w"], want)


def test_fedavg_refuses_nothing_to_average():
    with pytest.raises(ParallelError, match="nothing to average"):
        fedavg([])
    with pytest.raises(ParallelError, match="nothing to average"):
        fedavg([({0: {"w": torch.ones(2)}}, 0), ({0: {"w": torch.ones(2)}}, 0)])


floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
weights = st.lists(st.integers(min_value=1, max_value=1000), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=6), w=weights)
def test_fedavg_of_identical_copies_returns_them(values, w):
    t = torch.tensor(values, dtype=torch.float32)
    state = {3: {"weight": t, "count": torch.tensor(len(values))}}
    got = fedavg([({3: {k: v.clone() for k, v in state[3].items()}}, n) for n in w])
    assert torch.equal(got[3]["weight"], t) and torch.equal(got[3]["count"], state[3]["count"])


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(floats, min_size=3, max_size=3), min_size=1, max_size=5), w=weights,
       scale=st.integers(min_value=2, max_value=50))
def test_fedavg_is_invariant_to_scaling_the_weights(rows, w, scale):
    k = min(len(rows), len(w))
    states = [{0: {"w": torch.tensor(r, dtype=torch.float32)}} for r in rows[:k]]
    a = fedavg(list(zip(states, w[:k])))
    b = fedavg(list(zip(states, [scale * n for n in w[:k]])))
    assert torch.allclose(a[0]["w"], b[0]["w"], rtol=1e-6, atol=1e-6)
    # and it is the float64 weighted mean
    want = sum(torch.tensor(r, dtype=torch.float64) * n for r, n in zip(rows[:k], w[:k])) / sum(w[:k])
    assert torch.allclose(a[0]["w"].double(), want, rtol=1e-6, atol=1e-3)


# --- 9. admission -------------------------------------------------------------------------------------------
U, SINGLE = Parts(4, 1, 3), Parts(4, 2, 4)
ASSIGN = {"c0": "h0", "c1": "h1"}
TRAIN = {"c0": [8, 8, 5], "c1": [8, 4]}
EVAL = {"c0": [10], "c1": [6]}


def facts(me: str, p: Parts, rnd: int = 2) -> RoundFacts:
    return RoundFacts(me, rnd, p, dict(ASSIGN), TRAIN, EVAL, SHAPES)


def msg(kind: str, cut: int, client: str, step: int, rows: int, width: int, mode: str = "train", rnd: int = 2,
        **extra) -> dict:
    field = "x" if kind == "act" else "grad"
    return validate(message(kind, job="j", round=rnd, step=step, client=client, cut=cut, mode=mode,
                            **{field: torch.randn(rows, width)}, **extra))


def key(mode: str, step: int, kind: str, cut: int, client: str, rnd: int = 2) -> MessageKey:
    return MessageKey(rnd, mode, step, box(kind, cut, client), 0)


def test_admit_u_shaped_on_the_helper():
    f = facts("h0", U)
    m = msg("act", 1, "c0", 2, 5, 16)
    k, payload = admit(f, "c0", m)
    assert k == key("train", 2, "act", 1, "c0") == MessageKey(2, "train", 2, "act1@c0", 0)
    assert payload.keys() == {"x"} and payload["x"] is m["x"]   # labels stay on the client
    m = msg("grad", 2, "c0", 1, 8, 16)
    k, payload = admit(f, "c0", m)
    assert k == key("train", 1, "grad", 2, "c0") and payload["grad"] is m["grad"]
    k, payload = admit(f, "c0", msg("act", 1, "c0", 0, 10, 16, mode="eval"))
    assert k == key("eval", 0, "act", 1, "c0") and payload["x"].shape == (10, 16)


def test_admit_u_shaped_on_the_client():
    f = facts("c0", U)
    m = msg("act", 2, "c0", 0, 8, 16)   # shapes[b = 3]
    k, payload = admit(f, "h0", m)
    assert k == key("train", 0, "act", 2, "c0") and payload == {"x": m["x"]}
    k, payload = admit(f, "h0", msg("grad", 1, "c0", 2, 5, 16))   # shapes[a = 1]
    assert k == key("train", 2, "grad", 1, "c0") and payload.keys() == {"grad"}
    k, payload = admit(f, "h0", msg("act", 2, "c0", 0, 10, 16, mode="eval"))
    assert k == key("eval", 0, "act", 2, "c0")


def test_admit_single_cut_labels_travel_and_the_loss_comes_back():
    h = facts("h1", SINGLE, rnd=0)
    y = torch.randint(0, 3, (4,))
    m = msg("act", 1, "c1", 1, 4, 16, rnd=0, y=y)   # shapes[a = 2]
    k, payload = admit(h, "c1", m)
    assert k == key("train", 1, "act", 1, "c1", rnd=0)
    assert payload.keys() == {"x", "y"} and payload["y"] is y
    k, payload = admit(h, "c1", msg("act", 1, "c1", 0, 6, 16, mode="eval", rnd=0))   # no labels to evaluate
    assert k == key("eval", 0, "act", 1, "c1", rnd=0) and payload.keys() == {"x"}
    c = facts("c1", SINGLE, rnd=0)
    m = msg("grad", 1, "c1", 0, 8, 16, rnd=0, loss=1.25, correct=3)
    k, payload = admit(c, "h1", m)
    assert k == key("train", 0, "grad", 1, "c1", rnd=0)
    assert payload["grad"] is m["grad"] and payload["loss"] == 1.25 and payload["correct"] == 3
    k, payload = admit(c, "h1", msg("act", 2, "c1", 0, 6, 3, mode="eval", rnd=0))   # the output: shapes[L]
    assert k == key("eval", 0, "act", 2, "c1", rnd=0) and payload["x"].shape == (6, 3)


def refused(f: RoundFacts, sender: str, m: dict, code: str) -> str:
    with pytest.raises(ProtocolError) as e:
        admit(f, sender, m)
    assert e.value.code == code, e.value
    return str(e.value)


def test_admit_refuses_what_is_not_expected():
    h0, c0 = facts("h0", U), facts("c0", U)
    # a stale round
    assert "round 1" in refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16, rnd=1), "stale")
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16, rnd=3), "stale")
    # a wrong sender: another client, or the other helper
    refused(h0, "c1", msg("act", 1, "c0", 0, 8, 16), "unexpected")
    refused(c0, "h1", msg("act", 2, "c0", 0, 8, 16), "unexpected")
    refused(c0, "c0", msg("act", 2, "c0", 0, 8, 16), "unexpected")
    # a client this helper does not serve, a client not in the round, a message meant for the helper
    refused(h0, "c1", msg("act", 1, "c1", 0, 8, 16), "unexpected")
    refused(h0, "c9", msg("act", 1, "c9", 0, 8, 16), "unexpected")
    refused(c0, "c0", msg("act", 1, "c0", 0, 8, 16), "unexpected")
    # no such cut or mode
    refused(h0, "c0", msg("act", 3, "c0", 0, 8, 16), "unexpected")
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16, mode="test"), "unexpected")
    # evaluation has no gradients
    refused(c0, "h0", msg("grad", 1, "c0", 0, 10, 16, mode="eval"), "unexpected")
    refused(h0, "c0", msg("grad", 2, "c0", 0, 10, 16, mode="eval"), "unexpected")
    # steps out of range
    assert "step 3 out of range" in refused(h0, "c0", msg("act", 1, "c0", 3, 8, 16), "unexpected")
    refused(h0, "c0", msg("act", 1, "c0", 1, 10, 16, mode="eval"), "unexpected")
    # wrong shapes: rows of another step, features of another cut; wrong dtype
    refused(h0, "c0", msg("act", 1, "c0", 2, 8, 16), "bad_shape")
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 8), "bad_shape")
    refused(c0, "h0", msg("grad", 1, "c0", 0, 8, 3), "bad_shape")
    m = msg("act", 1, "c0", 0, 8, 16)
    m["x"] = m["x"].double()
    assert "float32" in refused(h0, "c0", m, "bad_shape")
    m = msg("grad", 2, "c0", 0, 8, 16)
    m["grad"] = m["grad"].half()
    refused(h0, "c0", m, "bad_shape")


def test_admit_single_cut_refusals():
    h0, c0 = facts("h0", SINGLE), facts("c0", SINGLE)
    # no cut-2 gradient and no cut-2 training activation without a U: the loss is on the helper
    refused(h0, "c0", msg("grad", 2, "c0", 0, 8, 16), "unexpected")
    refused(c0, "h0", msg("act", 2, "c0", 0, 8, 3), "unexpected")
    # labels must travel with a training activation: present, int64, one per row
    assert "labels" in refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16), "bad_shape")
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16, y=torch.zeros(8, dtype=torch.int32)), "bad_shape")
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 16, y=torch.zeros(7, dtype=torch.int64)), "bad_shape")
    # the activation at cut a = 2 and the output at L = 4
    refused(h0, "c0", msg("act", 1, "c0", 0, 8, 3, y=torch.zeros(8, dtype=torch.int64)), "bad_shape")
    refused(c0, "h0", msg("act", 2, "c0", 0, 10, 16, mode="eval"), "bad_shape")


# --- 10. the single-process reference -----------------------------------------------------------------------
C_SETS = {"c0": dataset("c0", 37, 1), "c1": dataset("c1", 21, 2)}


@pytest.mark.parametrize("optimizer,cut", [("sgd", [1, 3]), ("adam", [1, 3]), ("sgd", [2]), ("adam", [1])])
def test_sl_with_one_client_is_plain_training(optimizer, cut):
    cfg = cfg_(scheme="sl", cut=cut, rounds=3, batch_size=8, optimizer=optimizer, lr=0.05, momentum=0.0, seed=2)
    b = cut[1] if len(cut) == 2 else 4
    got = reference.train_parallel(cfg, {"c0": C_SETS["c0"]}, [({"c0": "h0"}, {})] * 3, (cut[0], b))
    want = reference.train(replace(cfg, epochs=3), [C_SETS["c0"]])
    assert max_diff(got, want) <= 1e-6
    assert max_diff(got, reference.train(replace(cfg, epochs=2), [C_SETS["c0"]])) > 1e-3   # the test can tell


def test_sl_with_clients_in_turn_is_plain_training_over_their_data():
    """sl relays the one client part (with its optimizer state): clients in turn on one helper, a local epoch a
    round, is plain training over the clients' shards in ring order, epoch after epoch."""
    cfg = cfg_(scheme="sl", rounds=2, batch_size=8, optimizer="adam", lr=0.01)
    got = reference.train_parallel(cfg, C_SETS, [({"c0": "h0", "c1": "h0"}, {})] * 2, (1, 3))
    assert max_diff(got, reference.train(replace(cfg, epochs=2), [C_SETS["c0"], C_SETS["c1"]])) <= 1e-6


@pytest.mark.parametrize("cut", [[1, 3], [2]])
def test_splitfed_v1_with_one_client_and_helper_is_plain_training(cut):
    cfg = cfg_(scheme="splitfed-v1", cut=cut, rounds=3, batch_size=8, optimizer="sgd", lr=0.05, momentum=0.0)
    b = cut[1] if len(cut) == 2 else 4
    schedule = ({"c0": "h0"}, {"h0": [["c0", "F"], ["c0", "B"]]})
    got = reference.train_parallel(cfg, {"c0": C_SETS["c0"]}, [schedule] * 3, (cut[0], b))
    assert max_diff(got, reference.train(replace(cfg, epochs=3), [C_SETS["c0"]])) <= 1e-6


SEPARATE = ({"c0": "h0", "c1": "h1"}, {"h0": [["c0", "F"], ["c0", "B"]], "h1": [["c1", "F"], ["c1", "B"]]})
SHARED_INTERLEAVED = ({"c0": "h0", "c1": "h0"}, {"h0": [["c0", "F"], ["c1", "F"], ["c0", "B"], ["c1", "B"]],
                                                 "h1": []})
SHARED_IN_TURN = ({"c0": "h0", "c1": "h0"}, {"h0": [["c1", "F"], ["c1", "B"], ["c0", "F"], ["c0", "B"]], "h1": []})


@pytest.mark.parametrize("cut,local_steps", [([1, 3], 3), ([2], 3), ([1, 3], 0)])
def test_splitfed_v1_and_v2_agree_when_each_helper_serves_one_client(cut, local_steps):
    b = cut[1] if len(cut) == 2 else 4
    models = {s: reference.train_parallel(cfg_(scheme=s, cut=cut, rounds=2, local_steps=local_steps, batch_size=8,
                                               optimizer="adam", lr=0.01), C_SETS, [SEPARATE] * 2, (cut[0], b))
              for s in ("splitfed-v1", "splitfed-v2")}
    assert max_diff(models["splitfed-v1"], models["splitfed-v2"]) <= 1e-6
    # and when one helper serves both, they do not (v2 updates one part 2 client after client)
    shared = {s: reference.train_parallel(cfg_(scheme=s, cut=cut, rounds=2, local_steps=local_steps, batch_size=8,
                                               optimizer="adam", lr=0.01), C_SETS, [SHARED_INTERLEAVED] * 2,
                                          (cut[0], b))
              for s in ("splitfed-v1", "splitfed-v2")}
    assert max_diff(shared["splitfed-v1"], shared["splitfed-v2"]) > 1e-4
    # v1's copies are independent: who serves whom and in what order does not matter
    assert max_diff(shared["splitfed-v1"], models["splitfed-v1"]) <= 1e-6


def test_splitfed_v2_follows_the_helpers_order():
    cfg = cfg_(scheme="splitfed-v2", rounds=1, local_steps=2, batch_size=8, optimizer="sgd", lr=0.1)
    a = reference.train_parallel(cfg, C_SETS, [SHARED_INTERLEAVED], (1, 3))
    b = reference.train_parallel(cfg, C_SETS, [SHARED_IN_TURN], (1, 3))
    assert max_diff(a, b) > 1e-4
    assert max_diff(a, reference.train_parallel(cfg, C_SETS, [SHARED_INTERLEAVED], (1, 3))) == 0.0   # deterministic


# --- Blind Learning, local losses, mixup, partitions ---------------------------------------------------
def test_blind_with_one_step_a_round_is_centralized_training_on_the_union_of_the_batches():
    import torch.nn.functional as F_
    from pipeline.models import build_model

    d = data.digits()
    sets = {"c0": data.Dataset("c0", d.x[:100], d.y[:100]), "c1": data.Dataset("c1", d.x[100:160], d.y[100:160])}
    for cut in ([1, 3], [2]):
        cfg = JobConfig(model={"name": "mlp", "depth": 3}, scheme="blind", cut=cut, rounds=3, local_steps=1,
                        batch_size=16, lr=0.1)
        order = {"h0": [["c0", "F"], ["c1", "F"], ["c0", "B"], ["c1", "B"]]}
        got = reference.train_parallel(cfg, sets, [({"c0": "h0", "c1": "h0"}, order)] * 3,
                                       (cut[0], cut[1] if len(cut) == 2 else 4)).state_dict()
        model = build_model(cfg.model, cfg.seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for r in range(3):
            idx = {j: round_batches(len(ds), cfg, r)[0] for j, ds in sets.items()}
            x = torch.cat([ds.x[idx[j]] for j, ds in sets.items()])
            y = torch.cat([ds.y[idx[j]] for j, ds in sets.items()])
            opt.zero_grad()
            F_.cross_entropy(model(x), y).backward()
            opt.step()
        want = model.state_dict()
        assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-6


def test_blind_and_splitfed_v2_agree_with_one_client_per_helper_and_differ_when_shared():
    d = data.digits()
    sets = {"c0": data.Dataset("c0", d.x[:100], d.y[:100]), "c1": data.Dataset("c1", d.x[100:160], d.y[100:160])}
    run = lambda scheme, a, o: reference.train_parallel(
        JobConfig(model={"name": "mlp", "depth": 3}, scheme=scheme, cut=[2], rounds=2, local_steps=2, batch_size=16),
        sets, [(a, o)] * 2, (2, 4)).state_dict()
    diff = lambda x, y: max((x[k] - y[k]).abs().max().item() for k in x)
    apart = ({"c0": "h0", "c1": "h1"}, {"h0": [["c0", "F"], ["c0", "B"]], "h1": [["c1", "F"], ["c1", "B"]]})
    shared = ({"c0": "h0", "c1": "h0"}, {"h0": [["c0", "F"], ["c1", "F"], ["c0", "B"], ["c1", "B"]]})
    assert diff(run("blind", *apart), run("splitfed-v2", *apart)) == 0.0
    assert diff(run("blind", *shared), run("splitfed-v2", *shared)) > 1e-4


def test_blind_helper_sums_its_clients_weight_gradients_in_forward_order_to_the_last_bit():
    """Under Adam with fresh state each round a last-bit difference in a weight gradient grows to a visible
    one, so the helper's one backward must sum per-client gradients in the reference's order (the forwards'),
    not in autograd's order for several roots."""
    import copy
    import itertools

    from torch.func import functional_call

    from peer.parallel import ParallelRuntime
    from pipeline.stage import Stage

    cfg = JobConfig(model={"name": "mlp", "depth": 3}, scheme="blind", cut=[2], optimizer="adam", lr=0.002)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 128, generator=g) for _ in range(3)]
    ys = [torch.randint(0, 10, (16,), generator=g) for _ in range(3)]
    for order in itertools.permutations(range(3)):
        stage = Stage.build(cfg, 2, 4)
        model = copy.deepcopy(torch.nn.Sequential(stage.layers[2], stage.layers[3]))
        for k in order:
            stage.forward_loss(k, xs[k], ys[k], 16, True)
        ParallelRuntime._blind_backward(stage, list(order), [1 / 3] * 3)
        grads = []
        for k in order:   # the reference: each client's gradient on its own copy of the weights, summed in order
            weights = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
            loss = reference.batch_loss(functional_call(model, weights, (xs[k],)), ys[k])
            loss.backward(torch.tensor(1 / 3))
            grads.append(weights)
        opt = torch.optim.Adam(model.parameters(), lr=0.002)
        for n, p in model.named_parameters():
            p.grad = sum(w[n].grad for w in grads)
        opt.step()
        assert max_diff(torch.nn.Sequential(stage.layers[2], stage.layers[3]), model) == 0.0, order


def test_helper_queues_of_blind_and_the_local_loss_schemes():
    from pipeline.parallel import ALL, Task

    order = {"h0": [["b", "F"], ["a", "F"], ["a", "B"], ["b", "B"]]}
    steps = {"a": 2, "b": 1}
    blind = helper_queues(JobConfig(scheme="blind"), {"a": "h0", "b": "h0"}, order, steps)["h0"]
    assert blind == [Task("b", 0, "F"), Task("a", 0, "F"), Task(ALL, 0, "B"), Task("a", 1, "F"), Task(ALL, 1, "B")]
    mix = helper_queues(JobConfig(scheme="locfedmix", mix_updates=2), {"a": "h0", "b": "h0"}, order, steps)["h0"]
    assert mix == [Task("b", 0, "U"), Task("a", 0, "U"), Task(ALL, 0, "M"), Task(ALL, 0, "M"), Task("a", 1, "U"),
                   Task(ALL, 1, "M"), Task(ALL, 1, "M")]
    loc = helper_queues(JobConfig(scheme="locsplitfed", mix_updates=2), {"a": "h0", "b": "h0"}, order, steps)["h0"]
    assert [t.kind for t in loc] == ["U", "U", "U"]


def test_mixes_are_seeded_across_clients_and_weighted_by_beta():
    from pipeline.parallel import mixes

    cfg = JobConfig(scheme="locfedmix", mix_updates=3, mixup_alpha=0.5, batch_size=16, seed=4)
    a, b = mixes(cfg, 2, 1, "h0", [10, 7, 5]), mixes(cfg, 2, 1, "h0", [10, 7, 5])
    assert a == b and len(a) == 3 and all(len(m.lam) == 16 for m in a)
    assert a != mixes(cfg, 2, 2, "h0", [10, 7, 5]) and a != mixes(cfg, 2, 1, "h1", [10, 7, 5])
    for m in a:
        assert all(x != y for x, y in zip(m.ca, m.cb))              # across clients
        assert all(0 <= i < [10, 7, 5][k] for k, i in zip(m.ca + m.cb, m.a + m.b))
        assert all(0 < v < 1 for v in m.lam)
    alone = mixes(cfg, 0, 0, "h0", [5])[0]
    assert set(alone.ca) == set(alone.cb) == {0} and len(alone.lam) == 5   # one client: mixed within, all rows


def test_local_loss_schemes_have_a_single_cut():
    with pytest.raises(ConfigError, match="single cut"):
        JobConfig(scheme="locfedmix", cut=[1, 3])
    assert parts(JobConfig(scheme="locsplitfed"), 4) == Parts(4, 1, 4)


@pytest.mark.parametrize("how", ["blocks", "iid", "dirichlet:0.3", "classes:2", "classes:3"])
def test_partitions_are_disjoint_seeded_and_as_named(how):
    from pipeline.data import partition

    y = data.digits().y.numpy()
    parts_ = partition(y, 5, how, seed=1)
    every = np.concatenate(parts_)
    assert len(set(every.tolist())) == len(every) and len(every) == len(y)
    assert all((a == b).all() for a, b in zip(parts_, partition(y, 5, how, seed=1)))
    labels = [set(y[p].tolist()) for p in parts_]
    if how.startswith("classes"):
        k = int(how.split(":")[1])
        assert all(len(c) == k for c in labels) and not set.intersection(*labels[:2])
    if how == "dirichlet:0.3":
        assert min(len(c) for c in labels) < 10 and len({len(p) for p in parts_}) > 1
    if how == "iid":
        assert not all((a == b).all() for a, b in zip(parts_, partition(y, 5, how, seed=2)))


def test_partition_refuses_what_it_cannot_read():
    from pipeline.data import DataError, parse_partition

    for bad in ("dirichlet", "dirichlet:0", "dirichlet:-1", "classes:0", "classes:x", "random", "iid:3"):
        with pytest.raises(DataError, match="--partition"):
            parse_partition(bad)
