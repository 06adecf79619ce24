"""Scheduling: the instance model and generator, the simulator's checks, the baselines, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from pipeline.device_profiles import load_compute, load_memory
from pipeline.scheduling import InvalidSchedule, Schedule, balanced_greedy_fcfs, generate, random_fcfs, simulate
from pipeline.scheduling.baselines import balanced_greedy_assignment, random_assignment
from pipeline.scheduling.instance import (CLIENT_DEVICES, PAPER_KIB_TO_MBIT, Instance, _measured, part_times,
                                          transfer_ms)


def tiny() -> Instance:
    """Two clients, two helpers; client 1 only fits on helper 0 together with client 0 if memory allows."""
    return Instance(release=((1.0, 2.0), (3.0, 1.0)), forward=((2.0, 4.0), (2.0, 4.0)),
                    delay=((5.0, 5.0), (1.0, 1.0)), backward=((3.0, 6.0), (3.0, 6.0)),
                    tail=((1.0, 1.0), (2.0, 2.0)), demand=(1.0, 1.0), capacity=(2.0, 1.0))


# Both clients on helper 0, first come first served: F0 [1,3), F1 [3,5), B1 [6,9) (gradient at 5+1),
# B0 [9,12) (gradient at 3+5). Client 0 ends at 12+1, client 1 at 9+2.
VALID = Schedule(assignment=(0, 0), starts=((1.0, 9.0), (3.0, 6.0)))


# --- instance model and generator ---------------------------------------------------------------

def test_transfer_and_part_times_follow_the_profiles():
    assert transfer_ms(1000, 8) == pytest.approx(1024.0)   # 1000 KiB = 8.192 Mbit, over 8 Mbit/s
    assert transfer_ms(1000, 8, PAPER_KIB_TO_MBIT) == pytest.approx(100.0)   # the paper's source: 10.24x shorter
    vm = load_compute("resnet101_cifar")["VM"]
    t = part_times(vm, (3, 33))
    assert t.part1_forward == pytest.approx(sum(vm.forward_ms[:3]))
    assert t.part2_backward == pytest.approx(sum(vm.backward_ms[3:33]) + sum(vm.update_ms[3:33]))
    assert t.part3_forward == pytest.approx(sum(vm.forward_ms[33:]))


def test_scenario_1_uses_the_profiled_devices():
    inst = generate("resnet101_cifar", 30, 4, scenario=1, seed=3)
    compute = load_compute("resnet101_cifar")
    helper_forward = {round(part_times(compute[d], (3, 33)).part2_forward, 6) for d in ("VM", "laptop")}
    for h in range(inst.helpers):
        assert round(inst.forward[0][h], 6) in helper_forward
        assert all(inst.forward[j][h] == inst.forward[0][h] for j in range(inst.clients))
    memory = load_memory("resnet101_cifar")
    demand = sum(memory.activation_kb[3:33]) + sum(memory.weights_kb[3:33])
    assert inst.demand == (pytest.approx(demand),) * 30
    # Every instance is feasible: each helper holds at least its fair share of clients.
    assert all(c >= math.ceil(30 / 4) * demand - 1e-6 for c in inst.capacity)


def test_scenario_2_draws_between_the_profiled_extremes():
    compute = load_compute("resnet101_cifar")
    forwards = [part_times(compute[d], (3, 33)).part2_forward for d in ("VM", "laptop")]
    inst = generate("resnet101_cifar", 10, 8, scenario=2, seed=1)
    values = {inst.forward[0][h] for h in range(inst.helpers)}
    assert len(values) == inst.helpers  # drawn, not two device types
    assert all(min(forwards) <= v <= max(forwards) for v in values)


def test_generator_is_deterministic_by_seed():
    assert generate("resnet101_cifar", 20, 3, 2, seed=5) == generate("resnet101_cifar", 20, 3, 2, seed=5)
    assert generate("resnet101_cifar", 20, 3, 2, seed=5) != generate("resnet101_cifar", 20, 3, 2, seed=6)


def test_unmeasured_devices_are_not_drawn():
    # The MNIST sheets hold only zeros for the Jetsons: they were not measured.
    assert _measured(load_compute("resnet101_mnist"), CLIENT_DEVICES) == ["d1", "d2"]
    assert _measured(load_compute("resnet101_cifar"), CLIENT_DEVICES) == list(CLIENT_DEVICES)


@pytest.mark.parametrize("kwargs", [dict(scenario=3), dict(cuts=(0, 33)), dict(cuts=(3, 37)),
                                    dict(memory_slack=0.5), dict(clients=0)])
def test_generator_rejects_bad_arguments(kwargs):
    args = dict(profile="resnet101_cifar", clients=5, helpers=2, scenario=1, seed=0) | kwargs
    with pytest.raises(ValueError):
        generate(**args)


def test_instance_rejects_inconsistent_tables():
    with pytest.raises(ValueError):
        Instance(release=((1.0,),), forward=((1.0, 2.0),), delay=((1.0,),), backward=((1.0,),),
                 tail=((1.0,),), demand=(1.0,), capacity=(1.0,))
    with pytest.raises(ValueError):
        Instance(release=((-1.0,),), forward=((1.0,),), delay=((1.0,),), backward=((1.0,),),
                 tail=((1.0,),), demand=(1.0,), capacity=(1.0,))


# --- simulator ----------------------------------------------------------------------------------

def test_simulator_measures_a_valid_schedule():
    assert simulate(tiny(), VALID) == pytest.approx(13.0)
    # Idling is allowed: B0 one ms later ends one ms later.
    assert simulate(tiny(), Schedule((0, 0), ((1.0, 10.0), (3.0, 6.0)))) == pytest.approx(14.0)


@pytest.mark.parametrize("schedule, rule", [
    (Schedule((0, 0), ((0.5, 9.0), (3.0, 6.0))), "precedence"),          # F0 before its activations arrive
    (Schedule((0, 0), ((1.0, 9.0), (3.0, 5.5))), "precedence"),          # B1 before its gradient arrives
    (Schedule((0, 0), ((2.0, 9.0), (3.0, 6.0))), "one task at a time"),  # F1 starts while F0 runs
    (Schedule((0, 0), ((1.0, 8.0), (3.0, 6.0))), "one task at a time"),  # B0 starts while B1 runs
    (Schedule((1, 1), ((2.0, 16.0), (6.0, 11.0))), "memory"),            # both on helper 1, room for one
    (Schedule((0, 2), ((1.0, 9.0), (3.0, 6.0))), "does not exist"),      # no helper 2
    (Schedule((0,), ((1.0, 9.0),)), "instance has 2 clients"),            # a client left out
])
def test_simulator_rejects_broken_schedules(schedule, rule):
    with pytest.raises(InvalidSchedule, match=rule):
        simulate(tiny(), schedule)


def test_simulator_allows_tasks_on_different_helpers_at_once():
    # Client 1 alone on helper 1: F1 [1,5), B1 [6,12), ends at 14, while client 0 runs on helper 0.
    assert simulate(tiny(), Schedule((0, 1), ((1.0, 8.0), (1.0, 6.0)))) == pytest.approx(14.0)


# --- baselines ----------------------------------------------------------------------------------

def test_fcfs_serves_tasks_in_arrival_order():
    s = balanced_greedy_fcfs(replace(tiny(), capacity=(2.0, 0.0)))  # helper 1 has no room
    assert s == VALID


def test_random_assignment_respects_memory_and_seed():
    inst = generate("resnet101_cifar", 60, 5, 1, seed=2, memory_slack=1.0)
    a = random_assignment(inst, seed=7)
    assert a == random_assignment(inst, seed=7)
    for h in range(inst.helpers):
        assert sum(inst.demand[j] for j in range(60) if a[j] == h) <= inst.capacity[h] + 1e-6
    simulate(inst, random_fcfs(inst, seed=7))


def test_balanced_greedy_keeps_counts_balanced():
    inst = generate("resnet101_cifar", 53, 5, 2, seed=0, memory_slack=3.0)
    counts = [balanced_greedy_assignment(inst).count(h) for h in range(5)]
    assert max(counts) - min(counts) <= 1


# --- CLI ----------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peer", "schedule", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_json_small_instance_includes_exact():
    out = _cli("--profile", "resnet101_cifar", "--clients", "6", "--helpers", "2", "--scenario", "2",
               "--seed", "1", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {"random", "balanced_greedy", "ours", "ours_seconds", "exact"} <= data.keys()
    assert data["exact"] <= data["ours"] * (1 + 1e-9) <= data["balanced_greedy"] * (1 + 1e-9)


def test_cli_json_large_instance_and_determinism():
    args = ("--clients", "30", "--helpers", "3", "--scenario", "1", "--seed", "4", "--json")
    first, second = json.loads(_cli(*args).stdout), json.loads(_cli(*args).stdout)
    assert "exact" not in first
    assert {k: v for k, v in first.items() if "seconds" not in k} == \
           {k: v for k, v in second.items() if "seconds" not in k}


def test_cli_text_and_errors():
    out = _cli("--clients", "10", "--helpers", "2")
    assert out.returncode == 0 and "balanced_greedy" in out.stdout and "lower bound" in out.stdout
    bad = _cli("--profile", "no_such_profile")
    assert bad.returncode == 2 and "no_such_profile" in bad.stderr


def test_cli_paper_compatible_names_its_figures():
    data = json.loads(_cli("--paper-compatible", "--profile", "vgg19_cifar", "--scenario", "2", "-K", "20", "-H", "10",
                           "--seed", "42", "--json").stdout)
    assert data["paper_compatible"] and data["transfers"] == "paper"
    assert data["slot_ms"] == pytest.approx(163.14)
    assert data["reduction_vs_random"] == pytest.approx(1 - data["ours"] / data["random"])
    assert data["ours_over_random"] == pytest.approx(data["ours"] / data["random"])
    assert data["ours_over_bound"] == pytest.approx(data["ours"] / data["lower_bound"]) and data["ours_over_bound"] >= 1
    physical = json.loads(_cli("--paper-compatible", "--transfers", "physical", "--profile", "vgg19_cifar",
                               "--scenario", "2", "-K", "20", "-H", "10", "--seed", "42", "--json").stdout)
    assert physical["random"] > data["random"]   # transfers 10.24x longer
    bad = _cli("--fix-sampler")
    assert bad.returncode == 2 and "--paper-compatible" in bad.stderr
