"""Ring authentication: the ring key, signed HTTP requests and responses, data-plane handshake proofs,
and replay protection. Pure functions over bytes (hmac, hashlib, secrets); the agent wires them in.

Peers prove they know the ring secret with HMAC-SHA256 under a key derived from the secret and the ring
name. The secret itself is never sent, and nothing derived from it is advertised.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict

from protocols.errors import ProtocolError

NONCE_BYTES = 16
MAX_SKEW = 60.0             # seconds a signed request's time may differ from the receiver's clock
REPLAY_CAPACITY = 100_000   # nonces remembered at most (only nonces of verified requests are stored)

# HTTP headers of a signed request (time, nonce, body hash, MAC) and of its signed response (MAC)
H_TIME, H_NONCE, H_BODY, H_AUTH = "X-Splitring-Time", "X-Splitring-Nonce", "X-Splitring-Body", "X-Splitring-Auth"
H_REPLY = "X-Splitring-Reply"


def ring_key(secret: bytes, ring: str) -> bytes:
    """The key a ring signs with. Bound to the ring name, so one secret reused for two rings still
    keeps them apart; the secret itself never signs anything."""
    return hmac.new(secret, b"splitring ring key\0" + ring.encode(), hashlib.sha256).digest()


def mac(key: bytes, *fields: bytes | str | int | float) -> bytes:
    """HMAC-SHA256 over fields, each length-prefixed so that no two field lists sign the same bytes."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for f in fields:
        b = f if isinstance(f, bytes) else str(f).encode()
        h.update(len(b).to_bytes(4, "big") + b)
    return h.digest()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def body_hash(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


# --- HTTP ---------------------------------------------------------------------------------------
def sign_request(key: bytes, method: str, path: str, body: bytes, now: float, nonce: str | None = None,
                 fingerprint: str = "") -> dict[str, str]:
    """Headers that authenticate one request. `fingerprint`: the server's TLS certificate as the
    caller sees it ("" without TLS), so a request relayed through another TLS endpoint does not verify."""
    nonce = nonce or new_nonce()
    digest, stamp = body_hash(body), f"{now:.3f}"
    tag = mac(key, "request", method.upper(), path, stamp, nonce, digest, fingerprint)
    return {H_TIME: stamp, H_NONCE: nonce, H_BODY: digest, H_AUTH: tag.hex()}


def check_request_headers(key: bytes, headers, method: str, path: str, now: float,
                          fingerprint: str = "") -> str:
    """Verify a request's signature (over the body hash it declares) before its body is read.
    Returns its nonce; raises ProtocolError("unauthenticated", why) otherwise."""
    try:
        stamp, nonce, digest, tag = (headers[h] for h in (H_TIME, H_NONCE, H_BODY, H_AUTH))
        when = float(stamp)
    except (KeyError, ValueError):
        raise ProtocolError("unauthenticated", "this ring requires a signed request (ring secret)") from None
    want = mac(key, "request", method.upper(), path, stamp, nonce, digest, fingerprint).hex()
    if not hmac.compare_digest(want, tag):
        raise ProtocolError("unauthenticated", "bad signature: the caller does not know this ring's secret")
    if not abs(now - when) <= MAX_SKEW:  # also refuses NaN
        raise ProtocolError("unauthenticated", f"request time is {now - when:.0f}s off this peer's clock "
                                               f"(at most {MAX_SKEW:.0f}s): stale, replayed, or clocks differ")
    return nonce


def check_body(headers, body: bytes) -> None:
    if not hmac.compare_digest(headers.get(H_BODY, ""), body_hash(body)):
        raise ProtocolError("unauthenticated", "the body does not match its signed hash")


def sign_response(key: bytes, nonce: str, status: int, fingerprint: str = "") -> str:
    """Proof that the answer comes from a ring member: bound to the request's nonce and the status."""
    return mac(key, "response", nonce, status, fingerprint).hex()


def check_response(key: bytes, nonce: str, status: int, tag: str | None, fingerprint: str = "") -> bool:
    return tag is not None and hmac.compare_digest(sign_response(key, nonce, status, fingerprint), tag)


class ReplayCache:
    """Nonces of verified requests seen within the time window. A request outside the window is refused
    as stale, so a nonce need only be remembered for as long as its time could still pass."""

    def __init__(self, window: float = MAX_SKEW, capacity: int = REPLAY_CAPACITY):
        self.window, self.capacity = window, capacity
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> expiry, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, nonce: str, now: float) -> None:
        """Record a nonce, or raise ProtocolError if it was seen (a replay) or no room is left."""
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise ProtocolError("replay", "this request was seen before (replayed)")
        if len(self._seen) >= self.capacity:
            raise ProtocolError("busy", "too many recent requests to remember; retry shortly")
        # kept until the request's time is surely out of the window: insertion order is expiry order
        self._seen[nonce] = now + 2 * self.window


# --- dashboard links ----------------------------------------------------------------------------
DASHBOARD_LINK_S = 120   # how long a dashboard link waits to be opened (once)


def dashboard_link(key: bytes, peer: str, now: float, ttl: float = DASHBOARD_LINK_S) -> dict[str, str]:
    """The query of a one-time link to `peer`'s private dashboard view (`splitring dashboard`): it proves
    knowledge of the ring key without carrying it, names the peer it is for and expires after ttl."""
    expires, nonce = str(int(now + ttl)), new_nonce()
    return {"peer": peer, "expires": expires, "nonce": nonce, "mac": mac(key, "dashboard", peer, expires, nonce).hex()}


def check_dashboard_link(key: bytes, peer: str, query, now: float, ttl: float = DASHBOARD_LINK_S) -> str:
    """The link's nonce (for the caller to admit once), or ProtocolError saying why the link is refused."""
    fields = {k: query.get(k) for k in ("peer", "expires", "nonce", "mac")}
    if not all(isinstance(v, str) and v for v in fields.values()) or not re.fullmatch(r"[0-9]{1,12}", fields["expires"]):
        raise ProtocolError("unauthenticated", "not a dashboard link: make one with `splitring dashboard`")
    if fields["peer"] != peer:
        raise ProtocolError("unauthenticated", f"this dashboard link is for peer {fields['peer']}, not {peer}")
    expires = int(fields["expires"])
    if expires < now or expires > now + ttl + MAX_SKEW:
        raise ProtocolError("stale", "this dashboard link has expired: make a new one with `splitring dashboard`")
    want = mac(key, "dashboard", peer, fields["expires"], fields["nonce"]).hex()
    if not hmac.compare_digest(want, fields["mac"]):
        raise ProtocolError("unauthenticated", "this dashboard link was not made with the ring secret")
    return fields["nonce"]


# --- data plane handshake -----------------------------------------------------------------------
def handshake_proof(key: bytes, role: str, client_nonce: bytes, server_nonce: bytes, client: str, server: str,
                    fingerprint: str = "") -> bytes:
    """Proof for one side ("server" or "client") of a data-plane connection: covers both sides' fresh
    nonces and peer ids, so a captured handshake proves nothing on another connection."""
    return mac(key, "handshake", role, client_nonce, server_nonce, client, server, fingerprint)


def check_proof(key: bytes, proof, role: str, client_nonce: bytes, server_nonce: bytes, client: str,
                server: str, fingerprint: str = "") -> bool:
    want = handshake_proof(key, role, client_nonce, server_nonce, client, server, fingerprint)
    return isinstance(proof, bytes) and hmac.compare_digest(want, proof)
