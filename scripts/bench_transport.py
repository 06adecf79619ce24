"""Data-plane throughput and latency against the strongest baselines, in one run, on loopback or (--hosts, as
root) between two network namespaces on a bridge (scripts/netns.py): every sender in one, every receiver in the other.

For each tensor size (64 KiB to 64 MiB, x4 steps), each repeat measures every transport back to back (in
an order that rotates from repeat to repeat), so that their ratios within a repeat compare runs made under
the same conditions:
  splitring_gbps    float32 tensors from one agent (process) to another through the real data plane
                    (Links, frame encoding, the upgraded stream, decoding into tensors), via POST /data/probe
  raw_gbps          a tuned raw TCP socket between two processes: one buffer of the largest size allocated
                    before any timing on each side, sendall of a view of it, reads of at most 256 KiB into it
                    (recv_into, bounded), TCP_NODELAY; nothing allocated in the timed window
  gloo_gbps         torch.distributed gloo, blocking send/recv of one reused tensor, one message at a time
  gloo_async_gbps   gloo streaming: isend/irecv with up to 4 messages in flight (4 preallocated tensors)
  splitring_rtt_ms  one ping carrying a tensor of that size and its pong, one at a time (median of the batch)
  ping_rtt_ms       an empty ping and its pong (small-message round trip)
Headline, per size: `vs_raw_paired` and `vs_gloo_async_paired` (and `vs_gloo_paired`), the median over
repeats of splitring's throughput divided by the baseline's in the same repeat, each with `_min` and `_max`.
The `*_gbps` figures are medians over repeats (GB/s = 1e9 bytes/s). The 64 MiB line also gives the latency
of GET /status on the sending and on the receiving agent while 64 MiB tensors are in flight
(status_ms_sending / status_ms_receiving: the worst of the polls, with the number of polls).
Usage: python scripts/bench_transport.py [--json] [--repeat N] [--total-mib N] [--sizes 65536,...] [--hosts]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import netns  # noqa: E402  (scripts/)
from peer.localring import AgentProcess, LocalRing  # noqa: E402

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
_HEAD = struct.Struct(">QQ")  # raw socket: size, count
READ = 256 << 10               # raw socket: bytes per recv_into
WINDOW = 4                     # gloo streaming: messages in flight


def counts(size: int, total: int) -> int:
    return max(4, total // size)


# --- where each end runs ---------------------------------------------------------------------
LOOPBACK = [(None, "127.0.0.1")] * 2   # (network namespace or None for this one, address): sender, receiver


def enter(place: tuple) -> None:
    if place[0]:
        netns.enter(place[0])


@contextlib.contextmanager
def host_agents(hosts: netns.Hosts, workdir: str):
    """Agent k in host k's namespace, on its address; yields their URLs."""
    agents = []
    try:
        for k in range(hosts.n):
            agents.append(AgentProcess(["--ring", "bench", "--interface", hosts.address(k), "--port", "7000",
                                        "--threads", "1", "--state-dir", f"{workdir}/h{k}"],
                                       Path(workdir) / f"h{k}.log", prefix=hosts.prefix(k)))
        for a in agents:
            a.wait_ready(60)
        yield [a.url for a in agents]
    finally:
        for a in agents:
            a.stop()


# --- splitring --------------------------------------------------------------------------------
def probe(sender: str, receiver: str, size: int, count: int, round_trips: bool = False) -> float:
    body = {"v": 1, "type": "data_probe", "url": receiver, "bytes": size, "count": count, "round_trips": round_trips}
    req = urllib.request.Request(f"{sender}/data/probe", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["seconds"]


def status_latency(urls: list[str], sender: str, receiver: str) -> dict:
    """Poll /status on both agents while 64 MiB tensors stream from one to the other."""
    done = threading.Event()
    t = threading.Thread(target=lambda: (probe(sender, receiver, 64 << 20, 24), done.set()))
    t.start()
    worst = {u: 0.0 for u in urls}
    polls = 0
    time.sleep(0.05)
    while not done.is_set():
        for u in urls:
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"{u}/status", timeout=30) as r:
                r.read()
            worst[u] = max(worst[u], 1e3 * (time.perf_counter() - t0))
        polls += 1
    t.join()
    return {"status_ms_sending": round(worst[urls[0]], 2), "status_ms_receiving": round(worst[urls[1]], 2),
            "status_polls": polls}


