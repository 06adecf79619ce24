"""Ring authentication, limits and validation, in one process: the pure parts directly, and every HTTP
and data-plane handler of a real Agent.app() (aiohttp test server) under hypothesis-generated input."""
import asyncio
import dataclasses
import json
import math
import os
import posixpath
import time

import aiohttp
import cbor2
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings, strategies as st

from peer.agent import Agent
from peer.dataplane import Links
from peer.discovery import Discovery
from peer.limits import LIMITS, RateLimiter
from peer.security import ClientHandshake, ServerHandshake, client_session
from peer.state import StateDir
from pipeline.config import JobConfig
from pipeline.data import empty
from protocols import ProtocolError, decode_frame, encode_frame, message, validate
from protocols.auth import (H_AUTH, H_BODY, H_NONCE, H_REPLY, H_TIME, MAX_SKEW, ReplayCache, check_body,
                            check_request_headers, check_response, ring_key, sign_request, sign_response)

KEY = ring_key(b"right secret", "lab")
WRONG = ring_key(b"wrong secret", "lab")


def fuzz(n: int):
    """n cases (times $SPLITRING_FUZZ_SCALE: scripts/fuzz_agent.py runs longer)."""
    scale = float(os.environ.get("SPLITRING_FUZZ_SCALE", "1"))
    return settings(max_examples=int(n * scale), deadline=None, suppress_health_check=list(HealthCheck))


# --- pure: keys, signatures, replay -------------------------------------------------------------
def test_ring_key_depends_on_secret_and_ring():
    assert len({ring_key(b"s", "a"), ring_key(b"s", "b"), ring_key(b"t", "a")}) == 3
    assert ring_key(b"s", "a") == ring_key(b"s", "a")


def test_signed_request_verifies_and_any_change_does_not():
    h = sign_request(KEY, "POST", "/jobs", b"body", now=1000.0)
    assert check_request_headers(KEY, h, "POST", "/jobs", 1000.0) == h[H_NONCE]
    check_body(h, b"body")
    for key, method, path in [(WRONG, "POST", "/jobs"), (KEY, "GET", "/jobs"), (KEY, "POST", "/job/abort")]:
        with pytest.raises(ProtocolError):
            check_request_headers(key, h, method, path, 1000.0)
    with pytest.raises(ProtocolError):
        check_body(h, b"other body")
    for field in (H_TIME, H_NONCE, H_BODY, H_AUTH):
        with pytest.raises(ProtocolError):
            check_request_headers(KEY, {**h, field: h[field] + "1"}, "POST", "/jobs", 1000.0)
        with pytest.raises(ProtocolError):
            check_request_headers(KEY, {k: v for k, v in h.items() if k != field}, "POST", "/jobs", 1000.0)


def test_stale_requests_and_replayed_nonces_are_refused():
    h = sign_request(KEY, "GET", "/status", b"", now=1000.0)
    for now in (1000 + MAX_SKEW + 1, 1000 - MAX_SKEW - 1):
        with pytest.raises(ProtocolError, match="off this peer's clock"):
            check_request_headers(KEY, h, "GET", "/status", now)
    cache = ReplayCache()
    cache.admit("n1", 1000.0)
    with pytest.raises(ProtocolError) as e:
        cache.admit("n1", 1001.0)
    assert e.value.code == "replay"
    cache.admit("n1", 1000.0 + 2 * MAX_SKEW + 1)  # long expired: its request would be stale anyway
    assert len(cache) == 1


def test_replay_cache_is_bounded():
    cache = ReplayCache(capacity=3)
    for n in "abc":
        cache.admit(n, 0.0)
    with pytest.raises(ProtocolError) as e:
        cache.admit("d", 1.0)
    assert e.value.code == "busy" and len(cache) == 3


def test_response_signature_is_bound_to_the_request_nonce_and_status():
    tag = sign_response(KEY, "nonce", 200)
    assert check_response(KEY, "nonce", 200, tag)
    assert not check_response(KEY, "other", 200, tag)
    assert not check_response(KEY, "nonce", 401, tag)
    assert not check_response(WRONG, "nonce", 200, tag)
    assert not check_response(KEY, "nonce", 200, None)


def test_rate_limiter_allows_a_burst_then_the_rate():
    lim = RateLimiter(rate=2, burst=3)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("b", 0.0)           # per remote
    assert lim.allow("a", 0.5) and not lim.allow("a", 0.5)


