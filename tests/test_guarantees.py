"""Guarantees that each have a test failing without them (scripts/mutants.py breaks each on purpose): layer
state verified on both ends of a swap, signed bodies, data-plane messages delivered at most once, a commit
that refuses a stage over budget or missing a layer, and a receiver that stops reading from a neighbour its
stage cannot keep up with. Real agents on loopback; faults injected with peer.faults."""
import hashlib
import json
import time
import urllib.request

import pytest
import torch

from conftest import http_post, load_out, max_diff, summary_of
from peer.localring import train_cli
from pipeline import reference
from pipeline.config import JobConfig
from pipeline.models import build_model, spec_hash
from protocols.auth import sign_request
from test_recovery import JOB, expected, shards  # noqa: F401  (shards: a fixture)

SECRET = "the ring's secret"
_T = JOB.index("--peer-timeout")
STEADY = JOB[:_T] + JOB[_T + 2:]   # for tests not about detecting a lost peer: the default peer timeout


def rejected(url: str) -> dict[str, float]:
    """This agent's refused messages by code, from /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {line.split('code="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in lines if line.startswith("splitring_rejected_total{")}


def resume_command(stderr: str) -> str:
    return stderr.split("splitring train --resume ")[1].split("`")[0]


# --- a swap's layer state is verified by its receiver and by its sender ----------------------------------------

def test_layer_state_corrupted_in_transit_is_refused_by_its_receiver_and_the_job_resumes_exact(
        start_ring, shards, tmp_path):
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths], env={1: {"SPLITRING_TEST_FAULT": "corrupt:swap_receive:1"}})
    coordinator = ring.agents[0]
    failed = train_cli(coordinator.url, *STEADY)
    assert failed.returncode == 1, failed.stderr
    assert "layer state does not match its checksum" in failed.stderr and ring.agents[1].peer_id in failed.stderr
    assert all(a.status()["stages"] == [] for a in ring.agents)   # nothing of the corrupted swap was kept
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(coordinator.url, "--resume", resume_command(failed.stderr), "--out", str(out)))
    assert summary["attempts"] == 2
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5


def test_a_receiver_whose_copy_is_not_what_was_sent_is_refused_by_the_sender(start_ring, shards):
    """The receiver answers with the checksum of what it got (here, a different one): the sender compares."""
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths], env={1: {"SPLITRING_TEST_FAULT": "lie:swap_receive:1"}})
    failed = train_cli(ring.agents[0].url, *STEADY)
    assert failed.returncode == 1, failed.stderr
    assert f"layer transfer to {ring.agents[1].peer_id} failed verification" in failed.stderr, failed.stderr
    assert all(a.status()["stages"] == [] for a in ring.agents)


# --- a signed request's body is what was signed ------------------------------------------------------------------

def test_a_signed_request_whose_body_was_changed_is_refused(start_ring):
    ring = start_ring([["--data", "digits"]], secret=SECRET)
    url, key = ring.urls[0], ring.key
    signed = json.dumps({"v": 1, "type": "job_abort", "job": "x", "reason": "signed"}).encode()
    changed = json.dumps({"v": 1, "type": "job_abort", "job": "y", "reason": "changed"}).encode()
    json_type = {"Content-Type": "application/json"}
    headers = {**sign_request(key, "POST", "/job/abort", signed, time.time()), **json_type}
    status, body = http_post(url + "/job/abort", changed, headers)
    assert status == 401 and body["error"] == "unauthenticated" and "body" in body["message"], body
    headers = {**sign_request(key, "POST", "/job/abort", signed, time.time()), **json_type}
    assert http_post(url + "/job/abort", signed, headers) == (200, {"aborted": False})   # as signed: served


# --- a data-plane message is delivered at most once -------------------------------------------------------------

def test_duplicated_and_replayed_data_plane_messages_are_refused_and_the_model_is_exact(start_ring, shards, tmp_path):
    """Agent 0 sends its 3rd fwd message twice in a row, and its 2nd bwd message again just before its 3rd
    (by then consumed); each copy is refused and the job ends as plain PyTorch says."""
    sets, paths = shards
    ring = start_ring([["--data", p] for p in paths],
                      env={0: {"SPLITRING_TEST_FAULT": "dup:send_fwd:3,replay:send_bwd:2"}})
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.agents[1].url, *STEADY, "--out", str(out)))
    assert summary["attempts"] == 1
    assert max_diff(load_out(out), expected(ring, sets, "nsplit")) <= 1e-5
    refused = [rejected(a.url) for a in ring.agents[1:]]
    assert sum(r.get("duplicate", 0) for r in refused) == 2, refused
    assert all(set(r) <= {"duplicate"} for r in refused), refused


# --- a commit holds exactly the planned layers, within the budget -----------------------------------------------

def prepare(url: str, peer: str, cfg: JobConfig, job: str, coordinator: str | None = None,
            **extra) -> tuple[int, dict]:
    msg = {"v": 1, "type": "job_prepare", "job": job, "config": cfg.to_dict(), "ring": [{"peer": peer, "url": url}],
           "coordinator": coordinator or peer, "spec_hash": spec_hash(cfg.model), **extra}
    return http_post(url + "/job/prepare", json.dumps(msg).encode(), {"Content-Type": "application/json"})


def commit(url: str, peer: str, job: str, rotation: int, layers: list[int]) -> tuple[int, dict]:
    msg = {"v": 1, "type": "job_commit", "job": job, "rotation": rotation, "version": rotation, "epoch": 0,
           "chain": [peer], "ranges": {peer: layers}, "head_samples": 10, "head_test_samples": 10}
    return http_post(url + "/job/commit", json.dumps(msg).encode(), {"Content-Type": "application/json"})


def swap_receive(url: str, job: str, state: dict) -> tuple[int, dict]:
    """Layers (Stage.export) sent to `url` as a swap into rotation 1 sends them."""
    from pipeline.stage import checksum
    from protocols import message
    from protocols.frames import encode_frame

    msg = message("swap_receive", job=job, rotation=1, attempt=0, layers=state, checksum=checksum(state))
    return http_post(url + "/job/swap/receive", encode_frame(msg), {"Content-Type": "application/cbor"})


def test_a_commit_over_the_memory_budget_is_refused_naming_the_shortfall(start_ring):
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 512})
    ring = start_ring([["--data", "digits", "--memory-budget", "400KiB"]])
    agent = ring.agents[0]
    assert prepare(agent.url, agent.peer_id, cfg, "b0d9e7000001")[0] == 200
    whole = len(list(build_model(cfg.model, 0)))
    status, body = commit(agent.url, agent.peer_id, "b0d9e7000001", 0, [0, whole])
    assert status == 409 and "over its memory budget of 409600" in body["message"], body
    assert "would hold" in body["message"]
    assert commit(agent.url, agent.peer_id, "b0d9e7000001", 1, [0, 1])[0] == 200   # one layer fits


def test_layers_received_in_a_swap_over_the_memory_budget_are_refused(start_ring):
    """The stage holds layer 0 (parameters and gradients: 2 x 33 KB) within 120 KiB. Layer 1 (66 KB) would fit
    alone, but not on top of layer 0, which stays until the commit: refused, nothing kept. Layer 2 (5 KB) fits
    beside layer 0 and is taken."""
    from pipeline.stage import Stage

    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 128})
    ring = start_ring([["--data", "digits", "--memory-budget", "120KiB"]])
    agent, job = ring.agents[0], "b0d9e7000003"
    assert prepare(agent.url, agent.peer_id, cfg, job)[0] == 200
    assert commit(agent.url, agent.peer_id, job, 0, [0, 1])[0] == 200
    whole = Stage.build(cfg, 0, 3)
    layer1 = sum(t.numel() * t.element_size() for t in whole.export([1])[1]["params"].values())
    assert whole.memory_bytes() > 120 * 1024 > layer1   # (its state as received: no gradients yet)

    def receive(layers: list[int]) -> tuple[int, dict]:
        return swap_receive(agent.url, job, whole.export(layers))
    status, body = receive([1])
    assert status == 409 and "over its memory budget of 122880" in body["message"], body
    assert "layers [1] received for rotation 1" in body["message"]
    assert receive([2])[0] == 200


def test_a_received_layer_that_does_not_fit_beside_the_others_waits_on_disk_for_the_commit(start_ring):
    """The stage holds layers 0-1 (198 656 bytes with gradients) and gets layers 2-3 for the next rotation.
    Layer 2 fits beside them (264 704 of 266 000); layer 3 does too, but not with layer 2 kept as well
    (269 864): it goes to disk. The commit frees layers 0-1, then takes 2 and 3: within the budget, and
    layer 3 is the one sent."""
    from pipeline.stage import Stage
    from protocols.frames import decode_frame

    cfg = JobConfig(model={"name": "mlp", "depth": 3, "width": 128})
    ring = start_ring([["--data", "digits", "--memory-budget", "266000"]])
    agent, job = ring.agents[0], "b0d9e7000004"
    assert prepare(agent.url, agent.peer_id, cfg, job)[0] == 200
    assert commit(agent.url, agent.peer_id, job, 0, [0, 2])[0] == 200
    whole = Stage.build(cfg, 0, 4)
    for i in (2, 3):
        status, body = swap_receive(agent.url, job, whole.export([i]))
        assert status == 200, body
    stage, = json.loads(urllib.request.urlopen(agent.url + "/status").read())["stages"]
    assert stage["swap_spills"] == 1 and 264_704 <= stage["peak_swap_bytes"] <= 266_000
    assert commit(agent.url, agent.peer_id, job, 1, [2, 4])[0] == 200
    held = decode_frame(urllib.request.urlopen(f"{agent.url}/job/{job}/params").read())["layers"]
    assert sorted(held) == [2, 3]
    assert all(torch.equal(held[3][k], v) for k, v in whole.export([3])[3]["params"].items())


def test_a_commit_missing_a_layer_is_refused_naming_it(start_ring):
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 32})
    ring = start_ring([["--data", "digits"]])
    agent = ring.agents[0]
    assert prepare(agent.url, agent.peer_id, cfg, "b0d9e7000002")[0] == 200
    assert commit(agent.url, agent.peer_id, "b0d9e7000002", 0, [0, 2])[0] == 200
    status, body = commit(agent.url, agent.peer_id, "b0d9e7000002", 1, [0, 3])   # layer 2: no transfer came
    assert status == 409 and "layers [2] never arrived" in body["message"], body


# --- a receiver whose stage falls behind stops reading --------------------------------------------------------

def test_a_receiver_that_falls_behind_stops_reading_and_the_model_is_exact(start_ring, shards, tmp_path):
    """GPipe sends a step's 8 forwards before its first backward; agent 1 computes 30x slower and lets 2
    messages of a kind wait unread: when it is the tail, agent 0 runs ahead until its messages wait 2 deep,
    then agent 1 stops reading them until its stage takes one. Nothing is refused or lost."""
    sets, paths = shards
    ring = start_ring([["--data", paths[0], "--pending-messages", "2"],
                       ["--data", paths[1], "--pending-messages", "2", "--compute-slowdown", "30"]])
    out = tmp_path / "model.pt"
    args = ["--epochs", "1", "--batch-size", "32", "--seed", "5", "--split", "even", "--scheme", "fast",
            "--microbatches", "8", "--pipeline", "gpipe", "--recv-timeout", "30"]   # (a lost message fails in 30 s)
    summary = summary_of(train_cli(ring.agents[0].url, *args, "--out", str(out)))
    assert summary["attempts"] == 1
    cfg = JobConfig(epochs=1, batch_size=32, seed=5, microbatches=8)
    want = reference.train(cfg, [sets[ring.agents.index(a)] for a in ring.ring_order()]).state_dict()
    assert max_diff(load_out(out), want) <= 1e-5
    status = ring.agents[1].status()
    # reading paused at the limit
    assert status["peak_unread_messages"] == 2 and status["backpressure_waits"] > 0, status["stages"]
    assert all(rejected(a.url) == {} for a in ring.agents)


@pytest.mark.parametrize("bad", ["0", "x"])
def test_pending_messages_below_one_is_refused_at_start(bad, tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "peer", "agent", "--pending-messages", bad, "--no-mdns",
                           "--interface", "127.0.0.1", "--state-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "pending-messages" in proc.stderr, proc.stderr


# --- recovery: what is on disk and who drives a job ----------------------------------------------------------------

def test_a_checkpoint_that_does_not_match_the_journal_is_refused_on_restore(start_ring):
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 32})
    ring = start_ring([["--data", "digits"]])
    agent, job = ring.agents[0], "b0d9e7000003"
    assert prepare(agent.url, agent.peer_id, cfg, job)[0] == 200
    status, committed = commit(agent.url, agent.peer_id, job, 0, [0, 3])
    assert status == 200
    restore = {"version": 0, "attempt": 0, "checksums": {agent.peer_id: "0" * 64}}
    status, body = prepare(agent.url, agent.peer_id, cfg, job, attempt=1, restore=restore)
    assert status == 409 and "stage-0a0.pt does not match" in body["message"], body
    restore["checksums"][agent.peer_id] = committed["checksum"]   # the file as committed: restored
    status, body = prepare(agent.url, agent.peer_id, cfg, job, attempt=2, restore=restore)
    assert status == 200 and body["restored"]["own"] == [0, 1, 2], body


def test_a_replica_whose_bytes_do_not_match_its_checksum_is_not_kept(tmp_path):
    from peer.state import CorruptFile, StateDir
    state, job = StateDir(tmp_path), "b0d9e7000004"
    data, digest = b"the bytes of a checkpoint", hashlib.sha256(b"the bytes of a checkpoint").hexdigest()
    with pytest.raises(CorruptFile, match="does not match its checksum"):
        state.save_replica(job, "p1", 3, 0, 0, len(data), data, hashlib.sha256(b"other bytes").hexdigest())
    assert not state.checkpoint_path(job, 3, 0, "p1").exists()
    # in pieces: nothing is kept until the last, and a piece out of place is refused
    assert state.save_replica(job, "p1", 3, 0, 0, len(data), data[:10], digest) == (10, None)
    with pytest.raises(ValueError, match="at byte 12 .* with 10 bytes of it here"):
        state.save_replica(job, "p1", 3, 0, 12, len(data), data[12:], digest)
    assert not state.checkpoint_path(job, 3, 0, "p1").exists()
    assert state.save_replica(job, "p1", 3, 0, 10, len(data), data[10:], digest) == (len(data), digest)
    assert state.checkpoint_path(job, 3, 0, "p1").read_bytes() == data
    with pytest.raises(ValueError, match="at byte 0 of a 5-byte replica"):   # more than it said it would send
        state.save_replica(job, "p1", 4, 0, 0, 5, data, digest)


def test_a_journal_older_than_the_one_held_is_refused(start_ring):
    ring = start_ring([["--data", "digits"]])
    agent, job = ring.agents[0], "b0d9e7000005"

    def put(version: int, attempt: int) -> tuple[int, dict]:
        journal = {"job": job, "state": "running", "version": version, "rotation": version, "commit_attempt": attempt,
                   "attempt": attempt, "coordinator": agent.peer_id, "config": {}, "ring": [], "checksums": {},
                   "updated": 0}
        msg = {"v": 1, "type": "journal_put", "job": job, "journal": journal}
        return http_post(agent.url + "/job/journal", json.dumps(msg).encode(), {"Content-Type": "application/json"})

    assert put(3, 1)[0] == 200
    for older in ((2, 2), (3, 0)):
        status, body = put(*older)
        assert status == 400 and body["error"] == "stale", body
    on_disk = json.loads((ring.workdir / "agent0" / "jobs" / job / "journal.json").read_text())
    assert (on_disk["version"], on_disk["attempt"]) == (3, 1)
    assert put(4, 0)[0] == 200   # a later commit, whatever its attempt


def test_a_second_coordinator_is_refused_while_the_first_is_heard_from(start_ring):
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 32}, peer_timeout=5)
    ring = start_ring([["--data", "digits"]])
    agent, job = ring.agents[0], "b0d9e7000006"
    assert prepare(agent.url, agent.peer_id, cfg, job, coordinator="first")[0] == 200
    status, body = prepare(agent.url, agent.peer_id, cfg, job, coordinator="second", attempt=1)
    assert status == 409 and "one coordinator per job" in body["message"], body
