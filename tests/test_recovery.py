"""A ring that survives its peers (peer/coordinator.py recovery, peer/services/work.py heartbeats and
journal): real agents, real signals. A peer killed at any moment and restarted with its state dir, a hung
peer, the coordinator killed, Ctrl-C: the job ends with the model plain PyTorch gives, and every checkpoint,
replica and journal on disk loads and matches its checksum."""
import json
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import load_out, max_diff, save_npz, summary_of, wait_until
from peer.localring import train_cli, train_process
from peer.state import audit
from pipeline.jobplan import successor
from pipeline import data, reference
from pipeline.config import JobConfig

PARTS = [(0, 200), (200, 330), (330, 600)]   # unequal shards: passes of different lengths
JOB = ["--epochs", "3", "--batch-size", "24", "--momentum", "0.9", "--lr", "0.05", "--seed", "5",
       "--split", "even", "--peer-timeout", "3", "--rejoin-timeout", "60"]
SCHEMES = {"nsplit": [], "fast": ["--scheme", "fast", "--microbatches", "3"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    digits = data.load("digits")
    tmp = tmp_path_factory.mktemp("shards")
    sets = [data.Dataset(f"p{k}", digits.x[a:b], digits.y[a:b]) for k, (a, b) in enumerate(PARTS)]
    return sets, [save_npz(tmp / f"p{k}.npz", s.x, s.y) for k, s in enumerate(sets)]


def expected(ring, sets, scheme: str) -> dict:
    """Plain PyTorch over the same samples in the same order (heads in ring order)."""
    cfg = JobConfig(epochs=3, batch_size=24, momentum=0.9, lr=0.05, seed=5,
                    microbatches=3 if scheme == "fast" else 1)
    return reference.train(cfg, [sets[ring.agents.index(a)] for a in ring.ring_order()]).state_dict()


def in_background(url: str, *args) -> tuple[threading.Thread, dict]:
    result = {}
    thread = threading.Thread(target=lambda: result.update(proc=train_cli(url, *args)))
    thread.start()
    return thread, result


def rotation_of(agent) -> int:
    try:
        return max([s["rotation"] for s in agent.status()["stages"]], default=-1)
    except OSError:
        return -1


def progress_of(agent) -> tuple[int, int]:
    """(rotation, training steps done in it) of the agent's stage; (-1, 0) before it has one."""
    try:
        stages = agent.status()["stages"]
    except OSError:
        return -1, 0
    done = [(p["rotation"], p["step"]) for s in stages if (p := s["progress"]).get("mode", "train") == "train"]
    return max(done, default=(-1, 0))


def check_files(ring, job: str) -> dict:
    """Every peer's journal of the job agrees on its last commit, and every checkpoint and replica of it is on
    disk, loads, and matches the checksum recorded for it (peer.state.audit). Returns the journal."""
    roots = [ring.workdir / f"agent{k}" for k in range(len(ring.agents))]
    journals = [json.loads((root / "jobs" / job / "journal.json").read_text()) for root in roots]
    assert len({(j["version"], j["state"]) for j in journals}) == 1, [(j["version"], j["state"]) for j in journals]
    assert [problem for root in roots for problem in audit(root, job)] == []
    j = journals[0]
    for p in j["ring"]:   # each checkpoint of the last commit is also on its successor
        succ = successor([q["peer"] for q in j["ring"]], p["peer"])
        assert (roots[[a.peer_id for a in ring.agents].index(succ)] / "jobs" / job /
                f"replica-{p['peer']}-{j['version']}a{j['commit_attempt']}.pt").exists()
    return j


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_peer_killed_at_a_random_moment_and_restarted_leaves_the_model_exact(start_ring, shards, tmp_path, scheme):
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths])
    rng = random.Random(f"kill-{scheme}")
    order = ring.ring_order()
    # a moment chosen by the job's progress, not by the clock: a step of a rotation (every pass has >= 6 steps)
    victim, rotation, step = rng.choice(order[1:]), rng.randint(1, 6), rng.randint(1, 5)
    out = tmp_path / "model.pt"
    thread, result = in_background(order[0].url, *JOB, *SCHEMES[scheme], "--out", str(out))
    wait_until(lambda: progress_of(victim) >= (rotation, step), 120, f"the job reaches step {step} of rotation {rotation}",
             every=0.01)
    k = ring.agents.index(victim)
    ring.kill(k)
    ring.restart(k)
    thread.join(300)
    summary = summary_of(result["proc"])
    assert [r["peer"] for r in summary["recoveries"]] == [victim.peer_id] and summary["attempts"] == 2, \
        result["proc"].stderr
    assert f"peer {victim.peer_id} lost" in result["proc"].stderr and "resumed as attempt 1" in result["proc"].stderr
    assert max_diff(load_out(out), expected(ring, sets, scheme)) <= 1e-5
    assert check_files(ring, summary["job"])["state"] == "done"


