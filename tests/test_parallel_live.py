"""Client/helper schemes on a live ring of real agents on loopback: each scheme equals its single-process
reference (pipeline/reference.py train_parallel), sl with one client equals plain PyTorch, helpers run the
solver's schedule and its prediction holds, the schedule is worth having, the schemes learn, and bad jobs
are refused before training."""

import pytest
import torch

from conftest import load_out, max_diff, save_npz, summary_of
from peer.localring import LocalRing, train_cli
from pipeline import data, reference
from pipeline.config import JobConfig

BOUNDS = [(0, 200), (200, 330), (330, 600)]   # clients' shards of different sizes
IDS = ["c0", "c1", "c2", "h0", "h1"]          # fixed ids: a fixed ring order


def client_sets():
    digits = data.load("digits")
    return {f"c{k}": data.Dataset(f"c{k}", digits.x[a:b], digits.y[a:b], digits.x_test[:60 * (k + 1)],
                                  digits.y_test[:60 * (k + 1)]) for k, (a, b) in enumerate(BOUNDS)}


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel")
    paths = [save_npz(tmp / f"{k}.npz", s.x, s.y, x_test=s.x_test, y_test=s.y_test) for k, s in client_sets().items()]
    with LocalRing([["--data", p] for p in paths] + [["--role", "helper"], []], peer_ids=IDS) as r:
        yield r


def train(ring, tmp_path, *args):
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.urls[3], "--out", str(out), "--recv-timeout", "30", *args))
    return summary, load_out(out)


ONE_HELPER = ["--clients", "c0,c1,c2", "--helpers", "h0"]
MIX = {"mix_updates": 2, "mixup_alpha": 0.4}
CASES = [("sl", "1,3", [], {}), ("sl", "2", [], {}),
         ("splitfed-v1", "1,3", [], {}), ("splitfed-v1", "2", [], {}), ("splitfed-v1", "1,3", ONE_HELPER, {}),
         ("splitfed-v2", "1,3", [], {}), ("splitfed-v2", "2", [], {}), ("splitfed-v2", "2", ONE_HELPER, {}),
         ("blind", "1,3", [], {}), ("blind", "1,3", ONE_HELPER, {}),
         ("blind", "2", ONE_HELPER, {}),
         ("locsplitfed", "1", [], {}), ("locsplitfed", "2", ONE_HELPER, {"aux_head": "mlp"}),
         ("locfedmix", "1", [], MIX), ("locfedmix", "2", ONE_HELPER, MIX)]


@pytest.mark.parametrize("scheme,cut,extra,options", CASES)
def test_each_scheme_equals_its_reference(ring, tmp_path, scheme, cut, extra, options):
    flags = [x for k, v in options.items() for x in ("--" + k.replace("_", "-"), str(v))]
    # balanced greedy assignment: both helpers serve (ours may leave one idle when its measured costs say so,
    # and this test is about each scheme's arithmetic, not the schedule)
    args = ["--scheme", scheme, "--cut", cut, "--model-options", "depth=3", "--rounds", "2", "--local-steps", "3",
            "--batch-size", "16", "--optimizer", "adam", "--lr", "0.002", "--seed", "3", "--assign", "greedy",
            *extra, *flags]
    summary, got = train(ring, tmp_path, *args)
    assert summary["clients"] == ["c0", "c1", "c2"]
    assignments = [r["assignment"] for r in summary["history"]["rounds"]]
    if scheme == "sl":   # clients in turn on one helper (whichever finishes them soonest), the same every round
        assert all(set(a) == {"c0", "c1", "c2"} and len(set(a.values())) == 1 for a in assignments), assignments
        assert len({a["c0"] for a in assignments}) == 1 and assignments[0]["c0"] in ("h0", "h1"), assignments
    else:   # balanced greedy: clients in ring order, each to the helper serving fewest so far, lowest first
        want = {"c0": "h0", "c1": "h0", "c2": "h0"} if extra else {"c0": "h0", "c1": "h1", "c2": "h0"}
        assert assignments == [want, want], assignments
    assert summary["labels"].startswith("stay" if "," in cut else "travel")
    cuts = [int(v) for v in cut.split(",")]
    cfg = JobConfig(model={"name": "mlp", "depth": 3}, scheme=scheme, cut=cuts, rounds=2, local_steps=3, batch_size=16,
                    optimizer="adam", lr=0.002, seed=3, **options)
    rounds = summary["history"]["rounds"]
    want = reference.train_parallel(cfg, client_sets(), [(r["assignment"], r["orders"]) for r in rounds],
                                    (cuts[0], cuts[1] if len(cuts) == 2 else 4))
    assert max_diff(got, want.state_dict()) <= 1e-5
    # the last round's held-out accuracy is the reference model's over every client's test set
    tests = client_sets().values()
    x, y = torch.cat([c.x_test for c in tests]), torch.cat([c.y_test for c in tests])
    with torch.no_grad():
        correct = int((want(x).argmax(1) == y).sum())
    assert round(summary["history"]["rounds"][-1]["accuracy"] * len(y)) == correct
    assert all(r["bytes"] > 0 for r in summary["history"]["rounds"])


