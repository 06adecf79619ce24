import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from peer.localring import LocalRing


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