@pytest.mark.parametrize("point", ["swap_receive:2", "commit:3"])
def test_a_peer_killed_during_a_swap_leaves_one_whole_version_and_the_model_exact(start_ring, shards, tmp_path, point):
    """swap_receive: the victim dies with layers on their way to it; commit: with its checkpoint of the new
    rotation written while the others may have written theirs or not."""
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths], env={1: {"SPLITRING_TEST_FAULT": f"kill:{point}"}})
    victim = ring.agents[1]
    coordinator = next(a for a in ring.ring_order() if a is not victim)
    out = tmp_path / "model.pt"
    thread, result = in_background(coordinator.url, *JOB, "--out", str(out))
    wait_until(lambda: victim.proc.poll() is not None, 120, f"the victim kills itself at {point}")
    ring.restart(1)
    thread.join(300)
    summary = summary_of(result["proc"])
    assert [r["peer"] for r in summary["recoveries"]] == [victim.peer_id]
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5
    check_files(ring, summary["job"])


def test_a_hung_peer_is_detected_by_the_peer_timeout_and_rejoins_after_sigcont(start_ring, shards, tmp_path):
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths])
    order = ring.ring_order()
    hung = order[1]
    out = tmp_path / "model.pt"
    thread, result = in_background(order[0].url, *JOB, "--out", str(out))
    wait_until(lambda: rotation_of(hung) >= 2, 120, "the job reaches rotation 2")
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: any(s.get("event") in ("lost", "rollback") for s in order[0].status()["jobs"].values()),
                 120, "the coordinator declares the hung peer lost")
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    thread.join(300)
    summary = summary_of(result["proc"])
    (lost,) = summary["recoveries"]
    # found by the heartbeats' peer_timeout (not a pass's recv_timeout, 120 s), and it came back: nothing skipped
    assert lost["peer"] == hung.peer_id and "answered no heartbeat" in lost["error"] and "(peer_timeout 3 s)" in \
        lost["error"], lost
    assert summary["lost"] == [] and summary["skipped"] == [] and summary["attempts"] == 2
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5


def test_the_coordinator_killed_mid_job_and_resumed_from_another_peer_finishes_exact(start_ring, shards, tmp_path):
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths])
    order = ring.ring_order()
    coordinator, other = order[0], order[2]
    thread, result = in_background(coordinator.url, *JOB)
    wait_until(lambda: rotation_of(other) >= 3, 120, "the job reaches rotation 3")
    k = ring.agents.index(coordinator)
    ring.kill(k)
    thread.join(60)
    assert result["proc"].returncode == 1
    survivors = [a for a in ring.agents if a is not coordinator]
    # nobody keeps a stage for a job nobody drives: each survivor frees it and holds the job, because its
    # coordinator fell silent for peer_timeout
    held = wait_until(lambda: all(a.status()["stages"] == [] and a.status()["held"] for a in survivors), 120,
                    "the survivors free their stages and hold the job")
    job = survivors[0].status()["held"][0]["job"]
    for a in survivors:
        (h,) = a.status()["held"]
        assert h["job"] == job and h["coordinator"] == coordinator.peer_id, h
        assert f"its coordinator {coordinator.peer_id} was silent" in h["reason"] and "(peer_timeout 3 s)" in h["reason"]
    ring.restart(k)
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(other.url, "--resume", job, "--out", str(out)))
    assert summary["job"] == job and summary["attempts"] == 2
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5
    assert check_files(ring, job)["coordinator"] == other.peer_id and held


def test_after_a_power_cut_every_agent_restarted_and_resume_finishes_exact(start_ring, shards, tmp_path):
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths])
    order = ring.ring_order()
    thread, result = in_background(order[0].url, *JOB)
    wait_until(lambda: rotation_of(order[1]) >= 4, 120, "the job reaches rotation 4")
    job = order[1].status()["stages"][0]["job"]
    for k in range(3):
        ring.kill(k)
    thread.join(60)
    for k in range(3):
        ring.restart(k)
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.agents[2].url, "--resume", job, "--out", str(out)))
    assert summary["job"] == job
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5
    check_files(ring, job)


def test_ctrl_c_stops_the_job_cleanly_and_resume_finishes_it_exact(start_ring, shards, tmp_path):
    """The coordinator holds before its 4th rotation until the job is stopped, so the job is surely running
    when Ctrl-C comes (unheld, it ends within two seconds: a loaded machine once delivered the signal later)."""
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths], peer_ids=["p0", "p1", "p2"],
                      env={0: {"SPLITRING_TEST_FAULT": "hold:rotation:4"}})
    order = ring.ring_order()
    assert order[0] is ring.agents[0]
    proc = train_process(order[0].url, *JOB)
    log = ring.workdir / "agent0.log"
    wait_until(lambda: "test fault: hold at rotation:4" in log.read_text(), 120, "the coordinator holds")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resume it with `splitring train --resume" in err, err
    assert "Traceback" not in err
    job = err.split("splitring train --resume ")[1].split("`")[0]
    assert all(a.status()["stages"] == [] for a in ring.agents)
    listed = json.loads(subprocess.run([sys.executable, "-m", "peer", "jobs", "--peer", order[1].url, "--json"],
                                       capture_output=True, text=True).stdout)
    assert [j["state"] for j in listed if j["job"] == job] == ["stopped"]
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(order[1].url, "--resume", job, "--out", str(out)))
    assert summary["job"] == job and summary["attempts"] == 2
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5


