"""`splitring train`: start a job on the ring from any of its peers and follow it to the end."""
from __future__ import annotations

import csv
import json
import os
import sys
import urllib.error
from pathlib import Path

from peer.cli.common import add_ring_options, call, connect
from peer.cli.options import add_job_options, job_config


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model on the ring", description=__doc__)
    add_ring_options(p)
    add_job_options(p.add_argument_group("job"))
    p.add_argument("--out", default=None, metavar="FILE", help="write the trained model's state dict here (torch.save)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON (no progress bar)")
    p.add_argument("--resume", default=None, metavar="JOB",
                   help="resume a stopped or held job from its last commit (its own config; job options are ignored)")
    p.add_argument("--detach", action="store_true",
                   help="print the job's id once it has started and leave it running (follow it with attach)")
    add_output_options(p)
    p.set_defaults(func=run)


def add_output_options(p) -> None:
    """--plots, --metrics-out: for train and attach."""
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="once the job is done, draw its charts into DIR as `splitring plot` does (needs matplotlib)")
    p.add_argument("--metrics-out", default=None, metavar="FILE",
                   help="write every step, epoch and round event as it arrives, and the final summary, to FILE: "
                        "JSON Lines if it ends in .jsonl or .json, CSV if in .csv (without the summary)")


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
    from pipeline.config import ConfigError
    from pipeline.models import SpecError

    try:
        config = None if args.resume else config_from_args(args)
    except (ConfigError, SpecError) as e:
        print(f"splitring train: {e}", file=sys.stderr)
        return 2
    url, key = connect(args)
    if args.resume:
        opened = lambda: call(url, key, "resume_job", params={"job": args.resume})   # noqa: E731
    else:
        opened = lambda: call(url, key, "start_job", config=config)   # noqa: E731
    return follow(url, key, opened, args, "train")


def follow(url: str, key, opened, args, command: str, job: str | None = None) -> int:
    """Show a job's events (from opened(), an iterator of them) until it ends; Ctrl-C stops the job cleanly
    (stages freed, journal kept: resumable). The exit status: 0 done, 1 failed, 130 stopped."""
    from peer.cli import plot
    from peer.security import RingAuthError, open_url
    from protocols import ProtocolError

    metrics_out, plots = getattr(args, "metrics_out", None), getattr(args, "plots", None)
    try:   # before the job starts: a bad file name should not cost a training run
        if plots and not plot.have_matplotlib():
            raise ValueError(f"--plots: {plot.INSTALL}")
        metrics = MetricsWriter(metrics_out) if metrics_out else None
        if plots:
            Path(plots).mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"splitring {command}: {e}", file=sys.stderr)
        return 2
    seen: dict = {"job": job} if job else {}   # the job's id, once known
    try:
        summary = show(recorded(opened(), metrics), args, command, seen)
    except KeyboardInterrupt:
        return stop(url, key, seen.get("job"), command)
    except urllib.error.HTTPError as e:
        detail = json.loads(e.read() or b"{}")
        print(f"splitring {command}: {url} refused: {detail.get('message', e)}", file=sys.stderr)
        return 1
    except RingAuthError as e:
        print(f"splitring {command}: {e}; check --secret-file", file=sys.stderr)
        return 1
    except urllib.error.URLError as e:
        print(f"splitring {command}: cannot reach {url}: {e.reason}", file=sys.stderr)
        return 1
    except ProtocolError as e:
        print(f"splitring {command}: {url} answered with something else than job progress: {e.message}",
              file=sys.stderr)
        return 1
    finally:
        if metrics:
            metrics.close()
    if isinstance(summary, int):
        return summary
    if getattr(args, "out", None):
        with open_url(f"{url}/jobs/{summary['job']}/model", key) as resp, open(args.out, "wb") as f:
            f.write(resp.read())
        summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary, getattr(args, "out", None))
    return draw(summary, plots, command) if plots else 0


