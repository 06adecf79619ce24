"""What a connected dashboard costs the training: samples/s of the benchmark's ring (scripts/bench_pipeline.py:
its MLP, batch and microbatches, Fast N-split on 2 agents pinned to a core each, busy-polling) with and
without a page watching, in the same run.

A watcher reads /dashboard/events from the coordinator's agent (the one that does the dashboard's work:
it asks every stage for its trace and builds the view) exactly as the page does, in a process of its own;
a browser's drawing is left out (it runs on the watcher's device, not on the ring's). Each repeat trains
once with and once without a watcher, in alternating order, on one ring; the headline is the median of the
per-repeat ratios (`with_vs_without_paired`, with its min and max).
Usage: python scripts/bench_dashboard.py [--json] [--steps N] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_pipeline import BATCH, DEDICATED, DEPTH, FAST, MICRO, RATE, WIDTH, samples  # noqa: E402
from peer.localring import LocalRing, train_cli  # noqa: E402


class Watcher:
    """A page's view of an agent: its event stream, read to the end of each update, in a thread."""

    def __init__(self, url: str):
        self.updates = self.bytes = 0
        self.resp = urllib.request.urlopen(url + "/dashboard/events", timeout=60)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self):
        try:
            for line in self.resp:
                self.bytes += len(line)
                self.updates += line.startswith(b"data: ")
        except (OSError, ValueError, AttributeError):   # closed by close() (http.client drops its file)
            pass

    def close(self):
        self.resp.close()


def train(url: str) -> dict:
    proc = train_cli(url, "--model", "mlp", "--model-options", f"in_features={WIDTH},depth={DEPTH},width={WIDTH}",
                     "--epochs", "1", "--batch-size", str(BATCH), "--microbatches", str(MICRO), "--lr", "0.01",
                     "--shuffle", "off", "--scheme", "fast", *FAST)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cores = sorted(os.sched_getaffinity(0))
    cpus = [str(c) for c in cores[:2]] if len(cores) >= 2 else None
    x, y = samples(args.steps)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.npz"
        np.savez(path, x=x.numpy(), y=y.numpy())
        with LocalRing([["--data", str(path)], []], peer_ids=["p0", "p1"], cpus=cpus, extra=list(DEDICATED)) as ring:
            url = ring.urls[0]
            train(url)   # warm-up: the first job's profiling and allocations
            for r in range(args.repeats):
                run = {}
                for watched in ((False, True) if r % 2 == 0 else (True, False)):
                    watcher = Watcher(url) if watched else None
                    t0 = time.monotonic()
                    summary = train(url)
                    if watcher:
                        watcher.close()
                        run["updates_per_s"] = watcher.updates / (time.monotonic() - t0)
                        run["bytes_per_update"] = watcher.bytes / max(watcher.updates, 1)
                    run["with" if watched else "without"] = summary[RATE]
                runs.append(run)
    ratios = [r["with"] / r["without"] for r in runs]
    res = {"with_page_sps": statistics.median(r["with"] for r in runs),
           "without_page_sps": statistics.median(r["without"] for r in runs),
           "with_vs_without_paired": statistics.median(ratios), "with_vs_without_paired_min": min(ratios),
           "with_vs_without_paired_max": max(ratios),
           "updates_per_s": statistics.median(r["updates_per_s"] for r in runs),
           "bytes_per_update": statistics.median(r["bytes_per_update"] for r in runs),
           "steps": args.steps, "repeats": args.repeats, "pinned_cpus": cpus, "scheme": "fast", "batch": BATCH,
           "microbatches": MICRO}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")


if __name__ == "__main__":
    main()
