"""Bad input gets a clear error, the agent keeps serving, running jobs are unaffected."""
import asyncio
import json
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
import torch

from conftest import http_post, load_out, max_diff, summary_of, wait_until
from peer.localring import AgentProcess, get_json, train_cli
from pipeline import data, reference
from pipeline.config import JobConfig
from protocols import decode_frame, encode_frame, message


async def _exchange(url: str, frames: list, read_replies: bool = True) -> list[dict]:
    replies = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{url}/ws") as ws:
            for f in frames:
                if isinstance(f, str):
                    await ws.send_str(f)
                else:
                    await ws.send_bytes(f)
                if read_replies:
                    r = await ws.receive(timeout=10)
                    replies.append(decode_frame(r.data))
    return replies


def exchange(url, frames):
    return asyncio.run(_exchange(url, frames))


def post(url: str, body: bytes, content_type="application/cbor") -> tuple[int, dict]:
    return http_post(url, body, {"Content-Type": content_type})


def hello(ring):
    return encode_frame(message("hello", peer="outsider", ring=ring))


def test_data_plane_answers_every_bad_frame_with_an_error(digits_ring):
    url, ring = digits_ring.urls[0], digits_ring.ring
    replies = exchange(url, [
        b"\xff\x00garbage",                                   # malformed before hello
        "a text frame",                                       # not binary
        encode_frame(message("fwd", job="j", rotation=0, step=0, mb=0, mode="train", x=torch.zeros(1),
                             y=torch.zeros(1, dtype=torch.int64))),  # not hello first
        hello("another-ring"),                                # wrong ring
        hello(ring),                                          # accepted
        encode_frame({"v": 1, "type": "launch", "x": 1}),     # unknown type
        encode_frame(message("job_end", job="x")),            # a control message on the data plane
        encode_frame({"v": 99, "type": "fwd"}),               # unknown protocol version
        encode_frame(message("fwd", job="nojob", rotation=0, step=0, mb=0, mode="train",
                             x=torch.zeros(2, 64), y=torch.zeros(2, dtype=torch.int64))),
    ])
    kinds = [r["type"] for r in replies]
    assert kinds == ["error"] * 4 + ["hello"] + ["error"] * 4
    codes = [r.get("code") for r in replies]
    assert codes == ["malformed", "malformed", "hello_first", "wrong_ring", None, "unknown_type", "unknown_type",
                     "version", "unknown_job"]
    assert "upgrade this agent" in replies[7]["message"]
    assert get_json(f"{url}/status")["peer"] == digits_ring.agents[0].peer_id  # still serving


def test_control_plane_refuses_bad_requests(digits_ring):
    url = digits_ring.urls[1]
    assert post(f"{url}/job/prepare", b"\x00\x00\x00\x02zz")[0] == 400
    code, body = post(f"{url}/job/prepare", json.dumps({"v": 7, "type": "job_prepare"}).encode(), "application/json")
    assert code == 400 and body["error"] == "version"
    code, body = post(f"{url}/job/commit", encode_frame(message("job_commit", job="nope", rotation=0, version=0, epoch=0,
                                                                chain=[], ranges={}, head_samples=0,
                                                                head_test_samples=0)))
    assert code == 400 and body["error"] == "unknown_job"
    code, body = post(f"{url}/jobs", json.dumps({"v": 1, "type": "job_start",
                                                 "config": {"model": {"name": "resnet9000"}}}).encode(),
                      "application/json")
    assert code == 409 and "unknown model 'resnet9000'" in body["message"]
    code, body = post(f"{url}/jobs", json.dumps({"v": 1, "type": "job_start", "config": {"epochs": 0}}).encode(),
                      "application/json")
    assert code == 409 and "epochs" in body["message"]
    assert get_json(f"{url}/status")["ring"] == digits_ring.ring


