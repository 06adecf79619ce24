"""The ring's access control over aiohttp: where the secret comes from, the server middleware that
verifies every signed request before anything else runs, the client middleware that signs ours and
verifies the answers, the data-plane handshake on both ends, and the same signing for the CLI (urllib).

With no secret the ring is open: nothing is signed and nothing is checked (a warning says so).
With TLS (a ring secret is then required) certificates are not checked against any authority: a caller
takes the SHA-256 fingerprint of the certificate a peer presents, pins its connections to it and binds
every signature to it, and a peer id keeps the certificate it first authenticated with (`Pins`).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web

from peer.limits import LIMITS, Limits, RateLimiter
from protocols import ProtocolError, message
from protocols.auth import (H_AUTH, H_NONCE, H_REPLY, NONCE_BYTES, ReplayCache, check_body, check_proof,
                            check_request_headers, check_response, handshake_proof, ring_key, sign_request,
                            sign_response)

log = logging.getLogger("splitring.security")
PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
# GET without a signature: public facts only (the dashboard's routes show more only to a ring member's session)
PUBLIC = {"/status", "/", "/dashboard/state", "/dashboard/events", "/dashboard/login"}
IN_BAND = {"/ws", "/data"}   # the data plane authenticates in its own handshake


class RingAuthError(aiohttp.ClientConnectionError, ConnectionError):
    """A peer did not prove that it knows the ring secret (or refused our proof)."""


def load_secret(path: str | None = None) -> bytes | None:
    """The ring secret: --secret-file PATH, else $SPLITRING_SECRET_FILE, else $SPLITRING_SECRET."""
    path = path or os.environ.get("SPLITRING_SECRET_FILE")
    if path:
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as e:
            raise ValueError(f"cannot read the ring secret file {path}: {e.strerror}") from None
        if not secret:
            raise ValueError(f"the ring secret file {path} is empty")
        return secret
    secret = os.environ.get("SPLITRING_SECRET", "").strip()
    return secret.encode() or None


def key_for(secret: bytes | None, ring: str) -> bytes | None:
    return ring_key(secret, ring) if secret else None


# --- TLS ----------------------------------------------------------------------------------------
def fingerprint(der: bytes) -> str:
    """A certificate's SHA-256 fingerprint (hex), as peers pin it."""
    return hashlib.sha256(der).hexdigest()


def presented(transport) -> str:
    """The fingerprint of the certificate the other end of a TLS connection presented."""
    return fingerprint(transport.get_extra_info("ssl_object").getpeercert(binary_form=True))


def server_tls(cert: str, key: str) -> tuple[ssl.SSLContext, str]:
    """The agent's TLS context (--tls-cert, --tls-key) and its certificate's fingerprint."""
    try:
        first = PEM_CERT.search(Path(cert).read_text())
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
    except (OSError, ValueError, ssl.SSLError) as e:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from None
    return ctx, fingerprint(ssl.PEM_cert_to_DER_cert(first.group()))


def client_tls() -> ssl.SSLContext:
    """For connections to peers. No authority is consulted (peers' certificates are self-signed): the
    caller pins the fingerprint and binds its signatures to it instead."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Pins:
    """The certificates of the ring's peers, as this peer learned them.
    `by_url`: what each address presented at first contact; requests to it are pinned to that certificate
    and signed bound to it, so a caller that reached anyone else fails ring authentication.
    `by_peer`: the certificate each peer id first authenticated with; the same id with another is refused."""

    def __init__(self):
        self.by_url: dict[str, str] = {}
        self.by_peer: dict[str, str] = {}

    async def for_url(self, url: str) -> str:
        """The fingerprint to pin for `url` ("" for http://)."""
        u = urllib.parse.urlsplit(url)
        if u.scheme != "https":
            return ""
        if u.netloc not in self.by_url:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(u.hostname, u.port, ssl=client_tls()), 10)
            except (OSError, asyncio.TimeoutError) as e:
                raise aiohttp.ClientConnectionError(f"{url}: no TLS connection ({e!r})") from None
            self.by_url[u.netloc] = presented(writer.transport)
            writer.close()
        return self.by_url[u.netloc]

    def forget(self, url: str) -> None:
        """After a mismatch: the next contact takes the certificate presented then (and must authenticate)."""
        self.by_url.pop(urllib.parse.urlsplit(url).netloc, None)

    def check_peer(self, peer: str, fp: str, url: str) -> None:
        """Pin `peer` to the certificate it authenticated with; refuse it with any other."""
        if not fp:
            return
        pinned = self.by_peer.setdefault(peer, fp)
        if pinned != fp:
            raise RingAuthError(f"{url} authenticated as peer {peer} with certificate sha256 {fp}, but peer {peer} "
                                f"is pinned to certificate {pinned}: refused (a peer that changed its certificate "
                                f"needs the peers that pinned the old one restarted)")


