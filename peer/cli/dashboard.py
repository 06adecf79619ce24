"""`splitring dashboard`: the address of a peer's dashboard; in a ring with a secret, a one-time link that
opens its private view in a browser (valid for two minutes; the session it opens lasts twelve hours)."""
from __future__ import annotations

import sys
import time
import urllib.error
import urllib.parse

from peer.cli.common import add_ring_options, call, connect
from protocols.auth import dashboard_link


def register(sub) -> None:
    p = sub.add_parser("dashboard", help="print a link to a peer's dashboard", description=__doc__)
    add_ring_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    url, key = connect(args)
    try:   # signed: the link names the peer that proved it is a ring member
        peer = call(url, key, "status", timeout=10)["peer"]
    except (urllib.error.URLError, OSError) as e:
        print(f"splitring dashboard: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if key is None:
        print(f"{url}/")
        return 0
    print(f"{url}/dashboard/login?{urllib.parse.urlencode(dashboard_link(key, peer, time.time()))}")
    print("splitring dashboard: open this link within two minutes; it works once", file=sys.stderr)
    return 0
