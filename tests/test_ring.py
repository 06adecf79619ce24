"""A real ring: agent processes on loopback, mDNS on 127.0.0.1, HTTP and WebSocket between them."""
import json
import os

import torch

from conftest import load_out, max_diff, save_npz, summary_of, wait_until
from peer.coordinator import SteadyRate
from peer.localring import train_cli
from pipeline import data, reference
from pipeline.config import JobConfig
from pipeline.models import build_model


def steady_rate(passes):
    rate = SteadyRate()
    for steps in passes:
        rate.new_pass()
        for at, samples in steps:
            rate.step(at, samples)
    return rate.rate


def test_steady_rate_leaves_out_the_first_step_of_each_pass():
    passes = [[(10.0, 32), (10.5, 32), (11.5, 16)], [(20.0, 32)], [(30.0, 32), (30.25, 32)]]
    assert steady_rate(passes) == (32 + 16 + 32) / (1.5 + 0.25)
    assert steady_rate([[(1.0, 32)]]) is None and steady_rate([]) is None


def test_exact_when_only_one_peer_has_data(start_ring, tmp_path):
    digits = data.load("digits")
    mine = data.Dataset("mine", digits.x[:300], digits.y[:300])
    path = save_npz(tmp_path / "mine.npz", mine.x, mine.y)
    cores = sorted(os.sched_getaffinity(0))
    cpus = [str(cores[k % len(cores)]) for k in range(3)]   # agents pinned (--cpus), as on separate devices
    ring = start_ring([[], ["--data", path], []], cpus=cpus)
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.urls[2], "--epochs", "2", "--batch-size", "32", "--lr", "0.05",
                                   "--optimizer", "sgd", "--momentum", "0.9", "--shuffle", "off",
                                   "--microbatches", "2", "--split", "even", "--out", str(out)))
    assert summary["passes"] == 2 and summary["epochs"] == 2  # empty heads' passes are skipped
    # (steady_samples_per_s: its arithmetic is test_steady_rate_leaves_out_the_first_step_of_each_pass's; the
    # summary gives no counts to check the live figure against)
    for agent, cpu in zip(ring.agents, cpus):   # every thread, those started for the job included
        masks = []
        for tid in os.listdir(f"/proc/{agent.proc.pid}/task"):
            try:
                masks.append(os.sched_getaffinity(int(tid)))
            except ProcessLookupError:   # a thread that has just ended
                pass
        assert len(masks) > 2 and all(mask == {int(cpu)} for mask in masks)
    cfg = JobConfig(epochs=2, batch_size=32, lr=0.05, momentum=0.9, shuffle=False, microbatches=2)
    want = reference.train(cfg, [mine]).state_dict()
    got = load_out(out)
    build_model(cfg.model, cfg.seed).load_state_dict(got)
    assert max_diff(got, want) <= 1e-5


def test_exact_when_every_peer_has_data_in_ring_order(start_ring, tmp_path):
    digits = data.load("digits")
    parts = [(0, 200), (200, 330), (330, 600)]  # unequal shards: passes of different lengths
    sets = [data.Dataset(f"p{k}", digits.x[a:b], digits.y[a:b]) for k, (a, b) in enumerate(parts)]
    paths = [save_npz(tmp_path / f"p{k}.npz", s.x, s.y) for k, s in enumerate(sets)]
    ring = start_ring([["--data", p] for p in paths])
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.urls[0], "--epochs", "2", "--batch-size", "24", "--optimizer", "adam",
                                   "--lr", "0.003", "--weight-decay", "0.001", "--microbatches", "3",
                                   "--seed", "5", "--split", "even", "--out", str(out)))
    order = [ring.agents.index(a) for a in ring.ring_order()]
    assert summary["ring"] == [ring.agents[k].peer_id for k in order]
    cfg = JobConfig(epochs=2, batch_size=24, optimizer="adam", lr=0.003, weight_decay=0.001, microbatches=3, seed=5)
    want = reference.train(cfg, [sets[k] for k in order]).state_dict()
    assert max_diff(load_out(out), want) <= 1e-5