def test_splitfed_v2_depends_on_the_helper_order_and_follows_it(ring, tmp_path):
    """The reference with another order gives other weights, so the equality above checks the order too."""
    args = ["--scheme", "splitfed-v2", "--cut", "1,3", "--model-options", "depth=3", "--rounds", "1",
            "--local-steps", "2", "--batch-size", "16", "--lr", "0.2", "--helpers", "h0", "--clients", "c0,c1,c2"]
    summary, got = train(ring, tmp_path, *args)
    cfg = JobConfig(model={"name": "mlp", "depth": 3}, scheme="splitfed-v2", cut=[1, 3], rounds=1, local_steps=2,
                    batch_size=16, lr=0.2)
    (assignment, orders), = [(r["assignment"], r["orders"]) for r in summary["history"]["rounds"]]
    assert summary["history"]["rounds"][0]["ran"] == {"h0": orders["h0"]}
    in_turn = [[j, k] for j in ("c0", "c1", "c2") for k in "FB"]
    forwards_first = [[j, "F"] for j in ("c0", "c1", "c2")] + [[j, "B"] for j in ("c0", "c1", "c2")]
    other = {"h0": in_turn if orders["h0"] != in_turn else forwards_first}
    same = reference.train_parallel(cfg, client_sets(), [(assignment, orders)], (1, 3)).state_dict()
    changed = reference.train_parallel(cfg, client_sets(), [(assignment, other)], (1, 3)).state_dict()
    assert max_diff(got, same) <= 1e-5 < max_diff(got, changed)


def test_sl_with_one_client_is_plain_pytorch(ring, tmp_path):
    summary, got = train(ring, tmp_path, "--scheme", "sl", "--cut", "1,3", "--model-options", "depth=3",
                         "--rounds", "2", "--batch-size", "32", "--optimizer", "sgd", "--momentum", "0.9",
                         "--clients", "c1", "--helpers", "h1")
    assert summary["clients"] == ["c1"] and summary["helpers"] == ["h1"]
    cfg = JobConfig(model={"name": "mlp", "depth": 3}, epochs=2, batch_size=32, momentum=0.9)
    want = reference.train(cfg, [client_sets()["c1"]]).state_dict()   # a round is a local epoch
    assert max_diff(got, want) <= 1e-5


def test_status_shows_roles(ring):
    roles = {a.peer_id: a.status()["role"] for a in ring.agents}
    assert roles == {"c0": "client", "c1": "client", "c2": "client", "h0": "helper", "h1": "helper"}


def refused(ring, *args) -> str:
    proc = train_cli(ring.urls[0], *args)
    assert proc.returncode != 0
    return proc.stderr


def test_bad_jobs_are_refused_before_training_and_the_agents_keep_serving(ring, digits_ring, tmp_path):
    assert "needs at least one helper and the ring has none" in refused(digits_ring, "--scheme", "splitfed-v1")
    assert "cut 9 is outside the model" in refused(ring, "--scheme", "splitfed-v1", "--cut", "9")
    assert "0 < A < B" in refused(ring, "--scheme", "sl", "--cut", "3,1")
    assert "hold no training data" in refused(ring, "--scheme", "sl", "--helpers", "h0")
    assert "not in the ring" in refused(ring, "--scheme", "sl", "--clients", "nobody")
    assert "microbatches must be 1" in refused(ring, "--scheme", "splitfed-v2", "--microbatches", "2")
    for a in ring.agents:
        st = a.status()
        assert st["stages"] == [] and st["role"]
    summary, _ = train(ring, tmp_path, "--scheme", "splitfed-v1", "--local-steps", "1")
    assert summary["rounds"] == 1


def test_more_clients_than_the_helpers_can_hold_is_refused(start_ring, tmp_path):
    sets = client_sets()
    paths = [save_npz(tmp_path / f"{k}.npz", s.x, s.y) for k, s in sets.items()]
    # part 2 of mlp width 128 (layers 1-2): 129 KiB of weights; a splitfed-v1 helper keeps them, and per client a
    # copy with gradients and activations (290 KiB): one client fits in 500 KiB, two do not
    ring = start_ring([["--data", p] for p in paths[:2]] + [["--memory-budget", "500KiB"]], peer_ids=["c0", "c1", "h0"])
    err = refused(ring, "--scheme", "splitfed-v1", "--cut", "1,3", "--model-options", "depth=3")
    assert "the helpers cannot hold the clients' part 2" in err and "at most 1 of the 2 clients fit" in err
    summary = summary_of(train_cli(ring.urls[0], "--scheme", "splitfed-v1", "--cut", "1,3", "--model-options",
                                   "depth=3", "--clients", "c0", "--helpers", "h0", "--local-steps", "1"))
    assert summary["clients"] == ["c0"]
