"""`splitring plot`: a finished job's charts as PNG files (loss, held-out accuracy, throughput, each stage's
busy/waiting/sending time, one step's timeline), from its summary: a file written by `train --json` or
`train --metrics-out`, or a job id whose summary a peer of the ring is asked for."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import urllib.error
from pathlib import Path

from peer.cli.common import add_ring_options, call, connect

INSTALL = "matplotlib is not installed: pip install 'splitring[plot]'"
KINDS = {"busy": "tab:blue", "wait": "lightgrey", "send": "tab:orange"}


class SummaryError(ValueError):
    """A file or summary that cannot be plotted; the message says why."""


class Unavailable(Exception):
    """No summary from the peer (job running, unknown, peer unreachable)."""


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw a finished job's metrics as PNG files", description=__doc__)
    add_ring_options(p)
    p.add_argument("job", metavar="JOB_OR_SUMMARY",
                   help="a JSON file holding the job's summary (what `train --json` prints, or a `--metrics-out` "
                        "JSON Lines file), or a job id to ask a peer for")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNG files (made if missing)")
    p.set_defaults(func=run)


def run(args) -> int:
    if not have_matplotlib():
        print(f"splitring plot: {INSTALL}", file=sys.stderr)
        return 2
    try:
        summary = load_summary(args.job) if is_path(args.job) else fetch_summary(args)
        plotted = write_plots(summary, args.out)
    except Unavailable as e:
        print(f"splitring plot: {e}", file=sys.stderr)
        return 1
    except SummaryError as e:
        print(f"splitring plot: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"splitring plot: cannot write to {args.out}: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, ValueError) as e:   # a summary with fields of the wrong shape
        print(f"splitring plot: {args.job}: malformed summary ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    report(plotted, sys.stdout)
    return 0


def report(plotted: dict, stream) -> None:
    for name, data in plotted.items():
        print(data["path"] if "path" in data else f"{name} skipped: {data['skipped']}", file=stream)


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def is_path(arg: str) -> bool:
    """A job id is a bare token; anything existing, or with a directory or an extension, is a file."""
    return os.path.exists(arg) or "/" in arg or "." in arg


def load_summary(path: str) -> dict:
    """The summary in a file: one JSON object (`train --json`), or JSON Lines ending with the done event."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SummaryError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SummaryError(f"{path}: cannot read it: {e}") from None
    try:
        docs = [json.loads(text)]
    except ValueError:
        try:
            docs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise SummaryError(f"{path}: neither JSON nor JSON Lines ({e})") from None
    if not docs or not isinstance(docs[-1], dict):
        raise SummaryError(f"{path}: no JSON object in it (expected a job summary)")
    last = docs[-1]
    if "event" in last:
        if last["event"] != "done" or not isinstance(last.get("summary"), dict):
            raise SummaryError(f"{path}: its last event is {last['event']!r}, not the job's \"done\": the job did "
                               f"not finish, or the file was cut short")
        return last["summary"]
    return last


def fetch_summary(args) -> dict:
    url, key = connect(args)
    try:
        reply = call(url, key, "job", params={"job": args.job}, timeout=30)
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read() or b"{}").get("message", e)
        except ValueError:
            detail = e
        raise Unavailable(f"{url} refused: {detail}") from None
    except OSError as e:   # URLError, RingAuthError
        raise Unavailable(f"cannot reach {url}: {e}") from None
    if reply["summary"] is None:
        last = reply["events"][-1]["event"] if reply["events"] else "none yet"
        raise Unavailable(f"job {args.job} has no summary yet (it is still running, or it ended without "
                          f"finishing; its last event: {last})")
    return reply["summary"]


def history_of(summary: dict) -> dict:
    h = summary.get("history") if isinstance(summary, dict) else None
    if isinstance(h, list):   # older parallel-scheme summaries: the list of rounds
        h = {"rounds": h}
    if not isinstance(h, dict) or not (h.get("steps") or h.get("rounds")):
        raise SummaryError("the summary has no history of steps or rounds (written by an older splitring?)")
    return h


def write_plots(summary: dict, out_dir) -> dict[str, dict]:
    """Draw the job's charts into out_dir. Returns, per file name, what it shows ({"path", and "series":
    {x field: {"x": [lo, hi], "y": [lo, hi], "points": n}}, or for busy.png "stages": {peer: fractions},
    for timeline.png "rows", "spans", "x"}), or {"skipped": why} where the summary has no data for it."""
    history = history_of(summary)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure   # no pyplot: no global backend, nothing to close

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = {"loss.png": lambda fig: loss_chart(fig, history),
              "accuracy.png": lambda fig: accuracy_chart(fig, history),
              "throughput.png": lambda fig: throughput_chart(fig, history),
              "busy.png": lambda fig: busy_chart(fig, summary),
              "timeline.png": lambda fig: timeline_chart(fig, summary)}
    result = {}
    for name, draw in charts.items():
        fig = Figure(figsize=(10, 4), layout="tight")
        FigureCanvasAgg(fig)
        data = draw(fig)
        if isinstance(data, str):
            result[name] = {"skipped": data}
            continue
        fig.savefig(out / name, dpi=100)
        result[name] = {"path": str(out / name), **data}
    return result


