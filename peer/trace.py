"""What a job did, kept small enough to show live: a stage's per-action trace (Trace) and a job's metrics
over time (History). Plain data; the worker and the coordinator fill them, the dashboard and the plots
read them."""
from __future__ import annotations

import math
import time
from collections import deque

KINDS = ("busy", "wait", "send")   # computing; waiting for a message; handing one to the data plane
SPANS_KEPT = 4096


class Trace:
    """A stage's spans, [kind, label, rotation, mode, step, t0, t1] on its monotonic clock, the latest
    SPANS_KEPT of them, and the seconds spent in each kind during the current pass."""

    def __init__(self, kept: int = SPANS_KEPT, clock=time.monotonic):
        self.spans: deque[list] = deque(maxlen=kept)
        self.clock = clock
        self.totals = dict.fromkeys(KINDS, 0.0)

    def new_pass(self) -> None:
        self.totals = dict.fromkeys(KINDS, 0.0)

    def add(self, kind: str, label: str, rotation: int, mode: str, step: int, t0: float, t1: float) -> None:
        self.spans.append([kind, label, rotation, mode, step, t0, t1])
        self.totals[kind] += t1 - t0

    def recent(self, steps: int) -> list[list]:
        """The spans of the last `steps` training steps of the latest rotation traced (eval left out)."""
        train = [s for s in self.spans if s[3] == "train"]
        if not train:
            return []
        rotation = train[-1][2]
        last = [s for s in train if s[2] == rotation]
        first = max(s[4] for s in last) - steps + 1
        return [s for s in last if s[4] >= first]


def valid_spans(spans) -> list[list]:
    """The well-formed spans of a peer's trace reply (a peer's bad data must not break a view of the job)."""
    def ok(s) -> bool:
        return (isinstance(s, list) and len(s) == 7 and s[0] in KINDS and isinstance(s[1], str) and len(s[1]) <= 16
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        for v in (s[2], s[4], s[5], s[6])) and s[3] in ("train", "eval"))
    return [s for s in spans if ok(s)][:SPANS_KEPT] if isinstance(spans, list) else []


def timeline(traces: dict[str, list[list]], offsets: dict[str, float], step: int | None = None) -> dict:
    """One training step of every stage on one clock: {"step", "peers", "spans": {peer: [[kind, label, t0,
    t1], ...]}}, seconds from the step's first span. traces: each peer's recent spans (Trace.recent);
    offsets: what to add to a peer's clock to get the common one. step: the latest step every peer traced,
    unless given."""
    steps = [{s[4] for s in spans} for spans in traces.values() if spans]
    if not steps:
        return {"step": None, "peers": list(traces), "spans": {p: [] for p in traces}}
    if step is None:
        common = set.intersection(*steps)
        step = max(common) if common else max(max(s) for s in steps)
    picked = {p: [(s[0], s[1], s[5] + offsets.get(p, 0.0), s[6] + offsets.get(p, 0.0)) for s in spans if s[4] == step]
              for p, spans in traces.items()}
    start = min((s[2] for spans in picked.values() for s in spans), default=0.0)
    return {"step": step, "peers": list(traces),
            "spans": {p: [[k, label, round(t0 - start, 6), round(t1 - start, 6)] for k, label, t0, t1 in spans]
                      for p, spans in picked.items()}}


def stage_times(tl: dict) -> dict[str, dict[str, float]]:
    """Per peer, the seconds of a timeline's step spent in each kind (busy_s, wait_s, send_s)."""
    out = {}
    for peer, spans in tl["spans"].items():
        out[peer] = dict.fromkeys((f"{k}_s" for k in KINDS), 0.0)
        for kind, _, t0, t1 in spans:
            out[peer][f"{kind}_s"] += t1 - t0
    return out


def clock_offset(sent: float, received: float, theirs: float) -> float:
    """What to add to a peer's clock reading to get ours, from one call: we sent at `sent`, it read its clock
    (`theirs`) while answering, we got the answer at `received` (both on our clock). Off by at most half the
    round trip (Cristian's method)."""
    return (sent + received) / 2 - theirs


class History:
    """A job's metrics over time as points (dicts), at most `limit` per series: when a series is full,
    every other point is dropped and from then on only every `stride`-th point is kept, so the points stay
    evenly spread over the whole job; the latest point is always kept as well."""

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.series: dict[str, list[dict]] = {}
        self._stride: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._latest: dict[str, dict] = {}

    def add(self, series: str, point: dict) -> None:
        kept = self.series.setdefault(series, [])
        seen = self._seen[series] = self._seen.get(series, 0) + 1
        stride = self._stride.setdefault(series, 1)
        self._latest[series] = point
        if (seen - 1) % stride:
            return
        kept.append(point)
        if len(kept) > self.limit:
            del kept[1::2]
            self._stride[series] = stride * 2

    def points(self, series: str, after: float | None = None) -> list[dict]:
        """The series' kept points, and its latest if it was not kept; only those whose "seconds" are past
        `after`, if given (what a watcher has not seen yet)."""
        kept = self.series.get(series, [])
        latest = self._latest.get(series)
        out = kept + ([latest] if latest is not None and (not kept or kept[-1] is not latest) else [])
        return out if after is None else [p for p in out if p["seconds"] > after]

    def cut(self, field: str, last: float) -> None:
        """Drop the points whose `field` is past `last` (steps undone by a rollback)."""
        for name, kept in self.series.items():
            kept[:] = [p for p in kept if p.get(field, last) <= last]
            latest = self._latest.get(name)
            if latest is not None and latest.get(field, last) > last:
                self._latest[name] = kept[-1] if kept else None

    def to_dict(self) -> dict:
        return {name: self.points(name) for name in self.series}