def test_detach_then_attach_from_another_peer_and_jobs_lists_it(start_ring, shards):
    _, paths = shards
    ring = start_ring([["--data", p] for p in paths])
    order = ring.ring_order()
    started = train_cli(order[0].url, *JOB, "--detach")
    assert started.returncode == 0, started.stderr
    job = started.stdout.strip()
    summary = summary_of(subprocess.run([sys.executable, "-m", "peer", "attach", job, "--peer", order[2].url,
                                         "--json"], capture_output=True, text=True, timeout=300))
    assert summary["job"] == job and summary["epochs"] == 3
    for a in ring.agents:
        listed = json.loads(subprocess.run([sys.executable, "-m", "peer", "jobs", "--peer", a.url, "--json"],
                                           capture_output=True, text=True).stdout)
        assert [j["state"] for j in listed if j["job"] == job] == ["done"]


def lose_for_good(start_ring, tmp_path, args: list[str], at_rotation: int):
    """A 4-peer job whose third peer in ring order is SIGKILLed once it reaches `at_rotation`, and not
    restarted: (ring order, victim, summary, the model)."""
    ring = start_ring([["--data", "digits", "--shard", f"{k}/4"] for k in range(4)])
    order = ring.ring_order()
    victim = order[2]
    out = tmp_path / "model.pt"
    thread, result = in_background(order[0].url, *args, "--peer-timeout", "3", "--rejoin-timeout", "2",
                                   "--model-options", "depth=3", "--split", "even", "--out", str(out))  # a layer each
    wait_until(lambda: rotation_of(victim) >= at_rotation, 120, f"the job reaches rotation {at_rotation}")
    ring.kill(ring.agents.index(victim))
    thread.join(300)
    summary = summary_of(result["proc"])
    assert summary["lost"] == [victim.peer_id] and "going on without" in result["proc"].stderr
    heads = [data.load("digits", f"{ring.agents.index(a)}/4") for a in order]
    return order, victim, summary, load_out(out), heads


def test_a_peer_lost_for_good_the_job_goes_on_without_it(start_ring, tmp_path):
    """4 peers, one killed and not restarted: its layers come back from the replica on its successor, the
    survivors re-plan, its own passes are skipped (and reported), and the model is plain PyTorch's over the
    passes that ran (which ones depends on when the peer was lost)."""
    cfg = JobConfig(model={"name": "mlp", "depth": 3}, epochs=12, lr=0.2)
    order, victim, summary, got, heads = lose_for_good(start_ring, tmp_path, ["--epochs", "12", "--lr", "0.2"], 6)
    (lost,) = summary["recoveries"]
    a, b = lost["ranges"][victim.peer_id]   # its layer at the last commit, restored from the replica
    assert b > a and lost["restored"][order[3].peer_id]["adopted"] == {victim.peer_id: list(range(a, b))}
    assert [(s["peer"], s["rotation"]) for s in summary["skipped"]] == [
        (victim.peer_id, e * 4 + 2) for e in range(12) if e * 4 + 2 >= lost["rotation"]]
    assert summary["ring"] == [p.peer_id for p in order if p is not victim]
    assert all(set(p["ranges"]) == set(summary["ring"]) for p in summary["plans"] if p["rotation"] > lost["rotation"])
    skipped = {(s["epoch"], 2) for s in summary["skipped"]}
    # 12 epochs at lr 0.2: ~900 steps, over which the agents' and one process's last-bit rounding differences
    # grow past 1e-5 on some runs (the 3-epoch test below holds 1e-5); a skipped or repeated pass is 1e-1 off
    diff = max_diff(got, reference.train(cfg, heads, skipped=skipped).state_dict())
    assert diff <= 1e-4, diff


def test_going_on_without_a_lost_peer_equals_plain_pytorch_over_the_passes_that_ran(start_ring, tmp_path):
    cfg = JobConfig(model={"name": "mlp", "depth": 3}, epochs=3, lr=0.05, momentum=0.9)
    _, _, summary, got, heads = lose_for_good(start_ring, tmp_path, ["--epochs", "3", "--momentum", "0.9"], 2)
    skipped = {(s["epoch"], 2) for s in summary["skipped"]}
    assert skipped and max_diff(got, reference.train(cfg, heads, skipped=skipped).state_dict()) <= 1e-5


def test_the_chaos_script_kills_and_every_job_still_ends_exact():
    """scripts/chaos.py, short: 2 jobs (seed 1: the coordinator killed, then a worker)."""
    proc = subprocess.run([sys.executable, "scripts/chaos.py", "--jobs", "2", "--seed", "1", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["jobs"] == res["finished"] == res["exact"] == 2 and res["corrupt_files"] == 0
    assert res["coordinators_killed"] == 1 and res["recovered"] == 2