def points(rows: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(r[x], r[y]) for r in rows if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def span(xs: list, ys: list) -> dict:
    return {"x": [min(xs), max(xs)] if xs else None, "y": [min(ys), max(ys)] if ys else None, "points": len(xs)}


def side_by_side(fig, rows: list[dict], xfield: str, yfield: str, ylabel: str, marker: str = "",
                 ylim: tuple | None = None) -> dict:
    """Two axes: yfield against xfield (job step or round), and against seconds since the job's start."""
    series = {}
    for ax, x in zip(fig.subplots(1, 2), (xfield, "seconds")):
        xs, ys = points(rows, x, yfield)
        ax.plot(xs, ys, marker=marker)
        ax.set_xlabel(x.replace("_", " ") if x != "seconds" else "seconds since the job's start")
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(ylim)
        ax.grid(alpha=0.3)
        series[x] = span(xs, ys)
    return {"series": series}


def loss_chart(fig, h: dict):
    if h.get("steps"):
        return side_by_side(fig, h["steps"], "job_step", "loss", "training loss")
    return side_by_side(fig, h["rounds"], "round", "loss", "training loss", "o")


def accuracy_chart(fig, h: dict):
    rows, x = (h.get("epochs") or [], "job_step") if h.get("steps") else (h["rounds"], "round")
    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return "the job has no held-out accuracy"
    return side_by_side(fig, rows, x, "accuracy", "held-out accuracy", "o", (0, 1))


def throughput_chart(fig, h: dict):
    if not h.get("steps"):
        return "no per-step history (parallel schemes report rounds)"
    xs, ys = points(h["steps"], "seconds", "samples_per_s")
    ax = fig.subplots()
    ax.plot(xs, ys)
    ax.set_xlabel("seconds since the job's start")
    ax.set_ylabel("samples/s")
    ax.grid(alpha=0.3)
    return {"series": {"seconds": span(xs, ys)}}


def chain_order(summary: dict, peers) -> list:
    order = (summary.get("timeline") or {}).get("peers") or []
    return [p for p in order if p in peers] + [p for p in peers if p not in order]


def busy_chart(fig, summary: dict):
    stages = summary.get("stages") or {}
    totals = {p: sum(s.get(f"{k}_s", 0.0) for k in KINDS) for p, s in stages.items()}
    peers = [p for p in chain_order(summary, stages) if totals[p] > 0]
    if not peers:
        return "the summary has no per-stage times"
    fractions = {p: {k: stages[p].get(f"{k}_s", 0.0) / totals[p] for k in KINDS} for p in peers}
    ax = fig.subplots()
    rows = range(len(peers))[::-1]   # the chain's first stage on top
    left = [0.0] * len(peers)
    for kind, colour in KINDS.items():
        widths = [fractions[p][kind] for p in peers]
        ax.barh(rows, widths, left=left, color=colour, label=kind)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(rows, [p[:8] for p in peers])
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the stage's time")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(KINDS))
    return {"stages": fractions}


def timeline_chart(fig, summary: dict):
    from matplotlib.patches import Patch

    tl = summary.get("timeline") or {}
    spans = tl.get("spans") or {}
    peers = tl.get("peers") or list(spans)
    if not peers or not any(spans.get(p) for p in peers):
        return "the summary has no step timeline"
    fig.set_size_inches(10, 0.6 * len(peers) + 1.5)
    ax = fig.subplots()
    ends = []
    for row, peer in enumerate(peers):
        y = len(peers) - 1 - row
        for kind, label, t0, t1 in spans.get(peer) or []:
            ax.broken_barh([(t0, t1 - t0)], (y - 0.4, 0.8), facecolor=KINDS.get(kind, "grey"), edgecolor="white")
            if label:
                ax.text((t0 + t1) / 2, y, str(label), ha="center", va="center", fontsize=6, clip_on=True)
            ends += [t0, t1]
    ax.set_yticks(range(len(peers))[::-1], [p[:8] for p in peers])
    ax.set_xlabel(f"seconds since the start of step {tl.get('step', '?')}")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KINDS.items()], loc="upper right", fontsize=7)
    return {"rows": list(peers), "step": tl.get("step"), "spans": {p: len(spans.get(p) or []) for p in peers},
            "x": [min(ends), max(ends)]}
