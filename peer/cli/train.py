"""`splitring train`: start a job on the ring from any of its peers and follow it to the end."""
from __future__ import annotations

import json
import sys
import urllib.error

from peer.cli.common import add_ring_options, call, connect
from peer.cli.options import add_job_options, job_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on the ring", description=__doc__)
    add_ring_options(p)
    add_job_options(p.add_argument_group("job"))
    p.add_argument("--out", default=None, metavar="FILE", help="write the trained model's state dict here (torch.save)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON (no progress bar)")
    p.set_defaults(func=run)


def config_from_args(args) -> dict:
    return job_config(args).to_dict()


def warn_missing(started: dict) -> None:
    """On stderr: the peers the job runs on, and any peer seen recently that is not among them."""
    print(f"splitring train: job {started['job']} uses {len(started['ring'])} peer(s): "
          + ", ".join(f"{p} ({started['urls'][p]})" for p in started["ring"]), file=sys.stderr)
    for m in started["missing"]:
        print(f"splitring train: warning: peer {m['peer']} ({m['url']}), seen {m['seen_s_ago']:.0f} s ago, is not "
              f"answering and is left out of this job: its data is not trained on", file=sys.stderr)


def run(args) -> int:
    from tqdm import tqdm

    from pipeline.config import ConfigError
    from pipeline.models import SpecError

    try:
        config = config_from_args(args)
    except (ConfigError, SpecError) as e:
        print(f"splitring train: {e}", file=sys.stderr)
        return 2
    from peer.security import RingAuthError, open_url
    from protocols import ProtocolError

    url, key = connect(args)
    bar, summary = None, None
    try:
        for ev in call(url, key, "start_job", config=config):
            kind = ev["event"]
            if kind == "started":
                warn_missing(ev)
                if not args.json:
                    bar = tqdm(total=ev["total_steps"], unit="step", dynamic_ncols=True)
                    bar.write(f"job {ev['job']} on ring of {len(ev['ring'])} peers, {ev['layers']} layers; "
                              f"coordinator {ev['coordinator']}")
            elif kind == "step" and bar:
                bar.update(1)
                bar.set_postfix_str(f"epoch {ev['epoch']} head {ev['head'][:6]} step {ev['step']}/{ev['steps']} "
                                    f"loss {ev['loss']:.4f} {ev['samples_per_s']:.0f} samples/s"
                                    + (f" staleness {ev['staleness']}" if args.scheme == "fast-async" else ""))
            elif kind == "epoch" and bar:
                acc = "n/a" if ev["accuracy"] is None else f"{100 * ev['accuracy']:.2f}%"
                bar.write(f"epoch {ev['epoch']}: loss {ev['loss']:.4f}, held-out accuracy {acc}")
            elif kind == "round" and bar:
                acc = "n/a" if ev["accuracy"] is None else f"{100 * ev['accuracy']:.2f}%"
                bar.write(f"round {ev['round'] + 1}: loss {ev['loss']:.4f}, held-out accuracy {acc}, "
                          f"{ev['makespan_s']:.3f} s (predicted {ev['predicted_s']:.3f} s), helpers busy "
                          + ", ".join(f"{h[:6]} {b:.0%}" for h, b in ev["helper_busy"].items()))
            elif kind == "failed":
                if bar:
                    bar.close()
                print(f"splitring train: job failed: {ev['error']}", file=sys.stderr)
                return 1
            elif kind == "done":
                summary = ev["summary"]
    except urllib.error.HTTPError as e:
        detail = json.loads(e.read() or b"{}")
        print(f"splitring train: {url} refused the job: {detail.get('message', e)}", file=sys.stderr)
        return 1
    except RingAuthError as e:
        print(f"splitring train: {e}; check --secret-file", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"splitring train: cannot reach {url}: {e.reason}", file=sys.stderr)
        return 1
    except ProtocolError as e:
        print(f"splitring train: {url} answered with something else than job progress: {e.message}", file=sys.stderr)
        return 1
    if bar:
        bar.close()
    if summary is None:
        print("splitring train: the coordinator closed the stream before the job ended", file=sys.stderr)
        return 1
    if args.out:
        with open_url(f"{url}/jobs/{summary['job']}/model", key) as resp, open(args.out, "wb") as f:
            f.write(resp.read())
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        acc = "n/a" if summary["accuracy"] is None else f"{100 * summary['accuracy']:.2f}%"
        print(f"done: {summary['epochs']} epochs" if "epochs" in summary else f"done: {summary['rounds']} rounds", end="")
        print(f", final loss {summary['final_loss']:.4f}, held-out accuracy {acc}, "
              f"{summary['samples_per_s']:.0f} samples/s, {summary['seconds']:.1f}s"
              + (f", forward weights at most {len(summary['staleness']) - 1} step(s) stale"
                 if summary["scheme"] == "fast-async" else "")
              + (f"; model written to {args.out}" if args.out else ""))
    return 0