def test_digits_learns_from_a_peer_that_is_not_first(digits_ring, tmp_path):
    ring = digits_ring
    starter = ring.ring_order()[1]
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(starter.url, "--epochs", "10", "--lr", "0.05", "--momentum", "0.9",
                                   "--out", str(out)))
    assert summary["accuracy"] >= 0.95
    model = build_model({"name": "mlp"}, 0)
    model.load_state_dict(load_out(out))
    test = data.digits()
    assert abs(reference.accuracy(model, test.x_test, test.y_test) - summary["accuracy"]) < 1e-6
    # every peer checkpointed its stage atomically at the last commit: together, the whole model
    held = set()
    for k in range(len(ring.agents)):
        folder = ring.workdir / f"agent{k}" / "jobs" / summary["job"]
        journal = json.loads((folder / "journal.json").read_text())
        ckpt = torch.load(folder / f"stage-{journal['version']}a{journal['commit_attempt']}.pt", weights_only=True)
        assert ckpt["job"] == summary["job"] and journal["state"] == "done"
        held |= set(ckpt["layers"])
    assert held == {0, 1, 2}


def test_status_reports_peers_and_stages(digits_ring):
    st = digits_ring.agents[0].status()
    assert st["ring"] == digits_ring.ring and st["version"] == 1 and "nsplit" in st["capabilities"]
    assert {p["peer"] for p in st["peers"]} == {a.peer_id for a in digits_ring.agents[1:]}
    assert st["data"] == {"name": "digits", "samples": 479, "test_samples": 360}
    assert all(p["source"] == "mdns" for p in st["peers"])


def test_peers_disappear_when_they_stop_and_duplicate_ids_are_reported(start_ring):
    ring = start_ring([[], [], []])
    gone = ring.agents[2]
    assert gone.stop() == 0  # clean exit on SIGTERM
    wait_until(lambda: all({p["peer"] for p in a.status()["peers"]} == {b.peer_id for b in ring.agents[:2]} - {a.peer_id}
                           for a in ring.agents[:2]), 60, "the stopped peer leaves every view")
    # a copied state dir (same peer id) advertised from another port: reported, not silently merged
    import shutil
    from peer.localring import AgentProcess
    clone_dir = ring.workdir / "clone"
    shutil.copytree(ring.workdir / "agent0", clone_dir, ignore=shutil.ignore_patterns("lock"))
    clone = AgentProcess(["--ring", ring.ring, "--interface", "127.0.0.1", "--port", "0", "--state-dir",
                          str(clone_dir)], ring.workdir / "clone.log")
    try:
        clone.wait_ready(60)
        assert clone.peer_id == ring.agents[0].peer_id
        conflicts = wait_until(lambda: ring.agents[0].status()["conflicts"], 60, "the clone is reported")
        assert len(conflicts) == 1 and f"duplicate peer id {clone.peer_id}" in conflicts[0]
        assert ring.agents[0].url in conflicts[0] and clone.url in conflicts[0]
    finally:
        clone.stop()


def test_known_peers_without_mdns(start_ring, tmp_path):
    from peer.localring import AgentProcess
    import socket

    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    agents = []
    try:
        for k in range(2):
            args = ["--ring", "joined", "--no-mdns", "--interface", "127.0.0.1", "--port", str(ports[k]),
                    "--state-dir", str(tmp_path / f"a{k}"), "--join", f"127.0.0.1:{ports[1 - k]}",
                    "--data", "digits", "--shard", f"{k}/2"]
            agents.append(AgentProcess(args, tmp_path / f"a{k}.log"))
        for a in agents:
            a.wait_ready(60)
        wait_until(lambda: all(a.status()["peers"] for a in agents), 60, "both agents see each other")
        for a, other in zip(agents, reversed(agents)):
            assert [(p["peer"], p["url"], p["source"]) for p in a.status()["peers"]] == [(other.peer_id, other.url,
                                                                                         "join")]
        out = tmp_path / "model.pt"
        summary = summary_of(train_cli(agents[0].url, "--epochs", "1", "--out", str(out)))
        order = sorted(agents, key=lambda a: a.peer_id)
        assert summary["ring"] == [a.peer_id for a in order]
        heads = [data.load("digits", f"{agents.index(a)}/2") for a in order]
        assert max_diff(load_out(out), reference.train(JobConfig(epochs=1), heads).state_dict()) <= 1e-5
    finally:
        for a in agents:
            a.stop()


def test_train_finds_the_ring_by_mdns(digits_ring):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "peer", "train", "--ring", digits_ring.ring, "--interface",
                           "127.0.0.1", "--epochs", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert summary_of(proc)["ring"] == [a.peer_id for a in digits_ring.ring_order()]
    st = subprocess.run([sys.executable, "-m", "peer", "status", "--ring", digits_ring.ring, "--interface",
                         "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "sees 2 peer(s)" in st.stdout
