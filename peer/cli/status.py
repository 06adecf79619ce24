"""`splitring status`: what a peer sees: itself, the ring's peers and where they were seen, its stages."""
from __future__ import annotations

import json
import sys
import urllib.error

from peer.cli.common import add_ring_options, call, connect


def register(sub) -> None:
    p = sub.add_parser("status", help="show a peer's view of the ring", description=__doc__)
    add_ring_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    url, key = connect(args)
    try:
        st = call(url, key, "status", timeout=10)
    except (urllib.error.URLError, OSError) as e:  # RingAuthError is a ConnectionError
        print(f"splitring status: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if "private" in st:
        print(f"peer {st['peer']} ring {st['ring']!r} protocol v{st['version']}: the rest is private to the ring "
              f"(give --secret-file)")
        return 0
    print(f"peer {st['peer']} ring {st['ring']!r} protocol v{st['version']} at {st['url']} "
          f"(mDNS {'on ' + st['interface'] if st['interface'] else 'off'}); data {st['data']['name']}: {st['data']['samples']} samples; "
          f"role {st['role']} (client/helper schemes)")
    print(f"sees {len(st['peers'])} peer(s):")
    for p in st["peers"]:
        print(f"  {p['peer']}  {p['url']}  via {p['source']}, seen {p['seen_s_ago']}s ago, protocol v{p['version']}, "
              f"instance {p.get('instance', '?')}")
    for m in st.get("missing", []):
        print(f"  missing: {m['peer']}  {m['url']}, last answered {m['seen_s_ago']}s ago")
    for c in st["conflicts"]:
        print(f"  CONFLICT: {c}")
    for s in st["stages"]:
        if "round" in s:   # a client/helper scheme
            parts = ", ".join(f"[{a}, {b})" for a, b in s["layers"])
            print(f"{s['role']} of job {s['job']} ({s['scheme']}): layers {parts or 'none'} round {s['round']}; "
                  f"labels {s['labels']}")
        else:
            print(f"stage of job {s['job']}: layers [{s['layers'][0]}, {s['layers'][1]}) rotation {s['rotation']}")
    for h in st.get("held", []):
        print(f"held job {h['job']} (stage freed, committed state on disk; resume with `splitring train --resume "
              f"{h['job']}`): {h['reason']}")
    for job, ev in st.get("jobs", {}).items():
        lost = ev.get("recoveries", [])
        print(f"coordinating job {job}: {ev.get('event', 'starting')}"
              + (f"; {len(lost)} peer loss(es) recovered: " + ", ".join(r["peer"] for r in lost) if lost else "")
              + (f"; going on without {', '.join(ev['lost'])}" if ev.get("lost") else ""))
    return 0
