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


def http_post(url: str, body: bytes = b"", headers: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a plain POST, error statuses included."""
    req = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class StatusWatch:
    """Polls every agent's /status in the background: the slowest answer, and any that failed."""

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
        self.stop.set()
        self.thread.join()