# --- HTTP, server side --------------------------------------------------------------------------
class Guard:
    """Verifies signed requests (aiohttp middleware) and signs the answers (on_response_prepare)."""

    def __init__(self, key: bytes | None, limits: Limits = LIMITS, fingerprint: str = ""):
        self.key = key
        self.fingerprint = fingerprint  # this agent's TLS certificate ("" without TLS): signatures are bound to it
        self.replay = ReplayCache()
        self.limiter = RateLimiter(limits.connections_per_s, limits.connection_burst)

    def allow(self, request: web.Request) -> bool:
        """Rate limit for what is costly or unauthenticated: new data-plane connections, refused requests."""
        return self.limiter.allow(request.remote or "", time.monotonic())

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path in IN_BAND:
            if not self.allow(request):
                return _refusal(429, "rate", "too many new connections from this address; slow down")
            return await handler(request)
        if self.key is None or (request.method == "GET" and request.path in PUBLIC and H_AUTH not in request.headers):
            return await handler(request)
        try:
            nonce = check_request_headers(self.key, request.headers, request.method, request.raw_path, time.time(),
                                          self.fingerprint)
            check_body(request.headers, await request.read())
            self.replay.admit(nonce, time.time())
        except ProtocolError as e:
            if not self.allow(request):
                return _refusal(429, "rate", "too many refused requests from this address; slow down")
            log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, e.message)
            return _refusal(401, e.code, e.message)
        request["nonce"] = nonce
        return await handler(request)

    async def sign(self, request: web.Request, response: web.StreamResponse) -> None:
        nonce = request.get("nonce")
        if nonce:
            response.headers[H_REPLY] = sign_response(self.key, nonce, response.status, self.fingerprint)

    def member(self, request: web.Request) -> bool:
        """Whether the caller proved it belongs to the ring (always so in an open ring)."""
        return self.key is None or "nonce" in request


def _refusal(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"error": code, "message": text}, status=status)


# --- HTTP, client side --------------------------------------------------------------------------
def client_middleware(key: bytes, pins: Pins):
    """aiohttp client middleware: sign every request; accept only answers signed by a ring member.
    Over TLS, the connection is pinned to the peer's certificate and both signatures are bound to it."""
    async def sign(req: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        fp = await pins.for_url(str(req.url))
        if fp:
            req._ssl = aiohttp.Fingerprint(bytes.fromhex(fp))  # aiohttp has no public setter for a request's ssl
        body = await req.body.as_bytes() if req.body else b""
        headers = sign_request(key, req.method, req.url.raw_path_qs, body, time.time(), fingerprint=fp)
        req.headers.update(headers)
        try:
            resp = await handler(req)
        except aiohttp.ServerFingerprintMismatch as e:
            pins.forget(str(req.url))
            raise RingAuthError(f"{req.url.origin()} presented certificate sha256 {e.got.hex()}, not the one it "
                                f"presented before ({fp})") from None
        if not check_response(key, headers[H_NONCE], resp.status, resp.headers.get(H_REPLY), fp):
            detail = await _refusal_text(resp)
            resp.release()
            raise RingAuthError(f"{req.url.origin()} did not prove it belongs to this ring{detail}")
        return resp
    return sign


async def _refusal_text(resp: aiohttp.ClientResponse) -> str:
    if resp.status not in (401, 429):
        return ""
    try:
        return f" (it answered {resp.status}: {(await resp.json())['message']})"
    except (aiohttp.ClientError, ValueError, KeyError, TypeError):
        return f" (it answered {resp.status})"


def client_session(key: bytes | None, pins: Pins | None = None, **kw) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(middlewares=(client_middleware(key, pins or Pins()),) if key else (), **kw)


def open_url(url: str, key: bytes | None, data: bytes | None = None, headers: dict | None = None,
             timeout: float | None = None):
    """urllib.request.urlopen for the CLI, signing the request and checking the answer's signature.
    An https:// URL is pinned to the certificate the peer presents first, and the signatures bound to it.
    Raises urllib.error.HTTPError for refusals, RingAuthError for an answer not signed by the ring."""
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    u = urllib.parse.urlsplit(url)
    fp, urlopen = "", urllib.request.urlopen
    if u.scheme == "https":
        pem = ssl.get_server_certificate((u.hostname, u.port), timeout=timeout or 30)  # not verified: pinned
        fp = fingerprint(ssl.PEM_cert_to_DER_cert(pem))
        urlopen = urllib.request.build_opener(_PinnedHTTPS(fp)).open
    nonce = None
    if key:
        path = u.path + (f"?{u.query}" if u.query else "")
        signed = sign_request(key, req.get_method(), path, data or b"", time.time(), fingerprint=fp)
        for k, v in signed.items():
            req.add_header(k, v)
        nonce = signed[H_NONCE]
    try:
        resp = urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if nonce and not check_response(key, nonce, e.code, e.headers.get(H_REPLY), fp):
            raise RingAuthError(f"{url} did not prove it belongs to this ring{_http_error_text(e)}") from None
        raise
    if nonce and not check_response(key, nonce, resp.status, resp.headers.get(H_REPLY), fp):
        resp.close()
        raise RingAuthError(f"{url} did not prove it belongs to this ring")
    return resp


class _PinnedConnection(http.client.HTTPSConnection):
    """An HTTPS connection that sends nothing unless the server presents the pinned certificate."""

    def __init__(self, *args, pin: str, **kw):
        super().__init__(*args, **kw)
        self.pin = pin

    def connect(self) -> None:
        super().connect()
        got = fingerprint(self.sock.getpeercert(binary_form=True))
        if got != self.pin:
            self.close()
            raise RingAuthError(f"{self.host}:{self.port} presented certificate sha256 {got}, not the one it "
                                f"presented before ({self.pin})")


class _PinnedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, pin: str):
        super().__init__()
        self.pin, self.context = pin, client_tls()

    def https_open(self, req):
        return self.do_open(functools.partial(_PinnedConnection, pin=self.pin), req, context=self.context)


