"""TLS, as real agent processes on loopback: a ring with a secret and self-signed certificates trains the
reference model; its port speaks nothing but TLS; a signature bound to another certificate (what a
man-in-the-middle relays) is refused, and the CLI and the data plane see through a relaying
man-in-the-middle; a peer id that comes back with another certificate is refused; TLS without a secret does
not start."""
import asyncio
import http.client
import os
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import pytest

from conftest import load_out, max_diff, summary_of, wait_until
from peer.dataplane import Codec, Links
from peer.localring import AgentProcess, LocalRing, make_certificate, train_cli
from peer.security import RingAuthError, client_tls, fingerprint, server_tls
from peer.transport import connect
from pipeline import data, reference
from pipeline.config import JobConfig
from protocols.auth import H_REPLY, check_response, sign_request

SECRET = "the ring's secret"


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    with LocalRing([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)], secret=SECRET, tls=True,
                   workdir=str(tmp_path_factory.mktemp("tls-ring"))) as r:
        yield r


def test_a_tls_ring_trains_the_reference_model(ring, tmp_path):
    assert all(a.url.startswith("https://") for a in ring.agents)
    assert {p["url"] for p in ring.agents[0].status()["peers"]} == {a.url for a in ring.agents[1:]}
    out = tmp_path / "model.pt"
    env = {**os.environ, "SPLITRING_SECRET_FILE": str(ring.secret_file)}
    summary = summary_of(train_cli(ring.urls[1], "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
                                   "--optimizer", "sgd", "--momentum", "0.9", "--shuffle", "off",
                                   "--microbatches", "2", "--split", "even", "--out", str(out), env=env))
    order = [ring.agents.index(a) for a in ring.ring_order()]
    assert summary["ring"] == [ring.agents[k].peer_id for k in order]
    cfg = JobConfig(epochs=1, batch_size=32, lr=0.05, momentum=0.9, shuffle=False, microbatches=2)
    want = reference.train(cfg, [data.load("digits", f"{k}/3") for k in order]).state_dict()
    assert max_diff(load_out(out), want) <= 1e-5


def test_the_port_speaks_only_tls(ring):
    plain = ring.urls[0].replace("https://", "http://")
    with pytest.raises((OSError, http.client.HTTPException)):
        urllib.request.urlopen(f"{plain}/status", timeout=10)

    with pytest.raises((ConnectionError, OSError)):
        asyncio.run(connect(plain, timeout=5))


def signed_get(url: str, key: bytes, bound_to: str | None):
    """GET /status over TLS, signed bound to `bound_to` (None: the certificate the agent presents)."""
    u = urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname, u.port, context=client_tls(), timeout=10)
    conn.connect()
    presented = fingerprint(conn.sock.getpeercert(binary_form=True))
    headers = sign_request(key, "GET", "/status", b"", time.time(), fingerprint=bound_to or presented)
    conn.request("GET", "/status", headers=headers)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp, headers, presented


def test_a_signature_bound_to_another_certificate_is_refused(ring):
    # what a man-in-the-middle with its own certificate would relay: signed for the certificate it showed
    resp, _, _ = signed_get(ring.urls[0], ring.key, "ab" * 32)
    assert resp.status == 401
    # bound to the certificate the agent really presents: answered, and the answer is bound to it too
    resp, headers, presented = signed_get(ring.urls[0], ring.key, None)
    assert resp.status == 200
    nonce = headers["X-Splitring-Nonce"]
    assert check_response(ring.key, nonce, 200, resp.headers[H_REPLY], presented)
    assert not check_response(ring.key, nonce, 200, resp.headers[H_REPLY], "ab" * 32)