# --- the data-plane handshake, both ends --------------------------------------------------------
def run_handshake(client_key, server_key, ring="lab"):
    client, server = ClientHandshake(client_key, "c", ring), ServerHandshake(server_key, "s", "lab")
    reply = server.step(validate(client.hello()))
    auth = client.finish(validate(reply), "url")
    if auth:
        server.step(validate(auth))
    return server.sender


def test_handshake_with_the_same_key_and_without_keys():
    assert run_handshake(KEY, KEY) == "c"
    assert run_handshake(None, None) == "c"


@pytest.mark.parametrize("client_key, server_key", [(WRONG, KEY), (KEY, WRONG), (None, KEY), (KEY, None)])
def test_handshake_refused_on_both_sides_without_the_same_key(client_key, server_key):
    with pytest.raises((ProtocolError, ConnectionError)):
        assert run_handshake(client_key, server_key) is None


def test_a_captured_handshake_cannot_be_replayed():
    client, server = ClientHandshake(KEY, "c", "lab"), ServerHandshake(KEY, "s", "lab")
    hello = client.hello()
    auth = client.finish(server.step(hello), "url")
    server2 = ServerHandshake(KEY, "s", "lab")   # a new connection: a fresh server nonce
    server2.step(hello)
    with pytest.raises(ProtocolError) as e:
        server2.step(auth)
    assert e.value.code == "unauthenticated" and server2.sender is None


def test_data_before_the_handshake_is_refused():
    server = ServerHandshake(KEY, "s", "lab")
    with pytest.raises(ProtocolError, match="hello"):
        server.step(message("ping", seq=1))
    server.step(ClientHandshake(KEY, "c", "lab").hello())
    with pytest.raises(ProtocolError) as e:
        server.step(message("ping", seq=1))
    assert e.value.code == "auth_first" and server.sender is None


# --- fuzzing: the frame decoder and the schema ---------------------------------------------------
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6)
message_like = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 0, 2, -1, "1", None, True]),
     "type": st.sampled_from(["hello", "auth", "fwd", "bwd", "ping", "pong", "job_start", "job_abort", "x", 3])},
    optional={k: cbor_values for k in ("peer", "ring", "job", "rotation", "step", "mb", "seq", "proof", "nonce",
                                       "config", "reason", "x", "y", "grad")})


# the schema of the types message_like draws, stated independently of protocols.messages: required fields
# (NAT: an int, not a bool, >= 0) and optional ones; nothing message_like draws is a tensor
NAT, TENSOR = "a natural number", torch.Tensor
REQUIRED = {"hello": {"peer": str, "ring": str}, "auth": {"proof": bytes},
            "fwd": {"job": str, "rotation": NAT, "step": NAT, "mb": NAT, "mode": str, "x": TENSOR, "y": TENSOR},
            "bwd": {"job": str, "rotation": NAT, "step": NAT, "mb": NAT, "grad": TENSOR},
            "ping": {"seq": NAT}, "pong": {"seq": NAT}, "job_start": {"config": dict},
            "job_abort": {"job": str, "reason": str}}
OPTIONAL_FIELDS = {"hello": {"nonce": bytes, "proof": bytes}}


def well_formed(msg) -> bool:
    def fits(value, kind) -> bool:
        if kind is NAT:
            return type(value) is int and value >= 0
        return isinstance(value, kind)
    if not isinstance(msg, dict) or type(msg.get("v")) is not int or msg["v"] != 1:   # (True and 1.0 are no version)
        return False
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in REQUIRED:
        return False
    return all(f in msg and fits(msg[f], t) for f, t in REQUIRED[kind].items()) and \
        all(fits(msg[f], t) for f, t in OPTIONAL_FIELDS.get(kind, {}).items() if f in msg)


@fuzz(1000)
@given(st.one_of(message_like, cbor_values))
def test_schema_validation_accepts_exactly_the_well_formed_messages(msg):
    try:
        out = validate(msg)
    except ProtocolError as e:
        assert not well_formed(msg), msg
        assert e.code in ("malformed", "version", "unknown_type") and e.message
        return
    assert out is msg and well_formed(msg), msg


@pytest.mark.parametrize("v", [True, 1.0])
def test_the_protocol_version_is_the_integer_1(v):
    with pytest.raises(ProtocolError) as e:
        validate({"v": v, "type": "ping", "seq": 1})
    assert e.value.code == "version"


def tensor_table():
    entry = st.tuples(st.sampled_from(["float32", "int64", "uint8", "float99", 7]),
                      st.lists(st.integers(-2, 2**41), max_size=9))
    return st.lists(entry.map(list), max_size=3)


ITEMSIZE = {"float32": 4, "int64": 8, "uint8": 1}