def _http_error_text(e: urllib.error.HTTPError) -> str:
    try:
        return f" (it answered {e.code}: {json.loads(e.read())['message']})"
    except (ValueError, KeyError, TypeError, OSError):
        return f" (it answered {e.code})"


# --- data plane handshake -----------------------------------------------------------------------
# client -> hello {peer, ring, nonce}; server -> hello {peer, ring, nonce, proof}; client -> auth {proof}.
# Each proof covers both fresh nonces and both peer ids, and over TLS the receiving peer's certificate
# (its own, as the sender sees it); with no secret, hellos carry neither.
class ServerHandshake:
    """The receiving end of one data-plane connection, until the sender is known."""

    def __init__(self, key: bytes | None, me: str, ring: str, fingerprint: str = ""):
        self.key, self.me, self.ring, self.fingerprint = key, me, ring, fingerprint
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.hello: dict | None = None
        self.sender: str | None = None   # set once the sender proved itself (at its hello in an open ring)

    def step(self, msg: dict) -> dict | None:
        """Take the next message before the sender is known; returns the reply to send, if any."""
        if self.hello is None:
            if msg["type"] != "hello":
                raise ProtocolError("hello_first", "say hello (peer, ring) before anything else")
            if msg["ring"] != self.ring:
                raise ProtocolError("wrong_ring", f"this peer belongs to ring {self.ring!r}, not {msg['ring']!r}")
            if self.key is None:
                self.hello, self.sender = msg, msg["peer"]
                return message("hello", peer=self.me, ring=self.ring)
            if not isinstance(msg.get("nonce"), bytes) or len(msg["nonce"]) != NONCE_BYTES:
                raise ProtocolError("unauthenticated", "this ring requires the ring secret: hello needs a nonce")
            self.hello = msg
            proof = handshake_proof(self.key, "server", msg["nonce"], self.nonce, msg["peer"], self.me,
                                    self.fingerprint)
            return message("hello", peer=self.me, ring=self.ring, nonce=self.nonce, proof=proof)
        if msg["type"] != "auth":
            raise ProtocolError("auth_first", "prove the ring secret (auth) before anything else")
        if not check_proof(self.key, msg["proof"], "client", self.hello["nonce"], self.nonce, self.hello["peer"],
                           self.me, self.fingerprint):
            raise ProtocolError("unauthenticated", "bad proof: the sender does not know this ring's secret")
        self.sender = self.hello["peer"]
        return None


class ClientHandshake:
    """The dialling end: `hello` to send first, then `finish(server's hello)` -> auth message or None.
    `fingerprint`: the certificate the receiving peer presented on this connection ("" without TLS)."""

    def __init__(self, key: bytes | None, me: str, ring: str, fingerprint: str = ""):
        self.key, self.me, self.ring, self.fingerprint = key, me, ring, fingerprint
        self.nonce = secrets.token_bytes(NONCE_BYTES)

    def hello(self) -> dict:
        extra = {"nonce": self.nonce} if self.key else {}
        return message("hello", peer=self.me, ring=self.ring, **extra)

    def finish(self, reply: dict, url: str) -> dict | None:
        if self.key is None:
            if "proof" in reply:
                raise RingAuthError(f"{url} belongs to a ring with a secret; this agent has none")
            return None
        if not check_proof(self.key, reply.get("proof"), "server", self.nonce, reply.get("nonce", b""),
                           self.me, reply["peer"], self.fingerprint):
            log.warning("data plane: %s (peer %s) did not prove it knows the ring secret", url, reply["peer"])
            raise RingAuthError(f"{url} (peer {reply['peer']}) did not prove it knows the ring secret")
        proof = handshake_proof(self.key, "client", self.nonce, reply["nonce"], self.me, reply["peer"],
                                self.fingerprint)
        return message("auth", proof=proof)