# --- gloo -------------------------------------------------------------------------------------
def gloo_rank(rank: int, port: int, conn, places: list) -> None:
    enter(places[rank])
    if places[rank][0]:   # in a namespace of netns.Hosts: its one interface
        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{places[0][1]}:{port}", rank=rank, world_size=2)
    job = torch.zeros(2, dtype=torch.int64)
    while True:
        if rank == 0:
            job = torch.tensor(conn.recv(), dtype=torch.int64)
            dist.send(job, 1)
        else:
            dist.recv(job, 0)
        size, count = job.tolist()
        if size == 0:
            break
        streaming = count < 0
        count = abs(count)
        bufs = [torch.zeros(size // 4) for _ in range(WINDOW if streaming else 1)]
        for _ in range(2):  # warm-up
            dist.send(bufs[0], 1) if rank == 0 else dist.recv(bufs[0], 0)
        dist.barrier()
        t0 = time.perf_counter()
        if streaming:   # up to WINDOW messages in flight, each with a buffer of its own
            pending = []
            for k in range(count):
                if len(pending) == WINDOW:
                    pending.pop(0).wait()
                t = bufs[k % WINDOW]
                pending.append(dist.isend(t, 1) if rank == 0 else dist.irecv(t, 0))
            for w in pending:
                w.wait()
        else:
            for _ in range(count):
                dist.send(bufs[0], 1) if rank == 0 else dist.recv(bufs[0], 0)
        dist.barrier()
        if rank == 0:
            conn.send(time.perf_counter() - t0)
    dist.destroy_process_group()


class Gloo:
    def __init__(self, places: list):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        port = free_port()
        self.procs = [ctx.Process(target=gloo_rank, args=(r, port, child if r == 0 else None, places)) for r in (0, 1)]
        for p in self.procs:
            p.start()

    def measure(self, size: int, count: int, streaming: bool = False) -> float:
        self.conn.send([size, -count if streaming else count])
        return self.conn.recv()

    def close(self):
        self.conn.send([0, 0])
        for p in self.procs:
            p.join(30)


# --- raw socket -------------------------------------------------------------------------------
def raw_receiver(port_out, largest: int, place: tuple) -> None:
    enter(place)
    srv = socket.socket()
    srv.bind((place[1], 0))
    srv.listen()
    port_out.send(srv.getsockname()[1])
    conn, _ = srv.accept()
    buf = memoryview(bytearray(largest))   # allocated once, before anything is timed
    head = bytearray(_HEAD.size)
    while True:
        conn.recv_into(head, _HEAD.size, socket.MSG_WAITALL)
        size, count = _HEAD.unpack(head)
        if size == 0:
            return
        for _ in range(count):
            got = 0
            while got < size:
                got += conn.recv_into(buf[got:min(size, got + READ)])
        conn.sendall(b"k")


def raw_sender(jobs, largest: int, place: tuple, to: tuple) -> None:
    enter(place)
    sock = socket.create_connection(to)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = memoryview(bytearray(largest))   # allocated once, before anything is timed
    while True:
        size, count = jobs.recv()
        if size == 0:
            sock.sendall(_HEAD.pack(0, 0))
            return sock.close()
        view = data[:size]
        t0 = time.perf_counter()
        sock.sendall(_HEAD.pack(size, count))
        for _ in range(count):
            sock.sendall(view)
        sock.recv(1)
        jobs.send(time.perf_counter() - t0)


class Raw:
    """A receiving and a sending process, each where `places` puts it."""

    def __init__(self, largest: int, places: list):
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.procs = [ctx.Process(target=raw_receiver, args=(child, largest, places[1]))]
        self.procs[0].start()
        to = (places[1][1], parent.recv())
        self.jobs, child = ctx.Pipe()
        self.procs.append(ctx.Process(target=raw_sender, args=(child, largest, places[0], to)))
        self.procs[1].start()

    def measure(self, size: int, count: int) -> float:
        self.jobs.send((size, count))
        return self.jobs.recv()

    def close(self):
        self.jobs.send((0, 0))
        for p in self.procs:
            p.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def paired(ratios: list[float], key: str) -> dict:
    return {key: round(statistics.median(ratios), 3), f"{key}_min": round(min(ratios), 3),
            f"{key}_max": round(max(ratios), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per line, one per size")
    ap.add_argument("--repeat", type=int, default=5, help="repeats per size; ratios are paired within a repeat")
    ap.add_argument("--total-mib", type=int, default=256, help="bytes moved per measurement (at least 4 tensors)")
    ap.add_argument("--hosts", action="store_true",
                    help="each sender in one network namespace and each receiver in another, on a bridge (root)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="tensor sizes in bytes")
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    total = args.total_mib << 20
    with contextlib.ExitStack() as stack:
        if args.hosts:   # two namespaces on a bridge: every sender in one, every receiver in the other
            hosts = stack.enter_context(netns.Hosts(2))
            places = [(hosts.namespaces[k], hosts.address(k)) for k in range(2)]
            urls = stack.enter_context(host_agents(hosts, stack.enter_context(tempfile.TemporaryDirectory())))
        else:
            places, urls = LOOPBACK, stack.enter_context(LocalRing([[], []])).urls
        gloo = Gloo(places)
        stack.callback(gloo.close)
        raw = Raw(max(sizes), places)
        stack.callback(raw.close)
        sender, receiver = urls
        probe(sender, receiver, 1 << 20, 8)  # connect and warm up
        if not args.json:
            print(f"{'size':>9} {'splitring':>10} {'raw':>8} {'gloo':>8} {'gloo-a':>8} {'vs raw':>7} "
                  f"{'vs gloo-a':>9} {'rtt ms':>8} {'ping ms':>8}   (GB/s medians, paired ratios of {args.repeat})")
        for size in sizes:
            n = counts(size, total)
            runs = {"splitring": lambda: probe(sender, receiver, size, n), "raw": lambda: raw.measure(size, n),
                    "gloo": lambda: gloo.measure(size, n), "gloo_async": lambda: gloo.measure(size, n, True)}
            names, got = list(runs), {name: [] for name in runs}
            for r in range(args.repeat):
                for name in names[r % len(names):] + names[:r % len(names)]:   # rotating order
                    got[name].append(size * n / runs[name]() / 1e9)
            k = max(3, min(50, n // 4))
            rtt = statistics.median(probe(sender, receiver, size, k, round_trips=True) / k
                                    for _ in range(args.repeat))
            ping = statistics.median(probe(sender, receiver, 0, 200, round_trips=True) / 200
                                     for _ in range(args.repeat))
            ours = got["splitring"]
            row = {"size_bytes": size, **{f"{name}_gbps": round(statistics.median(v), 3) for name, v in got.items()},
                   **paired([a / b for a, b in zip(ours, got["raw"])], "vs_raw_paired"),
                   **paired([a / b for a, b in zip(ours, got["gloo_async"])], "vs_gloo_async_paired"),
                   **paired([a / b for a, b in zip(ours, got["gloo"])], "vs_gloo_paired"),
                   "splitring_rtt_ms": round(1e3 * rtt, 3), "ping_rtt_ms": round(1e3 * ping, 3),
                   "repeats": args.repeat, "messages": n}
            if size == SIZES[-1]:
                row.update(status_latency(urls, sender, receiver))
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{size >> 10:>6}KiB {row['splitring_gbps']:>10.2f} {row['raw_gbps']:>8.2f} "
                      f"{row['gloo_gbps']:>8.2f} {row['gloo_async_gbps']:>8.2f} {row['vs_raw_paired']:>7.2f} "
                      f"{row['vs_gloo_async_paired']:>9.2f} {row['splitring_rtt_ms']:>8.3f} "
                      f"{row['ping_rtt_ms']:>8.3f}", flush=True)
                if "status_ms_sending" in row:
                    print(f"GET /status while 64 MiB tensors are in flight: worst {row['status_ms_sending']} ms "
                          f"(sending agent), {row['status_ms_receiving']} ms (receiving agent), "
                          f"{row['status_polls']} polls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