def table_bytes(table) -> int | None:
    """The payload bytes a tensor table asks for, or None if the table is not acceptable: a known dtype, at
    most 8 dimensions, each from 0 to 2**40 - 1, the non-zero ones multiplying to under 2**62."""
    total = 0
    for name, shape in table:
        if name not in ITEMSIZE or len(shape) > 8 or not all(0 <= d < 2**40 for d in shape) \
                or math.prod(d for d in shape if d) >= 2**62:
            return None
        total += math.prod(shape) * ITEMSIZE[name]
    return total


@fuzz(1000)
@given(message_like, tensor_table(), st.binary(max_size=64), st.booleans())
def test_frame_decoder_decodes_exactly_the_frames_whose_table_and_payload_agree(body, table, payload, truncate):
    """A frame (maybe cut in half) decodes iff its header is whole, its tensor table is acceptable and the
    bytes after the header are exactly the payloads the table asks for; then to the body that was sent.
    Anything else is refused with a code. The decoded message validates iff it is well formed."""
    encoded_body = cbor2.dumps(body, default=lambda e, v: e.encode(None))
    head = cbor2.dumps({"body": encoded_body, "tensors": table})
    frame = len(head).to_bytes(4, "big") + head + payload
    frame = frame[:len(frame) // 2] if truncate else frame
    wanted = table_bytes(table)
    decodes = len(frame) >= 4 + len(head) and wanted is not None and len(frame) - 4 - len(head) == wanted
    try:
        msg = decode_frame(frame, max_bytes=1 << 20)
    except ProtocolError as e:
        assert not decodes, (table, len(payload), truncate, e.message)
        assert e.code in ("malformed", "bad_dtype", "bad_shape", "too_large") and e.message
        return
    assert decodes and cbor2.dumps(msg) == encoded_body
    try:
        validate(msg)
    except ProtocolError:
        assert not well_formed(body)
    else:
        assert well_formed(body)


# --- fuzzing: every handler of a real agent, in process ------------------------------------------
class InProcess:
    """An Agent.app() on an aiohttp test server, without discovery or data of its own; with a job
    prepared and committed (this peer is stage 1 of 2, after peer "other") so fwd/bwd reach JobRuntime."""

    def __init__(self, tmp, key):
        self.loop = asyncio.new_event_loop()
        self.agent = Agent("lab", StateDir(tmp), empty(), "127.0.0.1", 0, None, "127.0.0.1", [], key=key)
        self.agent.guard.limiter = RateLimiter(1e9, 10**9)  # fuzzing opens connections far faster than peers do
        self.client = TestClient(TestServer(self.agent.app()), loop=self.loop)
        self.run(self._start())

    async def _start(self):
        await self.client.start_server()
        a = self.agent
        a.session = client_session(a.key)
        a.links = Links(a.peer_id, a.ring, a.session, a.codec, a.key)
        a.discovery = Discovery(a.ring, a.peer_id, 0, None, "127.0.0.1", [], key=a.key)

    def run(self, coro, timeout=30):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self):
        self.run(self.client.close())
        self.run(self.agent.session.close())
        self.agent.codec.close()
        self.agent.compute.shutdown(wait=False)
        self.agent.state.close()
        self.loop.close()


JOB = "0123456789ab"   # the job open_agent runs


@pytest.fixture(scope="module")
def open_agent(tmp_path_factory):
    a = InProcess(tmp_path_factory.mktemp("open"), None)
    me = a.agent.peer_id
    ring = [{"peer": "other", "url": "http://127.0.0.1:9"}, {"peer": me, "url": "http://127.0.0.1:9"}]
    cfg = JobConfig().to_dict()
    from pipeline.models import spec_hash

    # a job this agent coordinates (so no missing heartbeat ends it), "other" its stage 0
    msg = message("job_prepare", job=JOB, config=cfg, ring=ring, coordinator=me, spec_hash=spec_hash(JobConfig().model))
    r = a.run(a.client.post("/job/prepare", data=encode_frame(msg), headers={"Content-Type": "application/cbor"}))
    assert r.status == 200, a.run(r.text())
    rt = a.agent.work.jobs[JOB]   # committed in place: a commit over HTTP would replicate to "other", unreachable
    a.run(a.agent.compute_call(rt.commit, 0, 0, 0, ["other", me], {"other": [0, 1], me: [1, 3]}, 64, 0))
    yield a
    a.close()


@pytest.fixture(scope="module")
def secret_agent(tmp_path_factory):
    a = InProcess(tmp_path_factory.mktemp("secret"), KEY)
    yield a
    a.close()


