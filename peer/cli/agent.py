"""`splitring agent`: run this device's agent until SIGINT/SIGTERM.

Its options are AgentConfig's fields. Test knobs (--compute-slowdown) are listed last in --help, under
"testing (not for normal use)": visible to whoever reads a test or benchmark that uses them, and clearly
no option a user needs."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from peer.cli.common import RingOptions, keep_freed_memory, parse_cpus, pin_to, resolve_interface, secret
from peer.cli.options import add_options, values
from peer.cli.plan import BYTE_UNITS, quantity
from peer.limits import LIMITS
from pipeline.config import knob


@dataclass(kw_only=True)
class AgentConfig(RingOptions):
    """Every option of `splitring agent`, with its default and help."""
    data: str | None = knob(None, "digits (scikit-learn's bundled digits) or FILE.npz (x float32, y int64, optional "
                                  "x_test/y_test); omit to give compute only", metavar="digits|FILE.npz")
    shard: str | None = knob(None, "k/n: keep the k-th of n disjoint parts of the train split", metavar="k/n")
    partition: str = knob("blocks", "how --shard cuts the train split: blocks (contiguous), iid (a seeded random "
                                    "split), dirichlet:ALPHA (each class spread over the shards in Dirichlet(ALPHA) "
                                    "proportions: non-IID, more so for small ALPHA) or classes:K (shard k holds K "
                                    "classes)", metavar="blocks|iid|dirichlet:ALPHA|classes:K")
    partition_seed: int = knob(0, "the seed of --partition (every agent of a ring must use the same)")
    role: str | None = knob(None, "client: owns data, holds the first (and, U-shaped, last) layers of client/helper "
                                  "schemes; helper: runs the middle layers for clients (default: client if it has "
                                  "--data, else helper). N-split ignores it", choices=("client", "helper"))
    port: int = knob(7000, "HTTP + WebSocket port (0: any free port)")
    listen: str | None = knob(None, "address to bind (default: the --interface address)", metavar="ADDRESS")
    state_dir: str = field(metadata={"help": "where the peer id and checkpoints live (one per agent)",
                                      "metavar": "DIR"})
    join: list[str] = knob([], "a known peer, polled over HTTP where mDNS does not reach (repeatable)",
                           metavar="HOST:PORT")
    no_mdns: bool = knob(False, "do not use mDNS; find peers through --join only")
    threads: int = knob(1, "torch intra-op threads for this agent's compute")
    cpus: str | None = knob(None, "run this agent on these CPUs only, e.g. 0 or 0-1,3 (Linux; as taskset -c). Agents "
                                  "sharing a machine each on their own cores do not stall one another's compute",
                            metavar="LIST")
    busy_poll: bool = knob(False, "while a pass runs, compute on the event loop's thread and poll the sockets instead "
                                  "of sleeping between messages: no thread hand-offs, and no core (or virtual CPU) "
                                  "that dozes off between microbatches and resumes slower. Keeps a core fully busy "
                                  "for the pass; for dedicated devices, not battery-powered ones")
    memory_budget: str | None = knob(None, "most memory this agent's stages may use, e.g. 512MiB (default: 80% of "
                                           "the RAM available at start); the planner never gives it more",
                                     metavar="BYTES")
    tls_cert: str | None = knob(None, "serve HTTPS and TLS with this certificate (self-signed is expected: peers pin "
                                      "its fingerprint); needs --tls-key and a ring secret", metavar="PEM")
    tls_key: str | None = knob(None, "the private key of --tls-cert", metavar="PEM")
    allow_model: list[str] = knob([], "let jobs build their model with this code of yours (repeatable; fnmatch "
                                      "patterns such as 'mymodels.*' allowed). Without it only the built-in models "
                                      "run: a job naming anything else is refused before any import, since a job "
                                      "request would otherwise run code of the requester's choosing on this device "
                                      "(see docs/security.md)", metavar="PACKAGE.MODULE:FUNCTION")
    pending_messages: int = knob(LIMITS.pending_messages, "data-plane messages of one job and kind (fwd, bwd) that "
                                 "may wait unread here; then this agent stops reading from their sender until its "
                                 "stage takes one (backpressure: bounds what a fast neighbour can queue; a plan keeps "
                                 "room for them in --memory-budget)", metavar="N")
    log_level: str = knob("INFO", "DEBUG, INFO, WARNING or ERROR")
    compute_slowdown: float = knob(1.0, "make every computation X times slower, like a slower device", metavar="X",
                                   testing=True)


def register(sub) -> None:
    p = sub.add_parser("agent", help="run a device agent", description=__doc__.split("\n\n")[0])
    add_options(p, AgentConfig)
    p.set_defaults(func=run)


def default_budget() -> int:
    """80% of the memory available now."""
    return int(0.8 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def tls_options(cfg: AgentConfig, key: bytes | None):
    """--tls-cert/--tls-key as (context, fingerprint), or None; ValueError says what is wrong."""
    from peer.security import server_tls

    if not (cfg.tls_cert or cfg.tls_key):
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if key is None:
        raise ValueError("TLS needs a ring secret (--secret-file): peers pin each other's certificates through "
                         "the exchange the secret authenticates, so without one TLS would not stop an impostor")
    return server_tls(cfg.tls_cert, cfg.tls_key)


def run(args) -> int:
    cfg = AgentConfig(**values(args, AgentConfig))
    if cfg.cpus is not None:   # first, so every thread the agent starts inherits it
        try:
            if not hasattr(os, "sched_setaffinity"):
                raise ValueError("--cpus needs Linux (sched_setaffinity)")
            pin_to(parse_cpus(cfg.cpus, os.sched_getaffinity(0)))
        except (ValueError, OSError) as e:
            print(f"splitring agent: {e}", file=sys.stderr)
            return 2
    keep_freed_memory()
    import uvloop

    from peer.agent import Agent, serve
    from peer.security import key_for
    from peer.state import StateDir, StateDirInUse
    from pipeline.data import DataError, load

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        data = load(cfg.data, cfg.shard, cfg.partition, cfg.partition_seed)
        state = StateDir(cfg.state_dir)
    except (DataError, StateDirInUse) as e:
        print(f"splitring agent: {e}", file=sys.stderr)
        return 2
    address = resolve_interface(cfg.interface)
    key = key_for(secret(cfg), cfg.ring)
    try:
        budget = default_budget() if cfg.memory_budget is None else int(quantity(cfg.memory_budget, BYTE_UNITS,
                                                                                    "memory budget"))
        tls = tls_options(cfg, key)
        if cfg.pending_messages < 1:
            raise ValueError(f"--pending-messages must be at least 1, not {cfg.pending_messages}")
    except ValueError as e:
        print(f"splitring agent: {e}", file=sys.stderr)
        return 2
    agent = Agent(cfg.ring, state, data, cfg.listen or address, cfg.port, None if cfg.no_mdns else address,
                  address, cfg.join, cfg.threads, budget, cfg.compute_slowdown, key, tls, cfg.busy_poll,
                  cfg.allow_model, cfg.role, cfg.pending_messages)

    def ready(a):
        print(f"splitring agent {a.peer_id} ring={a.ring} listening on {a.url} data={data.name} "
              f"samples={len(data)}", flush=True)

    uvloop.run(serve(agent, ready))
    return 0
