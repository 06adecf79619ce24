"""`splitring cancel`: stop a job from any peer of the ring (a peer that does not coordinate the job
passes the request on to the one that does); every stage is freed, checkpoints stay on disk."""
from __future__ import annotations

import json
import sys
import urllib.error

from peer.cli.common import add_ring_options, call, connect


def register(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a running job", description=__doc__)
    add_ring_options(p)
    p.add_argument("--job", required=True, help="the job's id (printed by `splitring train`, shown by status)")
    p.set_defaults(func=run)


def run(args) -> int:
    url, key = connect(args)
    try:
        reply = call(url, key, "cancel_job", params={"job": args.job}, timeout=30)
    except urllib.error.HTTPError as e:
        detail = json.loads(e.read() or b"{}")
        print(f"splitring cancel: {detail.get('message', e)}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:  # RingAuthError is a ConnectionError
        print(f"splitring cancel: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    print(f"job {reply['cancelled']} cancelled (coordinator {reply['coordinator']})")
    return 0
