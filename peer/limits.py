"""Every limit an agent enforces on what it receives, with its default, in one place.

Not a knob: a fwd/bwd tensor must have exactly the dtype and shape the receiving stage expects for its
step and microbatch (peer.worker.JobRuntime.accept), so the largest tensor accepted is 1x the expected one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # largest data-plane frame (header + tensor payloads); larger ones are refused before their
    # payloads are read
    max_frame: int = 1 << 30
    # largest control-API request body; swaps carry a stage's layer state through it
    max_control_body: int = 1 << 30
    # data-plane messages of one job and kind (fwd, bwd) waiting unread; the connection is not
    # read further until there is room, so a neighbour cannot queue more than this
    pending_messages: int = 64
    # new data-plane connections and refused (unauthenticated) requests per second from one remote
    # address, with a burst allowance; more are answered 429 without further work
    connections_per_s: float = 20.0
    connection_burst: int = 50
    # seconds a new data-plane connection has to prove itself (hello, and auth in a ring with a secret);
    # one that has not is closed, so idle unauthenticated connections cannot pile up
    handshake_s: float = 10.0


LIMITS = Limits()


class RateLimiter:
    """A token bucket per remote address (pure: the caller passes the clock)."""

    def __init__(self, rate: float, burst: int, max_remotes: int = 10_000):
        self.rate, self.burst, self.max_remotes = rate, burst, max_remotes
        self.buckets: dict[str, tuple[float, float]] = {}  # remote -> (tokens, at)

    def allow(self, remote: str, now: float) -> bool:
        tokens, at = self.buckets.get(remote, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if len(self.buckets) >= self.max_remotes and remote not in self.buckets:
            # forget full buckets (remotes that have been quiet) to stay bounded
            self.buckets = {r: b for r, b in self.buckets.items()
                            if b[0] + (now - b[1]) * self.rate < self.burst}
        ok = tokens >= 1
        self.buckets[remote] = (tokens - 1 if ok else tokens, now)
        return ok
