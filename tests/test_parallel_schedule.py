"""Live client-to-helper scheduling: helpers run the solver's order, the predicted makespan holds, the
schedule beats a random one, and splitfed-v1 learns digits."""
import pytest
import torch

from conftest import save_npz, summary_of
from peer.localring import LocalRing, train_cli

TOLERANCE = 0.25


def test_helpers_run_the_schedule_its_prediction_holds_and_it_beats_random(tmp_path):
    """5 clients (two slowed 30x) and 2 helpers (slowed 10x: devices steadier than this shared host, see
    --compute-slowdown) on a model whose helper part dominates. Round 0 runs cold and on the per-layer
    profiles; from round 1 on the prediction uses what the rounds measured."""
    g = torch.Generator().manual_seed(0)
    paths = [save_npz(tmp_path / f"c{k}.npz", torch.randn(320, 64, generator=g), torch.randint(0, 10, (320,), generator=g))
             for k in range(5)]
    agents = [["--data", p] + (["--compute-slowdown", "30"] if k < 2 else []) for k, p in enumerate(paths)]
    agents += [["--compute-slowdown", "10"]] * 2
    args = ["--scheme", "splitfed-v1", "--model-options", "depth=4,width=1024", "--cut", "1,4", "--batch-size", "64",
            "--local-steps", "1", "--rounds", "5"]
    runs = {}
    with LocalRing(agents, peer_ids=["c0", "c1", "c2", "c3", "c4", "h0", "h1"]) as ring:
        for assign in ("ours", "random"):
            runs[assign] = summary_of(train_cli(ring.urls[5], *args, "--assign", assign))["history"]
    for assign, history in runs.items():
        for r in history:
            assert r["ran"] == {h: order for h, order in r["orders"].items() if order}, (assign, r["round"])
            assert set(r["helper_busy"]) == {"h0", "h1"} and all(0 < b <= 1 for b in r["helper_busy"].values())
        off = [abs(r["makespan_s"] - r["predicted_s"]) / r["predicted_s"] for r in history[1:]]
        assert max(off) <= TOLERANCE, (assign, [(r["makespan_s"], r["predicted_s"]) for r in history])
    mean = {a: sum(r["makespan_s"] for r in h[1:]) / len(h[1:]) for a, h in runs.items()}
    assert mean["ours"] < mean["random"], mean
    assert runs["ours"][0]["assignment"] != runs["random"][0]["assignment"]


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
    accuracy = [r["accuracy"] for r in summary["history"]]
    assert max(accuracy) >= target, accuracy
    assert len(summary["helpers"]) == 2 and len(summary["clients"]) == 5
    assert summary["local_steps"] == 0   # local epochs
    assert summary["labels"].startswith("travel" if scheme.startswith("loc") else "stay")   # default cuts
    assert all(r["helper_compute_s"] and r["round_s"] >= r["makespan_s"] for r in summary["history"])
