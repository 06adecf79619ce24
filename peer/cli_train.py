"""`splitring train`: start a job on the ring from any of its peers and follow it to the end."""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error

from peer.cli_common import add_ring_options, connect
from pipeline.schedule import PIPELINES


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on the ring", description=__doc__)
    add_ring_options(p)
    p.add_argument("--model", default="mlp", help="mlp, cnn, or module:function (see pipeline/models.py)")
    p.add_argument("--model-options", default="", help="k=v,k=v, e.g. depth=4,width=256")
    p.add_argument("--epochs", type=int, default=1, help="an epoch is one pass per peer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--microbatches", type=int, default=1, help="microbatches per step (gradients accumulate)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle", choices=["on", "off"], default="on")
    p.add_argument("--scheme", choices=["nsplit", "fast", "fast-async"], default="nsplit",
                   help="nsplit: one microbatch in the chain at a time; fast: Fast N-split, microbatches pipelined, "
                        "a flush per step (exact); fast-async: pipelined across steps, forwards on weights up to "
                        "--max-staleness steps old")
    p.add_argument("--max-staleness", type=int, default=1, metavar="K",
                   help="fast-async: steps a forward's weights may lag behind (0 = synchronous 1F1B; default 1)")
    p.add_argument("--backward-at", type=backward_at, default=[], metavar="STAGE:HOST[,STAGE:HOST] | auto",
                   help="fast-async: the middle stage at chain position STAGE runs its backward and optimizer on the "
                        "peer at chain position HOST, which sends the new weights back (remote backward); auto: "
                        "for each middle stage that does not fit its peer's memory budget, a peer with room")
    p.add_argument("--pipeline", choices=list(PIPELINES), default="1f1b",
                   help="schedule of --scheme fast, all with a flush at every step, so the result is exact: 1f1b "
                        "keeps fewest forward buffers; gpipe runs every forward first; eager runs every forward "
                        "first on the stages before the last, which then fill their waits with weight-gradient "
                        "work (fastest when the stages are about equally busy; M buffers upstream)")
    p.add_argument("--wire-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="how activations and gradients travel (layer state moved by swaps is always exact)")
    p.add_argument("--compress", choices=["none", "int8"], default="none",
                   help="int8: activations and gradients 8-bit blockwise absmax (overrides --wire-dtype)")
    p.add_argument("--split", choices=["planned", "even"], default="planned",
                   help="planned: the split planner chooses each peer's layers from measured speed, memory and links; "
                        "even: equal layer counts (checked against memory budgets)")
    p.add_argument("--out", default=None, help="write the trained model's state dict here (torch.save)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON (no progress bar)")
    p.set_defaults(func=run)


def backward_at(text: str) -> list[list[int]] | str:
    if text == "auto":
        return text
    try:
        return [[int(v) for v in pair.split(":")] for pair in text.split(",") if pair] if text else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STAGE:HOST pairs of chain positions, got {text!r}") from None


def config_from_args(args) -> dict:
    from pipeline.config import JobConfig
    from pipeline.models import parse_spec

    return JobConfig(model=parse_spec(args.model, args.model_options), seed=args.seed, epochs=args.epochs,
                     batch_size=args.batch_size, microbatches=args.microbatches, optimizer=args.optimizer,
                     lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                     shuffle=args.shuffle == "on", scheme=args.scheme,
                     pipeline=args.pipeline, max_staleness=args.max_staleness, backward_at=args.backward_at,
                     split=args.split,
                     wire_dtype=args.wire_dtype,
                     compress=args.compress).to_dict()


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

    url, key = connect(args)
    body = json.dumps({"v": 1, "type": "job_start", "config": config}).encode()
    bar, summary = None, None
    try:
        with open_url(f"{url}/jobs", key, body, {"Content-Type": "application/json"}) as resp:
            for line in resp:
                ev = json.loads(line)
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
        print(f"done: {summary['epochs']} epochs, final loss {summary['final_loss']:.4f}, held-out accuracy {acc}, "
              f"{summary['samples_per_s']:.0f} samples/s, {summary['seconds']:.1f}s"
              + (f", forward weights at most {len(summary['staleness']) - 1} step(s) stale"
                 if summary["scheme"] == "fast-async" else "")
              + (f"; model written to {args.out}" if args.out else ""))
    return 0
