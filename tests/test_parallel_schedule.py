"""Live client-to-helper scheduling: helpers run the solver's order (ours, and the seeded random one), the
schedule changes only when it is re-solved, and each scheme learns digits. How well the prediction holds
and how much ours gains over random are measured times: scripts/bench_parallel_sl.py reports them."""
import pytest
import torch

from conftest import save_npz, summary_of
from peer.localring import LocalRing, train_cli
from pipeline.scheduling import Instance
from pipeline.scheduling.baselines import random_assignment


def test_helpers_run_the_schedule_and_random_is_the_seeded_draw(tmp_path):
    """5 clients (two slowed 30x) and 2 helpers (slowed 10x) on a model whose helper part dominates. Every
    round each helper runs exactly its order; random's assignment is the seeded draw (no budgets: every client
    fits anywhere, so the draw depends on the seed alone) in every round; ours differs from it, and a
    schedule only changes in a round that was re-solved."""
    g = torch.Generator().manual_seed(0)
    paths = [save_npz(tmp_path / f"c{k}.npz", torch.randn(320, 64, generator=g), torch.randint(0, 10, (320,), generator=g))
             for k in range(5)]
    agents = [["--data", p] + (["--compute-slowdown", "30"] if k < 2 else []) for k, p in enumerate(paths)]
    agents += [["--compute-slowdown", "10"]] * 2
    args = ["--scheme", "splitfed-v1", "--model-options", "depth=4,width=1024", "--cut", "1,4", "--batch-size", "64",
            "--local-steps", "1", "--rounds", "5"]
    clients, helpers = ["c0", "c1", "c2", "c3", "c4"], ["h0", "h1"]
    runs = {}
    with LocalRing(agents, peer_ids=clients + helpers) as ring:
        for assign in ("ours", "random"):
            runs[assign] = summary_of(train_cli(ring.urls[5], *args, "--assign", assign))["history"]["rounds"]
    for assign, history in runs.items():
        assert [r["round"] for r in history] == list(range(5))
        for r in history:
            assert r["ran"] == {h: order for h, order in r["orders"].items() if order}, (assign, r["round"])
            assert sorted(j for order in r["orders"].values() for j, kind in order if kind == "F") == clients
            assert all(r["assignment"][j] == h for h, order in r["orders"].items() for j, _ in order)
            assert set(r["helper_busy"]) == {h for h in helpers if r["orders"].get(h)}
        for before, after in zip(history, history[1:]):   # a new schedule only where the round re-solved
            assert after["resolved"] or (after["assignment"], after["orders"]) == (before["assignment"],
                                                                                   before["orders"]), assign
    stub = Instance(*([((0.0,) * 2,) * 5] * 5), demand=(1.0,) * 5, capacity=(5.0, 5.0))   # shape, room for all
    drawn = {j: helpers[h] for j, h in zip(clients, random_assignment(stub, 0))}           # --seed 0 (default)
    assert all(r["assignment"] == drawn for r in runs["random"])
    assert runs["ours"][0]["assignment"] != drawn


@pytest.fixture(scope="module")
def digits_clients():
    agents = [["--data", "digits", "--shard", f"{k}/5", "--partition", "iid"] for k in range(5)] + [[], []]
    with LocalRing(agents) as ring:
        yield ring


@pytest.mark.parametrize("scheme,rounds,target", [("splitfed-v1", 30, 0.95), ("blind", 15, 0.93),
                                                  ("locsplitfed", 15, 0.93), ("locfedmix", 15, 0.93)])
def test_each_scheme_learns_digits_with_five_clients_and_two_helpers(digits_clients, scheme, rounds, target):
    """splitfed-v1: >= 95% within 30 rounds of local epochs; the others >= 93% (asked: within 40)."""
    summary = summary_of(train_cli(digits_clients.urls[0], "--scheme", scheme, "--rounds", str(rounds),
                                   "--optimizer", "adam", "--lr", "0.003", "--batch-size", "32"))
    accuracy = [r["accuracy"] for r in summary["history"]["rounds"]]
    assert max(accuracy) >= target, accuracy
    ids = [a.peer_id for a in digits_clients.agents]
    assert summary["clients"] == sorted(ids[:5]) and summary["helpers"] == sorted(ids[5:])   # data or not, ring order
    assert summary["local_steps"] == 0   # local epochs
    assert summary["labels"].startswith("travel" if scheme.startswith("loc") else "stay")   # default cuts
    assert all(r["helper_compute_s"] and r["round_s"] >= r["makespan_s"] for r in summary["history"]["rounds"])
