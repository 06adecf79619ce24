"""Options and helpers shared by the CLI commands."""
from __future__ import annotations

import asyncio
import ipaddress
import sys

import ifaddr


def add_ring_options(p, *, peer: bool = True) -> None:
    p.add_argument("--ring", default="default", help="ring name (peers of one ring train together)")
    p.add_argument("--interface", default="127.0.0.1",
                   help="IPv4 address or interface name where mDNS runs (default: 127.0.0.1, loopback only; "
                        "give your LAN interface, e.g. eth0 or 192.168.1.20, to reach other devices)")
    if peer:
        p.add_argument("--peer", default=None, help="URL of a peer (e.g. http://127.0.0.1:7001): skips discovery")
        p.add_argument("--discover-timeout", type=float, default=5.0, help="seconds to look for peers by mDNS")


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
