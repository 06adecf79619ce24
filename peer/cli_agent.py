"""`splitring agent`: run this device's agent until SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import os
import sys

from peer.cli_common import add_ring_options, keep_freed_memory, parse_cpus, pin_to, resolve_interface, secret
from peer.cli_plan import BYTE_UNITS, quantity


def register(sub) -> None:
    p = sub.add_parser("agent", help="run a device agent", description=__doc__)
    add_ring_options(p, peer=False)
    p.add_argument("--data", default=None,
                   help="digits (scikit-learn's bundled digits) or FILE.npz (x float32, y int64, optional "
                        "x_test/y_test); omit to give compute only")
    p.add_argument("--shard", default=None, help="k/n: keep the k-th of n disjoint blocks of the train split")
    p.add_argument("--port", type=int, default=7000, help="HTTP + WebSocket port (0: any free port)")
    p.add_argument("--listen", default=None, help="address to bind (default: the --interface address)")
    p.add_argument("--state-dir", required=True, help="where the peer id and checkpoints live (one per agent)")
    p.add_argument("--join", action="append", default=[], metavar="HOST:PORT",
                   help="a known peer, polled over HTTP where mDNS does not reach (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not use mDNS; find peers through --join only")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for this agent's compute")
    p.add_argument("--cpus", default=None, metavar="LIST",
                   help="run this agent on these CPUs only, e.g. 0 or 0-1,3 (Linux; as taskset -c). Agents "
                        "sharing a machine each on their own cores do not stall one another's compute")
    p.add_argument("--busy-poll", action="store_true",
                   help="while a pass runs, compute on the event loop's thread and poll the sockets instead of "
                        "sleeping between messages: no thread hand-offs, and no core (or virtual CPU) that dozes "
                        "off between microbatches and resumes slower. Keeps a core fully busy for the pass; for "
                        "dedicated devices, not battery-powered ones")
    p.add_argument("--memory-budget", default=None, metavar="BYTES",
                   help="most memory this agent's stages may use, e.g. 512MiB (default: 80%% of the RAM "
                        "available at start); the planner never gives it more")
    p.add_argument("--compute-slowdown", type=float, default=1.0, metavar="X",
                   help="test knob: make every computation X times slower, like a slower device")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS and TLS with this certificate (self-signed is expected: peers pin its "
                        "fingerprint); needs --tls-key and a ring secret")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--allow-model", action="append", default=[], metavar="PACKAGE.MODULE:FUNCTION",
                   help="let jobs build their model with this code of yours (repeatable; fnmatch patterns such as "
                        "'mymodels.*' allowed). Without it only the built-in models run: a job naming anything else "
                        "is refused before any import, since a job request would otherwise run code of the "
                        "requester's choosing on this device (see docs/security.md)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=run)


def default_budget() -> int:
    """80% of the memory available now."""
    return int(0.8 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def tls_options(args, key: bytes | None):
    """--tls-cert/--tls-key as (context, fingerprint), or None; ValueError says what is wrong."""
    from peer.security import server_tls

    if not (args.tls_cert or args.tls_key):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if key is None:
        raise ValueError("TLS needs a ring secret (--secret-file): peers pin each other's certificates through "
                         "the exchange the secret authenticates, so without one TLS would not stop an impostor")
    return server_tls(args.tls_cert, args.tls_key)


def run(args) -> int:
    if args.cpus is not None:   # first, so every thread the agent starts inherits it
        try:
            if not hasattr(os, "sched_setaffinity"):
                raise ValueError("--cpus needs Linux (sched_setaffinity)")
            pin_to(parse_cpus(args.cpus, os.sched_getaffinity(0)))
        except (ValueError, OSError) as e:
            print(f"splitring agent: {e}", file=sys.stderr)
            return 2
    keep_freed_memory()
    import uvloop

    from peer.agent import Agent, serve
    from peer.security import key_for
    from peer.state import StateDir, StateDirInUse
    from pipeline.data import DataError, load

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        data = load(args.data, args.shard)
        state = StateDir(args.state_dir)
    except (DataError, StateDirInUse) as e:
        print(f"splitring agent: {e}", file=sys.stderr)
        return 2
    address = resolve_interface(args.interface)
    key = key_for(secret(args), args.ring)
    try:
        budget = default_budget() if args.memory_budget is None else int(quantity(args.memory_budget, BYTE_UNITS,
                                                                                    "memory budget"))
        tls = tls_options(args, key)
    except ValueError as e:
        print(f"splitring agent: {e}", file=sys.stderr)
        return 2
    agent = Agent(args.ring, state, data, args.listen or address, args.port, None if args.no_mdns else address,
                  address, args.join, args.threads, budget, args.compute_slowdown, key, tls, args.busy_poll,
                  args.allow_model)

    def ready(a):
        print(f"splitring agent {a.peer_id} ring={a.ring} listening on {a.url} data={data.name} "
              f"samples={len(data)}", flush=True)

    uvloop.run(serve(agent, ready))
    return 0