def draw(summary: dict, plots: str, command: str) -> int:
    """--plots: the charts of a finished job, their paths on stderr."""
    from peer.cli import plot

    try:
        plot.report(plot.write_plots(summary, plots), sys.stderr)
    except (plot.SummaryError, OSError) as e:
        print(f"splitring {command}: no plots: {e}", file=sys.stderr)
        return 1
    return 0


METRIC_EVENTS = ("step", "epoch", "round", "done")


def recorded(events, metrics: "MetricsWriter | None"):
    """The events, each metric one written to `metrics` as it passes."""
    for ev in events:
        if metrics and ev["event"] in METRIC_EVENTS:
            metrics.write(ev)
        yield ev


class MetricsWriter:
    """--metrics-out: job events to a file, a line each and flushed, so that it can be tailed. JSON Lines
    (.jsonl, .json) or CSV (.csv: an `event` column and the union of the events' fields, nested values as
    JSON, the done event left out). A CSV field first seen after some rows rewrites the file with the wider
    header (rare: each kind of event brings its fields with its first occurrence)."""

    def __init__(self, path: str):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv"):
            raise ValueError(f"--metrics-out {path}: name a .jsonl, .json or .csv file")
        self.csv = suffix == ".csv"
        self.columns: list[str] = []
        self.file = open(self.path, "w", newline="")

    def write(self, ev: dict) -> None:
        if not self.csv:
            self.file.write(json.dumps(ev) + "\n")
        elif ev["event"] != "done":
            ordered = {"event": None, **ev}   # the event column first
            row = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in ordered.items()}
            new = [k for k in row if k not in self.columns]
            if new:
                self.widen(new)
            csv.DictWriter(self.file, self.columns).writerow(row)
        self.file.flush()

    def widen(self, new: list[str]) -> None:
        """Rewrite the CSV file with the new columns added to its header (the rows so far keep their values)."""
        self.file.close()
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f)) if self.columns else []
        self.columns += new
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", newline="")

    def close(self) -> None:
        self.file.close()


def show(events, args, command: str, seen: dict):
    """Follow the events: the summary at the end, or the exit status if the job did not finish. The job's
    id goes into seen["job"] as soon as it is known."""
    from tqdm import tqdm

    bar = None
    out = (lambda text: bar.write(text)) if not args.json else (lambda text: print(text, file=sys.stderr))
    for ev in events:
        kind = ev["event"]
        if kind == "accepted":
            seen["job"] = ev["job"]
        elif kind == "started":
            seen["job"] = ev["job"]
            warn_missing(ev)
            if getattr(args, "detach", False):
                print(ev["job"])
                return 0
            if not args.json:
                bar = tqdm(total=ev["total_steps"], initial=ev.get("done_steps", 0), unit="step", dynamic_ncols=True)
                bar.write(f"job {ev['job']} on ring of {len(ev['ring'])} peers, {ev['layers']} layers; "
                          f"coordinator {ev['coordinator']}")
        elif kind == "step" and bar:
            bar.update(1)
            bar.set_postfix_str(f"epoch {ev['epoch']} head {ev['head'][:6]} step {ev['step']}/{ev['steps']} "
                                f"loss {ev['loss']:.4f} {ev['samples_per_s']:.0f} samples/s"
                                + (f" staleness {ev['staleness']}" if ev["staleness"] else ""))
        elif kind == "epoch" and bar:
            acc = "n/a" if ev["accuracy"] is None else f"{100 * ev['accuracy']:.2f}%"
            held = f", held-out loss {ev['held_out_loss']:.4f}" if ev.get("held_out_loss") is not None else ""
            bar.write(f"epoch {ev['epoch']}: loss {ev['loss']:.4f}{held}, held-out accuracy {acc}")
        elif kind == "round" and bar:
            acc = "n/a" if ev["accuracy"] is None else f"{100 * ev['accuracy']:.2f}%"
            bar.write(f"round {ev['round'] + 1}: loss {ev['loss']:.4f}, held-out accuracy {acc}, "
                      f"{ev['makespan_s']:.3f} s (predicted {ev['predicted_s']:.3f} s), helpers busy "
                      + ", ".join(f"{h[:6]} {b:.0%}" for h, b in ev["helper_busy"].items()))
        elif kind == "lost":
            out(f"peer {ev['peer']} lost: {ev['error']}")
        elif kind == "rollback":
            out(f"rolling back to the commit of rotation {ev['rotation']}" if ev["rotation"] is not None else
                "rolling back to the job's start")
        elif kind == "replanned":
            if bar:
                bar.total = ev["total_steps"]
            out(f"going on without {', '.join(ev['lost'])} on {len(ev['ring'])} peers; their passes are skipped: "
                + ", ".join(f"epoch {s['epoch'] + 1} rotation {s['rotation']}" for s in ev["skipped"]))
        elif kind == "rejoined":
            out(f"peer {ev['peer']} is back")
        elif kind == "resumed":
            out(f"resumed as attempt {ev['attempt']} from the commit of rotation {ev['rotation']}")
        elif kind in ("failed", "stopped"):
            if bar:
                bar.close()
            if kind == "failed":
                print(f"splitring {command}: job failed: {ev['error']}"
                      + (f"\nits journal is kept: resume it from its last commit with `splitring train --resume "
                         f"{ev['job']}`"
                         if ev.get("resumable") else ""), file=sys.stderr)
                return 1
            print(f"splitring {command}: job {ev['job']} stopped ({ev['reason']})"
                  + (f"; resume it with `splitring train --resume {ev['job']}`" if ev.get("resumable") else ""),
                  file=sys.stderr)
            return 130
        elif kind == "done":
            if bar:
                bar.close()
            return ev["summary"]
    if bar:
        bar.close()
    print(f"splitring {command}: the coordinator closed the stream before the job ended", file=sys.stderr)
    return 1