def routes(app):
    return sorted({(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"})


bodies = st.one_of(
    st.binary(max_size=300),
    message_like.map(encode_frame),
    cbor_values.map(lambda v: json.dumps(v, default=str).encode()),
)
content_types = st.sampled_from(["application/cbor", "application/json", "text/plain", ""])
job_ids = st.sampled_from([JOB, "j", "nojob", "..", "%00", "a" * 300, "ü"])


async def answer(client: TestClient, method, path, body, ctype, headers=None):
    headers = {**({"Content-Type": ctype} if ctype else {}), **(headers or {})}
    async with client.request(method, path, data=body, headers=headers) as r:
        raw = await r.read()
        return r.status, raw, r.headers


def assert_refused_clearly(status, raw):
    assert status < 500 or status == 502, raw[:300]  # 502: data_probe of an unreachable url
    if status >= 400 and status not in (404, 405):   # aiohttp's router answers these itself, in text
        assert json.loads(raw)["error"]


@fuzz(900)
@given(st.data(), bodies, content_types, job_ids)
def test_every_http_handler_answers_bad_input_with_an_error(open_agent, data, body, ctype, job):
    method, path = data.draw(st.sampled_from(routes(open_agent.agent.app())))
    if path in ("/ws", "/data", "/jobs", "/dashboard/events"):   # the data plane has its own fuzz test; /jobs
        return   # starts real jobs below; the dashboard's event stream does not end (tests/test_dashboard.py)
    status, raw, _ = open_agent.run(answer(open_agent.client, method, path.replace("{job}", job), body, ctype))
    assert_refused_clearly(status, raw)


@fuzz(300)
@given(st.dictionaries(st.sampled_from(["epochs", "batch_size", "lr", "model", "seed", "microbatches", "nope"]),
                       cbor_values, max_size=3))
def test_job_start_with_adversarial_configs_fails_clearly(open_agent, config):
    body = json.dumps({"v": 1, "type": "job_start", "config": config}, default=str).encode()
    status, raw, _ = open_agent.run(answer(open_agent.client, "POST", "/jobs", body, "application/json"))
    assert_refused_clearly(status, raw)
    if status == 200:  # it started: the ring (this agent alone, not reachable at its url) makes it fail
        assert json.loads(raw.splitlines()[-1])["event"] == "failed"


@fuzz(600)
@given(st.data(), bodies, content_types, job_ids)
def test_without_the_secret_every_private_call_is_refused(secret_agent, data, body, ctype, job):
    method, path = data.draw(st.sampled_from(routes(secret_agent.agent.app())))
    if path in ("/ws", "/data", "/dashboard/events"):   # (the event stream: tests/test_dashboard.py)
        return
    path = path.replace("{job}", job)
    forged = data.draw(st.sampled_from(["none", "wrong key", "garbage"]))
    headers = {"none": {}, "wrong key": sign_request(WRONG, method, path, body, now=time.time()),
               "garbage": {H_TIME: "nan", H_NONCE: "x", H_BODY: "y", H_AUTH: "z"}}[forged]
    status, raw, resp_headers = secret_agent.run(answer(secret_agent.client, method, path, body, ctype, headers))
    path = posixpath.normpath(path)   # as the client sends it: /jobs/.. is /, the dashboard's page
    if (method, path) == ("GET", "/status") and forged == "none":
        assert status == 200 and set(json.loads(raw)) == {"peer", "ring", "version", "capabilities", "private"}
    elif (method, path) == ("GET", "/") and forged == "none":   # the dashboard's page: the same to anyone
        assert status == 200 and raw.startswith(b"<!doctype html>")
    elif (method, path) == ("GET", "/dashboard/state") and forged == "none":
        assert status == 200 and json.loads(raw)["private"] is False and set(json.loads(raw)) == {"me", "private"}
    else:
        assert status == 401 and json.loads(raw)["error"] == "unauthenticated"
        assert H_REPLY not in resp_headers


frames = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda m, t: (m, t), message_like, st.none()),
    st.builds(lambda kind, job, step, mb, rows, cols, dtype: message(
        kind, job=job, rotation=0, step=step, mb=mb, mode="train",
        **({"x": torch.zeros(rows, cols, dtype=dtype), "y": torch.zeros(rows, dtype=torch.int64)} if kind == "fwd"
           else {"grad": torch.zeros(rows, cols, dtype=dtype)})),
              st.sampled_from(["fwd", "bwd"]), st.sampled_from([JOB, "nojob"]), st.integers(0, 3),
              st.integers(0, 2), st.sampled_from([0, 1, 32, 64]), st.sampled_from([1, 64, 128, 10]),
              st.sampled_from([torch.float32, torch.float64, torch.int64])),
    st.builds(lambda kind, stage, rows, cols: message(   # the remote backward's messages, to a job without one
        kind, job=JOB, rotation=0, step=0, mb=0, stage=stage, x=torch.zeros(rows, cols),
        weights={1: {"0.weight": torch.zeros(cols, rows)}}, layers={1: {"params": {}, "optim": {}}}),
              st.sampled_from(["input", "weights", "lend", "return"]), st.integers(-1, 3),
              st.sampled_from([0, 32]), st.sampled_from([1, 128])),
)


def encode_any(f):
    if isinstance(f, bytes):
        return f
    if isinstance(f, tuple):
        f = f[0]
    try:
        return encode_frame(f)
    except (TypeError, ValueError, OverflowError):
        return b"\x00"


async def ws_session(client: TestClient, hello: dict | None, sends: list[bytes]) -> list[dict]:
    replies = []
    async with client.ws_connect("/ws") as ws:
        for f in ([encode_frame(hello)] if hello else []) + sends:
            await ws.send_bytes(f)
        for _ in sends:
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.BINARY:
                break
            replies.append(decode_frame(msg.data))
    return replies


@fuzz(500)
@given(st.lists(frames, min_size=1, max_size=4), st.booleans())
def test_data_plane_answers_adversarial_frames(open_agent, sent, as_neighbour):
    """As the stage's real predecessor ("other") or a stranger: whatever arrives is refused with an error
    reply or (a well-formed fwd for the right step) delivered once; nothing crashes or hangs."""
    hello = message("hello", peer="other" if as_neighbour else "stranger", ring="lab")
    rt = open_agent.agent.work.jobs[JOB]
    before = set(rt.mailbox.slots)
    encoded = [encode_any(f) for f in sent]
    replies = open_agent.run(ws_session(open_agent.client, hello, encoded))
    replies = replies[1:]  # the hello reply
    accepted = set(rt.mailbox.slots) - before
    assert len(replies) + len(accepted) >= len(encoded) - 1
    assert all(r["type"] in ("error", "pong") for r in replies)
    assert all(r["code"] for r in replies if r["type"] == "error")
    for key in accepted:  # delivered: exactly the shape stage 1 expects, from its predecessor
        assert as_neighbour and key[3] == "fwd@1"
        x = rt.mailbox.slots[key].result()["x"]
        assert x.dtype == torch.float32 and x.shape[1] == 128
    rt.mailbox.new_rotation(1)  # forget for the next example (the job itself is never run here)
    rt.mailbox.consumed.clear()


@fuzz(200)
@given(st.lists(frames, min_size=1, max_size=3), st.sampled_from(["wrong key", "no key", "garbage proof"]))
def test_data_plane_of_a_secret_ring_refuses_outsiders(secret_agent, sent, how):
    client = ClientHandshake(WRONG if how == "wrong key" else KEY, "outsider", "lab")
    hello = client.hello() if how != "no key" else message("hello", peer="outsider", ring="lab")
    sends = ([encode_frame(message("auth", proof=b"\0" * 32))] if how == "garbage proof" else [])
    sends += [encode_any(f) for f in sent]
    replies = secret_agent.run(ws_session(secret_agent.client, hello, sends))
    if how == "no key":
        assert replies[0]["code"] == "unauthenticated"
    else:
        assert replies[0]["type"] == "hello"  # the server proves itself, then waits for a proof
    assert all(r["type"] == "error" and r["code"] in ("unauthenticated", "auth_first", "hello_first", "malformed",
                                                      "version", "unknown_type", "too_large")
               for r in replies[1:])
    assert not secret_agent.agent.work.jobs


def test_limits_refuse_floods_of_connections_and_oversized_bodies(tmp_path, monkeypatch):
    monkeypatch.setattr("peer.node.LIMITS", dataclasses.replace(LIMITS, max_control_body=1000))
    a = InProcess(tmp_path, None)
    try:
        a.agent.guard.limiter = RateLimiter(1, 3)

        async def connect():
            try:
                async with a.client.ws_connect("/ws"):
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status
        codes = [a.run(connect()) for _ in range(6)]
        assert codes[:3] == [101] * 3 and 429 in codes[3:]
        status, _, _ = a.run(answer(a.client, "POST", "/job/abort", b"\0" * 2000, "application/cbor"))
        assert status == 413
        assert a.run(answer(a.client, "GET", "/status", b"", ""))[0] == 200
    finally:
        a.close()
