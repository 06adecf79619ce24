"""The data plane between real agents: wire dtypes in a training job, /status while large tensors are in
flight, and a receiver that stops reading."""
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import summary_of
from peer import transport
from peer.localring import LocalRing, get_json, train_cli
from protocols import encode_frame, message
from protocols.frames import header_length


@pytest.fixture(scope="module")
def ring():
    with LocalRing([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)]) as r:
        yield r


def received_bytes(ring) -> float:
    total = 0.0
    for a in ring.agents:
        with urllib.request.urlopen(f"{a.url}/metrics", timeout=30) as r:
            total += float(re.search(r"^splitring_received_bytes_total (\S+)$", r.read().decode(), re.M).group(1))
    return total


def probe(sender: str, url: str, size: int, count: int, copies: bool = False) -> dict:
    body = {"v": 1, "type": "data_probe", "url": url, "bytes": size, "count": count, "copies": copies}
    req = urllib.request.Request(f"{sender}/data/probe", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_bfloat16_on_the_wire_learns_as_well_as_float32(ring):
    # a lower lr than the ring tests' 0.05 and a few more epochs: final accuracies settle near 98%, so
    # that a 1-point margin measures the wire dtype rather than the run-to-run spread of SGD
    args = ["--epochs", "12", "--lr", "0.02", "--momentum", "0.9", "--split", "even"]
    results = {}
    for wire in ("float32", "bfloat16"):
        before = received_bytes(ring)
        summary = summary_of(train_cli(ring.urls[0], *args, "--wire-dtype", wire))
        results[wire] = (summary, received_bytes(ring) - before)
    (exact, exact_bytes), (bf16, bf16_bytes) = results["float32"], results["bfloat16"]
    assert (bf16["wire_dtype"], bf16["compress"]) == ("bfloat16", "none")
    assert exact["accuracy"] >= 0.95
    assert abs(bf16["accuracy"] - exact["accuracy"]) <= 0.01
    # activations and gradients really travelled in 2 bytes a value (labels and swaps did not shrink)
    assert bf16_bytes < 0.75 * exact_bytes


def test_status_answers_on_both_ends_while_64_mib_tensors_are_in_flight(ring):
    sender, receiver = ring.agents[0], ring.agents[1]
    result = {}
    transfer = threading.Thread(target=lambda: result.update(probe(sender.url, receiver.url, 64 << 20, 24)))
    transfer.start()
    answered = {sender.url: 0, receiver.url: 0}
    while transfer.is_alive():
        for a in (sender, receiver):
            assert get_json(f"{a.url}/status", timeout=10)["peer"] == a.peer_id
            answered[a.url] += transfer.is_alive()
    transfer.join()
    assert result.get("seconds", 0) > 0, result
    assert all(n >= 1 for n in answered.values()), answered  # polled while the transfer was running


class StalledReceiver:
    """Accepts the data-plane upgrade and the hello like an agent, then never reads again."""

    def __init__(self, ring_name: str):
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen()
        self.url = f"http://127.0.0.1:{self.srv.getsockname()[1]}"
        self.conn = None
        self.ring_name = ring_name
        threading.Thread(target=self._serve, daemon=True).start()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.conn.recv(n - len(data))
        return data

    def _serve(self):
        self.conn, _ = self.srv.accept()
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._read(1)
        self.conn.sendall(f"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                          f"Upgrade: {transport.UPGRADE}\r\n\r\n".encode())
        self._read(header_length(self._read(4)))  # the hello: no tensors
        self.conn.sendall(encode_frame(message("hello", peer="stalled", ring=self.ring_name)))

    def close(self):
        if self.conn:
            self.conn.close()
        self.srv.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def test_a_receiver_that_stops_reading_bounds_the_senders_memory(ring):
    sender, peer = ring.agents[2], ring.agents[0]
    size, count = 16 << 20, 64  # 1 GiB offered
    assert "seconds" in probe(sender.url, peer.url, size, 4, copies=True)  # warm: the same path, allocations made
    before = rss_bytes(sender.proc.pid)
    stalled = StalledReceiver(ring.ring)
    result = {}
    # every message a new tensor, as in training: if anything queued them, memory would grow by up to 1 GiB
    transfer = threading.Thread(target=lambda: result.update(probe(sender.url, stalled.url, size, count, True)))
    transfer.start()
    try:
        peak = 0
        for _ in range(20):  # 2 s of a sender facing a full pipe
            time.sleep(0.1)
            peak = max(peak, rss_bytes(sender.proc.pid))
        assert transfer.is_alive()  # blocked, not buffering
        # the queue bound: the transport's buffer and one chunk; plus the message being copied and slack
        assert transport.WRITE_HIGH + transport.CHUNK <= 32 << 20
        assert peak - before < 128 << 20, f"RSS grew by {(peak - before) >> 20} MiB"
        assert get_json(f"{sender.url}/status", timeout=10)["peer"] == sender.peer_id
    finally:
        stalled.close()
        transfer.join(120)
    assert result.get("error") == "unreachable"  # the probe ends with a clear error once the peer is gone
