import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from peer.localring import LocalRing, get_json


@pytest.fixture
def start_ring():
    """start_ring(data_options_per_agent, **LocalRing kwargs) -> a started ring, stopped after the test."""
    rings = []

    def start(data, **kw):
        ring = LocalRing(data, **kw)
        rings.append(ring)
        return ring.start()

    yield start
    for ring in rings:
        ring.stop()


@pytest.fixture(scope="module")
def digits_ring():
    with LocalRing([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)]) as ring:
        yield ring


def save_npz(path, x, y, **extra):
    np.savez(path, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64),
             **{k: v.numpy() for k, v in extra.items()})
    return str(path)


def summary_of(proc) -> dict:
    assert proc.returncode == 0, f"train failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def load_out(path) -> dict:
    return torch.load(path, weights_only=True)


def wait_until(predicate, timeout: float, what: str, every: float = 0.1):
    """Poll `predicate` until it returns something true and return that; fail naming `what` if it has not
    within `timeout` seconds. A deadline on a state, for synchronisation: generous, never a claim about speed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


def http_post(url: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a plain POST, error statuses included."""
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class StatusWatch:
    """Polls every agent's /status in the background while a `with` block runs: how many answers came, and
    any that failed (no answer within 10 s, or an error). On leaving the block it waits until every agent has
    answered at least once since the block started, so `count` says something even when the block was quick.
    `slowest` is kept for printing only: how fast an answer comes on a shared machine is no test's business."""

    def __init__(self, urls: list[str]):
        self.urls, self.slowest, self.count, self.errors = urls, 0.0, 0, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            for url in self.urls:
                t0 = time.monotonic()
                try:
                    get_json(f"{url}/status", timeout=10)
                except Exception as e:
                    self.errors.append(f"{url}: {e!r}")
                    continue
                took = time.monotonic() - t0
                if took > self.slowest:
                    self.slowest = took
                self.count += 1
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            wait_until(lambda: self.count >= len(self.urls) or self.errors, 60, "an answer from every agent")
        self.stop.set()
        self.thread.join()


# --- tests that could not run say so where nobody misses it ------------------------------------------
def pytest_terminal_summary(terminalreporter):
    """A multi-host (netns) or browser test that was skipped leaves its guarantee untested: say so loudly, last."""
    browser = [r for r in terminalreporter.stats.get("skipped", []) if "browser" in r.nodeid]
    for r in browser:
        terminalreporter.write_line(f"SKIPPED browser test: {r.nodeid}: the dashboard page was NOT tested in a "
                                    f"browser ({r.longrepr[2] if isinstance(r.longrepr, tuple) else r.longrepr})",
                                    red=True, bold=True)
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "netns" in getattr(r, "keywords", {})]
    if not skipped:
        return
    reasons = sorted({r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr) for r in skipped})
    terminalreporter.write_sep("!", f"WARNING: {len(skipped)} MULTI-HOST (netns) TEST(S) SKIPPED", red=True, bold=True)
    for r in skipped:
        terminalreporter.write_line(f"SKIPPED multi-host test: {r.nodeid}", red=True, bold=True)
    terminalreporter.write_line(f"reason: {'; '.join(reasons)}", red=True, bold=True)
    terminalreporter.write_line("mDNS discovery between hosts and training across network namespaces were NOT tested "
                                "in this run: run the suite as root with iproute2 (as CI does).", red=True, bold=True)
