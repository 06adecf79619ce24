"""`splitring demo`: the embedded default. Starts a 3-peer ring on loopback (one digits shard each),
finds it by mDNS, trains the MLP with N-split and prints the held-out accuracy."""
from __future__ import annotations

import subprocess
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("demo", help="train on a local 3-peer ring (loopback, bundled digits)", description=__doc__)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--split", choices=["even", "planned"], default="even",
                   help="even (default here): one layer per peer, to show the chain at work; planned: the "
                        "planner, which keeps a model this small on fewer peers since links cost more than compute")
    p.add_argument("--out", default=None, help="also write the trained model here")
    p.set_defaults(func=run)


def run(args) -> int:
    from peer.localring import LocalRing

    t0 = time.perf_counter()
    data = [["--data", "digits", "--shard", f"{k}/{args.peers}"] for k in range(args.peers)]
    print(f"starting {args.peers} agents on 127.0.0.1 (mDNS on loopback only) ...", flush=True)
    with LocalRing(data, ring="demo") as ring:
        for a in ring.agents:
            print(f"  peer {a.peer_id} at {a.url}", flush=True)
        cmd = [sys.executable, "-m", "peer", "train", "--ring", ring.ring, "--interface", "127.0.0.1",
               "--model", "mlp", "--epochs", str(args.epochs), "--batch-size", "32", "--lr", "0.05",
               "--momentum", "0.9", "--split", args.split] + (["--out", args.out] if args.out else [])
        code = subprocess.call(cmd)
    print(f"demo finished in {time.perf_counter() - t0:.1f}s", flush=True)
    return code
