"""Options and helpers shared by the CLI commands."""
from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import sys
from dataclasses import dataclass

import ifaddr

from peer.cli.options import add_options
from pipeline.config import knob


@dataclass(kw_only=True)
class RingOptions:
    """Which ring: every command that talks to one, and the agent, take these."""
    ring: str = knob("default", "ring name (peers of one ring train together)")
    interface: str = knob("127.0.0.1", "IPv4 address or interface name where mDNS runs: loopback only by default; "
                                       "give your LAN interface, e.g. eth0 or 192.168.1.20, to reach other devices",
                          metavar="IF")
    secret_file: str | None = knob(None, "file holding the ring secret (default: $SPLITRING_SECRET_FILE, else "
                                         "$SPLITRING_SECRET); only peers that know it get in. Without one the ring "
                                         "is open to anyone on the network", metavar="PATH")


@dataclass(kw_only=True)
class ConnectOptions(RingOptions):
    """Which peer of the ring a command talks to."""
    peer: str | None = knob(None, "URL of a peer (e.g. http://127.0.0.1:7001, https:// with TLS): skips discovery",
                            metavar="URL")
    discover_timeout: float = knob(5.0, "seconds to look for peers by mDNS", metavar="SECONDS")


def add_ring_options(p) -> None:
    """--ring, --interface, --secret-file, --peer, --discover-timeout."""
    add_options(p, ConnectOptions)


def parse_cpus(text: str, available: set[int]) -> set[int]:
    """A CPU list as `taskset -c` writes it ("0", "0-2,5") -> the set of CPUs; ValueError names what is wrong."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise ValueError(f"--cpus {text!r}: expected a list like 0 or 0-2,5")
        top = min(int(hi or lo), max(available, default=-1) + 1)   # one past the last available is enough
        cpus.update(range(int(lo), max(top, int(lo)) + 1))
    if not cpus <= available:
        raise ValueError(f"--cpus {text!r}: CPU {min(cpus - available)} is not available to this process "
                         f"(available: {','.join(map(str, sorted(available)))})")
    return cpus


def pin_to(cpus: set[int]) -> None:
    """Run every thread of this process, and all it starts later, on `cpus` only (Linux)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:   # a thread that has just ended
            pass


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the system. A stage frees
    and allocates tensors of the same sizes every microbatch; by default each block over 128 KiB is mapped
    and unmapped every time, so every reuse pays page faults and zeroing (measured: ~6% of a stage's
    compute on the benchmark MLP). The process's resident memory then stays at its peak. Other C libraries:
    nothing to do."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)   # the largest glibc accepts: larger blocks are still mapped
    mallopt(m_trim_threshold, 1 << 30)


def secret(args) -> bytes | None:
    """The ring secret from --secret-file or the environment; exits with a message if unreadable."""
    from peer.security import load_secret

    try:
        return load_secret(args.secret_file)
    except ValueError as e:
        raise SystemExit(f"splitring: {e}") from None


def connect(args) -> tuple[str, bytes | None]:
    """(URL of one peer, ring key or None). With --peer, the key is for the ring that peer says it is in
    (a public fact; a peer that lies about it fails authentication)."""
    from peer.security import key_for

    mine = secret(args)
    url = find_peer(args)
    if not mine:
        return url, None
    ring = args.ring
    if args.peer:
        import json

        from peer.security import open_url

        try:
            with open_url(f"{url}/status", None, timeout=10) as r:
                ring = json.load(r)["ring"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"splitring: cannot reach {url}: {e}") from None
    return url, key_for(mine, ring or "default")


def resolve_interface(name: str) -> str:
    """An IPv4 address for --interface, which may be an address or an interface name."""
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        pass
    for adapter in ifaddr.get_adapters():
        if adapter.nice_name == name or adapter.name == name:
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    return ip.ip
            raise SystemExit(f"interface {name} has no IPv4 address")
    known = ", ".join(a.nice_name for a in ifaddr.get_adapters())
    raise SystemExit(f"no interface or IPv4 address {name!r} (interfaces here: {known})")


def find_peer(args) -> str:
    """The URL of one peer of the ring: --peer, else the first seen by mDNS."""
    if args.peer:
        return args.peer.rstrip("/")
    from peer.discovery import browse_ring

    peers = asyncio.run(browse_ring(args.ring, resolve_interface(args.interface), args.discover_timeout))
    if not peers:
        print(f"no peer of ring {args.ring!r} seen by mDNS on {args.interface} within {args.discover_timeout:.0f}s; "
              f"check --ring and --interface, or name one with --peer URL", file=sys.stderr)
        raise SystemExit(2)
    return peers[0].url


def call(url: str, key: bytes | None, name: str, *, params: dict | None = None, timeout: float | None = None,
         **fields):
    """Make the declared call `name` (protocols.calls) on the agent at `url`, signed with the ring key:
    its checked reply, or, for a streaming call, an iterator of its checked events. Raises what
    peer.security.open_url raises (urllib.error.HTTPError for a refusal, RingAuthError, URLError)."""
    import json

    from peer.security import open_url
    from protocols import message
    from protocols.calls import CALLS, check_event, check_reply

    c = CALLS[name]
    body = json.dumps(message(c.request, **fields)).encode() if c.request else b"" if c.method == "POST" else None
    resp = open_url(url + c.url_path(**(params or {})), key, body,
                    {"Content-Type": "application/json"} if c.request else None, timeout=timeout)
    if not c.stream:
        with resp:
            return check_reply(c, json.load(resp))

    def events():
        with resp:
            for line in resp:
                yield check_event(c, json.loads(line))
    return events()
