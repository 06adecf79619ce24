"""`splitring jobs`: the jobs a peer knows, with their state; `splitring attach JOB`: follow a running job's
progress from any peer (one that does not coordinate it relays from the one that does)."""
from __future__ import annotations

import json
import sys
import time
import urllib.error

from peer.cli.common import add_ring_options, call, connect
from peer.cli.train import add_output_options


def register(sub) -> None:
    p = sub.add_parser("jobs", help="list the jobs a peer knows", description=__doc__)
    add_ring_options(p)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run_jobs)
    a = sub.add_parser("attach", help="follow a running job", description=__doc__)
    add_ring_options(a)
    a.add_argument("job", help="the job's id")
    a.add_argument("--json", action="store_true", help="print the final summary as JSON (no progress bar)")
    add_output_options(a)
    a.set_defaults(func=run_attach)


def run_jobs(args) -> int:
    url, key = connect(args)
    try:
        jobs = call(url, key, "jobs", timeout=30)["jobs"]
    except (urllib.error.URLError, OSError) as e:
        print(f"splitring jobs: cannot reach {url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(jobs))
        return 0
    for j in sorted(jobs, key=lambda j: -j.get("updated", time.time())):
        rotation = j.get("rotation")
        print(f"{j['job']}  {j.get('state', '?'):8}  {j.get('scheme', '?'):10}  coordinator "
              f"{j.get('coordinator', '?')}  " + (f"committed rotation {rotation}" if rotation is not None else ""))
    return 0


def run_attach(args) -> int:
    from peer.cli.train import follow

    url, key = connect(args)
    return follow(url, key, lambda: call(url, key, "follow_job", params={"job": args.job}), args, "attach", args.job)