class Relay:
    """A man-in-the-middle: terminates TLS with its own certificate and relays every byte to `target`."""

    def __init__(self, target: str, cert, key):
        self.target, self.context = urlsplit(target), server_tls(str(cert), str(key))[0]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> "Relay":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.relay, "127.0.0.1", 0, ssl=self.context), self.loop).result(10)
        self.url = f"https://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def relay(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(self.target.hostname, self.target.port,
                                                             ssl=client_tls())

        async def pipe(r, w):
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            finally:
                w.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    def __exit__(self, *exc) -> None:
        async def shut():   # relays still running end here, not as coroutines the collector finds unfinished
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def dial(url: str, ring) -> None:
    """Open a data-plane link to `url` as a peer that knows the ring secret."""
    async def go():
        codec = Codec()
        try:
            link = await Links("ghost", ring.ring, None, codec, ring.key)._open(url)
            link.reader.cancel()
            link.stream.close()
        finally:
            codec.close()
    asyncio.run(go())


def test_a_relaying_man_in_the_middle_is_seen_through(ring, tmp_path):
    make_certificate(tmp_path / "mitm.crt", tmp_path / "mitm.key")
    secret = ["--secret-file", str(ring.secret_file)]
    direct = subprocess.run([sys.executable, "-m", "peer", "status", "--peer", ring.urls[0], *secret],
                            capture_output=True, text=True, timeout=60)
    assert direct.returncode == 0 and "sees 2 peer(s)" in direct.stdout
    dial(ring.urls[0], ring)
    with Relay(ring.urls[0], tmp_path / "mitm.crt", tmp_path / "mitm.key") as mitm:
        relayed = subprocess.run([sys.executable, "-m", "peer", "status", "--peer", mitm.url, *secret],
                                 capture_output=True, text=True, timeout=60)
        assert relayed.returncode == 1 and "did not prove it belongs to this ring" in relayed.stderr
        assert "sees" not in relayed.stdout
        with pytest.raises(RingAuthError, match="did not prove it knows the ring secret"):
            dial(mitm.url, ring)
    assert "bad signature" in (ring.workdir / "agent0.log").read_text()


def test_a_peer_id_that_comes_back_with_another_certificate_is_refused(tmp_path):
    ring = LocalRing([[], []], secret=SECRET, tls=True, workdir=str(tmp_path))
    try:
        ring.start()
        gone = ring.agents[1]
        assert gone.stop() == 0
        make_certificate(tmp_path / "other.crt", tmp_path / "other.key")
        args = ring.agent_args(1)
        args[args.index("--tls-cert") + 1] = str(tmp_path / "other.crt")
        args[args.index("--tls-key") + 1] = str(tmp_path / "other.key")
        back = ring.agents[1] = AgentProcess(args, tmp_path / "back.log")
        back.key = ring.key
        back.wait_ready(60)
        assert back.peer_id == gone.peer_id and back.url != gone.url
        log = tmp_path / "agent0.log"
        wait_until(lambda: "is pinned to certificate" in log.read_text(), 60, "agent 0 refuses the new certificate")
        assert f"authenticated as peer {back.peer_id} with certificate" in log.read_text()
        # the old process drops out of the view (missing, at its old address) and the new one never enters it:
        # had it ever been accepted, the peer would be listed, or missing at the new address
        wait_until(lambda: ring.agents[0].status()["peers"] == [] and ring.agents[0].status()["missing"], 60,
                   "the stopped peer leaves agent 0's view")
        st = ring.agents[0].status()
        assert st["peers"] == [] and [(m["peer"], m["url"]) for m in st["missing"]] == [(gone.peer_id, gone.url)]
    finally:
        ring.stop()


def test_tls_without_a_secret_does_not_start(tmp_path):
    make_certificate(tmp_path / "a.crt", tmp_path / "a.key")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITRING_SECRET")}
    proc = subprocess.run([sys.executable, "-m", "peer", "agent", "--port", "0", "--no-mdns", "--state-dir",
                           str(tmp_path / "state"), "--tls-cert", str(tmp_path / "a.crt"), "--tls-key",
                           str(tmp_path / "a.key")], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "TLS needs a ring secret (--secret-file)" in proc.stderr