def test_injected_bad_tensors_are_refused_and_the_job_is_unaffected(digits_ring, tmp_path):
    ring = digits_ring
    order = ring.ring_order()
    out = tmp_path / "model.pt"
    result = {}
    job = threading.Thread(target=lambda: result.update(proc=train_cli(
        order[0].url, "--epochs", "2", "--lr", "0.05", "--momentum", "0.9", "--split", "even", "--out", str(out))))
    job.start()
    # wait for a stage at chain position 1 of some rotation, then attack it as if from its predecessor
    replies, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline and job.is_alive() and len(replies) < 4:
        for a in order:
            stages = a.status()["stages"]
            if stages and stages[0]["position"] == 1 and stages[0]["rotation"] >= 0:
                s = stages[0]
                pred = order[(order.index(a) - 1) % 3].peer_id
                frames = [encode_frame(message("hello", peer=pred, ring=ring.ring))]
                common = dict(job=s["job"], rotation=s["rotation"], step=0, mb=0, mode="train")
                frames += [
                    encode_frame(message("fwd", **common, x=torch.zeros(32, 7), y=torch.zeros(32, dtype=torch.int64))),
                    encode_frame(message("fwd", **common, x=torch.zeros(32, 128, dtype=torch.float64),
                                         y=torch.zeros(32, dtype=torch.int64))),
                    encode_frame(message("fwd", **{**common, "step": 10_000}, x=torch.zeros(32, 128),
                                         y=torch.zeros(32, dtype=torch.int64))),
                    encode_frame(message("fwd", **{**common, "rotation": s["rotation"] + 5}, x=torch.zeros(32, 128),
                                         y=torch.zeros(32, dtype=torch.int64))),
                ]
                try:
                    replies = exchange(a.url, frames)[1:]
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    continue
                break
        time.sleep(0.05)
    job.join(300)
    assert [r.get("code") for r in replies] == ["bad_shape", "bad_shape", "unexpected", "stale"]
    assert "expected torch.float32 [32, 128]" in replies[0]["message"]
    summary_of(result["proc"])
    heads = {a.peer_id: data.load("digits", f"{ring.agents.index(a)}/3") for a in order}
    cfg = JobConfig(epochs=2, lr=0.05, momentum=0.9)
    want = reference.train(cfg, [heads[a.peer_id] for a in order]).state_dict()
    assert max_diff(load_out(out), want) <= 1e-5


MODEL_V1 = "from torch import nn\ndef build():\n    return [lambda: nn.Linear(64, 10)]\n"
MODEL_V2 = "from torch import nn\ndef build():\n    return [lambda: nn.Linear(64, 10, bias=False)]\n"


@pytest.mark.parametrize("variant", ["missing", "different"])
def test_a_peer_without_the_models_code_refuses_the_job_clearly(tmp_path, variant):
    dirs = [tmp_path / "code0", tmp_path / "code1"]
    for d, src in zip(dirs, [MODEL_V1, None if variant == "missing" else MODEL_V2]):
        d.mkdir()
        if src:
            (d / "usermodels.py").write_text(src)
    agents = []
    try:
        for k, d in enumerate(dirs):
            env = {"PYTHONPATH": str(d)}
            agents.append(AgentProcess(["--ring", f"code-{variant}", "--interface", "127.0.0.1", "--port", "0",
                                        "--state-dir", str(tmp_path / f"s{k}"), "--data", "digits", "--shard",
                                        f"{k}/2", "--allow-model", "usermodels:*"], tmp_path / f"a{k}.log", env=env))
        for a in agents:
            a.wait_ready(60)
        wait_until(lambda: all(a.status()["peers"] for a in agents), 60, "both agents see each other")
        proc = subprocess.run([sys.executable, "-m", "peer", "train", "--peer", agents[0].url, "--model",
                               "usermodels:build", "--model-options", "input_shape=[64]", "--json"], capture_output=True, text=True, timeout=120,
                              env={"PYTHONPATH": str(dirs[0]), "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 1
        expected = "not importable on this peer" if variant == "missing" else "model spec hash differs"
        assert expected in proc.stderr and agents[1].peer_id in proc.stderr
        assert all(a.status()["stages"] == [] for a in agents)  # nothing left behind
    finally:
        for a in agents:
            a.stop()


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"), (b"garbage", "not a readable .npz"),
])
def test_agent_refuses_a_missing_or_malformed_data_file(tmp_path, content, expected):
    path = tmp_path / "data.npz"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "peer", "agent", "--data", str(path), "--state-dir",
                           str(tmp_path / "state"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr
    if content is not None:
        assert path.read_bytes() == content  # untouched


@pytest.mark.parametrize("partition", ["dirichlet", "dirichlet:0", "classes:0", "random", "iid:2"])
def test_agent_refuses_a_partition_it_cannot_read(tmp_path, partition):
    proc = subprocess.run([sys.executable, "-m", "peer", "agent", "--data", "digits", "--shard", "0/4", "--partition",
                           partition, "--state-dir", str(tmp_path / "state"), "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--partition must be" in proc.stderr


@pytest.mark.parametrize("cpus, expected", [("99999", "CPU 99999 is not available"), ("1-0", "expected a list"),
                                            ("a", "expected a list"), ("", "expected a list")])
def test_agent_refuses_cpus_it_cannot_have(tmp_path, cpus, expected):
    proc = subprocess.run([sys.executable, "-m", "peer", "agent", "--cpus", cpus, "--state-dir",
                           str(tmp_path / "state"), "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and expected in proc.stderr


def test_cpu_lists_parse_as_taskset_writes_them():
    from peer.cli.common import parse_cpus
    assert parse_cpus("0", {0, 1}) == {0} and parse_cpus("0-2,5", set(range(8))) == {0, 1, 2, 5}
    assert parse_cpus(" 1 , 0", {0, 1}) == {0, 1}
