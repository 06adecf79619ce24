"""The ring's access control over aiohttp: where the secret comes from, the server middleware that
verifies every signed request before anything else runs, the client middleware that signs ours and
verifies the answers, the data-plane handshake on both ends, and the same signing for the CLI (urllib).

With no secret the ring is open: nothing is signed and nothing is checked (a warning says so).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
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
PUBLIC = "/status"           # GET without a signature: public facts only
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


# --- HTTP, server side --------------------------------------------------------------------------
class Guard:
    """Verifies signed requests (aiohttp middleware) and signs the answers (on_response_prepare)."""

    def __init__(self, key: bytes | None, limits: Limits = LIMITS):
        self.key = key
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
        if self.key is None or (request.method == "GET" and request.path == PUBLIC and H_AUTH not in request.headers):
            return await handler(request)
        try:
            nonce = check_request_headers(self.key, request.headers, request.method, request.raw_path, time.time())
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
            response.headers[H_REPLY] = sign_response(self.key, nonce, response.status)

    def member(self, request: web.Request) -> bool:
        """Whether the caller proved it belongs to the ring (always so in an open ring)."""
        return self.key is None or "nonce" in request


def _refusal(status: int, code: str, text: str) -> web.Response:
    return web.json_response({"error": code, "message": text}, status=status)


# --- HTTP, client side --------------------------------------------------------------------------
def client_middleware(key: bytes):
    """aiohttp client middleware: sign every request; accept only answers signed by a ring member."""
    async def sign(req: aiohttp.ClientRequest, handler) -> aiohttp.ClientResponse:
        body = await req.body.as_bytes() if req.body else b""
        headers = sign_request(key, req.method, req.url.raw_path_qs, body, time.time())
        req.headers.update(headers)
        resp = await handler(req)
        if not check_response(key, headers[H_NONCE], resp.status, resp.headers.get(H_REPLY)):
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


def client_session(key: bytes | None, **kw) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(middlewares=(client_middleware(key),) if key else (), **kw)


def open_url(url: str, key: bytes | None, data: bytes | None = None, headers: dict | None = None,
             timeout: float | None = None):
    """urllib.request.urlopen for the CLI, signing the request and checking the answer's signature.
    Raises urllib.error.HTTPError for refusals, RingAuthError for an answer not signed by the ring."""
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    nonce = None
    if key:
        u = urllib.parse.urlsplit(url)
        path = u.path + (f"?{u.query}" if u.query else "")
        signed = sign_request(key, req.get_method(), path, data or b"", time.time())
        for k, v in signed.items():
            req.add_header(k, v)
        nonce = signed[H_NONCE]
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if nonce and not check_response(key, nonce, e.code, e.headers.get(H_REPLY)):
            raise RingAuthError(f"{url} did not prove it belongs to this ring{_http_error_text(e)}") from None
        raise
    if nonce and not check_response(key, nonce, resp.status, resp.headers.get(H_REPLY)):
        resp.close()
        raise RingAuthError(f"{url} did not prove it belongs to this ring")
    return resp


def _http_error_text(e: urllib.error.HTTPError) -> str:
    try:
        return f" (it answered {e.code}: {json.loads(e.read())['message']})"
    except (ValueError, KeyError, TypeError, OSError):
        return f" (it answered {e.code})"


# --- data plane handshake -----------------------------------------------------------------------
# client -> hello {peer, ring, nonce}; server -> hello {peer, ring, nonce, proof}; client -> auth {proof}.
# Each proof covers both fresh nonces and both peer ids; with no secret, hellos carry neither.
class ServerHandshake:
    """The receiving end of one data-plane connection, until the sender is known."""

    def __init__(self, key: bytes | None, me: str, ring: str):
        self.key, self.me, self.ring = key, me, ring
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
            proof = handshake_proof(self.key, "server", msg["nonce"], self.nonce, msg["peer"], self.me)
            return message("hello", peer=self.me, ring=self.ring, nonce=self.nonce, proof=proof)
        if msg["type"] != "auth":
            raise ProtocolError("auth_first", "prove the ring secret (auth) before anything else")
        if not check_proof(self.key, msg["proof"], "client", self.hello["nonce"], self.nonce, self.hello["peer"],
                           self.me):
            raise ProtocolError("unauthenticated", "bad proof: the sender does not know this ring's secret")
        self.sender = self.hello["peer"]
        return None


class ClientHandshake:
    """The dialling end: `hello` to send first, then `finish(server's hello)` -> auth message or None."""

    def __init__(self, key: bytes | None, me: str, ring: str):
        self.key, self.me, self.ring = key, me, ring
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
                           self.me, reply["peer"]):
            log.warning("data plane: %s (peer %s) did not prove it knows the ring secret", url, reply["peer"])
            raise RingAuthError(f"{url} (peer {reply['peer']}) did not prove it knows the ring secret")
        proof = handshake_proof(self.key, "client", self.nonce, reply["nonce"], self.me, reply["peer"])
        return message("auth", proof=proof)