def stop(url: str, key, job: str | None, command: str) -> int:
    """Ctrl-C: ask the job's coordinator to stop it cleanly, and wait until it says it has."""
    if job is None:
        return 130
    print(f"splitring {command}: stopping job {job} (Ctrl-C again to leave it to its coordinator)", file=sys.stderr)
    last = None
    try:
        call(url, key, "cancel_job", params={"job": job}, timeout=30)
        for ev in call(url, key, "follow_job", params={"job": job}, timeout=60):
            if ev["event"] in ("done", "failed", "stopped"):
                last = ev
                break
    except (OSError, KeyboardInterrupt) as e:
        print(f"splitring {command}: could not confirm the stop: {e!r}", file=sys.stderr)
        return 130
    if last is None or last["event"] != "stopped":
        print(f"splitring {command}: job {job} ended before the stop: "
              f"{last['event'] if last else 'no end seen'}", file=sys.stderr)
        return 0 if last and last["event"] == "done" else 1
    print(f"splitring {command}: job {job} stopped; every stage is freed and its journal kept: resume it with "
          f"`splitring train --resume {job}`", file=sys.stderr)
    return 130


def print_summary(summary: dict, out: str | None) -> None:
    acc = "n/a" if summary["accuracy"] is None else f"{100 * summary['accuracy']:.2f}%"
    if summary.get("perplexity") is not None:   # a language model: its held-out loss per token says more
        acc = f"{acc} of tokens, held-out loss {summary['held_out_loss']:.4f}, perplexity {summary['perplexity']:.2f}"
    print(f"done: {summary['epochs']} epochs" if "epochs" in summary else f"done: {summary['rounds']} rounds", end="")
    print(f", final loss {summary['final_loss']:.4f}, held-out accuracy {acc}, "
          f"{summary['samples_per_s']:.0f} samples/s, {summary['seconds']:.1f}s"
          + (f", forward weights at most {len(summary['staleness']) - 1} step(s) stale"
             if summary["scheme"] == "fast-async" else "")
          + (f", {len(summary['recoveries'])} peer(s) lost and recovered" if summary.get("recoveries") else "")
          + (f"; model written to {out}" if out else ""))
