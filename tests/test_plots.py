"""`splitring plot`, `train --plots` and `train --metrics-out`: every chart drawn from the data of the whole job,
charts the summary has no data for skipped, bad input refused with a message, metrics written as they come."""
import argparse
import csv
import json
import math
import subprocess
import sys

import pytest
from matplotlib.image import imread

from peer.cli import main, plot
from peer.cli.plot import write_plots
from peer.cli.train import MetricsWriter, follow

PNGS = ["loss.png", "accuracy.png", "throughput.png", "busy.png", "timeline.png"]
PEERS = ["a1" * 6, "b2" * 6, "c3" * 6]


def synthetic_summary(total=100, epochs=2) -> dict:
    """A finished 3-stage job of `total` steps, its history decimated (every 3rd step, first and last kept)."""
    job_steps = sorted(set(range(1, total + 1, 3)) | {total})
    steps = [{"seconds": 0.5 + 0.1 * s, "job_step": s, "epoch": 1 + (s - 1) * epochs // total, "rotation": s % 3,
              "loss": 2.0 / s, "samples_per_s": 300.0 + s} for s in job_steps]
    ends = [total * (e + 1) // epochs for e in range(epochs)]
    history = {"steps": steps, "epochs": [{"seconds": 0.6 + 0.1 * s, "job_step": s, "epoch": e + 1, "loss": 2.0 / s,
                                           "accuracy": 0.8 + 0.05 * e} for e, s in enumerate(ends)]}
    stages = {p: {"busy_s": 3.0 + k, "wait_s": 1.0, "send_s": 0.5 * k, "steps": total} for k, p in enumerate(PEERS)}
    spans = {p: [["busy", f"F{m}", 0.01 * (m + k), 0.01 * (m + k + 1)] for m in range(4)]
             + [["send", "a", 0.06 + 0.01 * k, 0.065 + 0.01 * k], ["wait", "", 0.0, 0.01 * k]]
             for k, p in enumerate(PEERS)}
    return {"job": "0123456789ab", "epochs": epochs, "scheme": "nsplit", "history": history, "stages": stages,
            "timeline": {"peers": PEERS, "step": total, "spans": spans}}


def assert_png(path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, path


def test_every_chart_is_drawn_from_the_whole_job(tmp_path):
    summary = synthetic_summary()
    steps, epochs = summary["history"]["steps"], summary["history"]["epochs"]
    plotted = write_plots(summary, tmp_path / "plots")
    assert sorted(plotted) == sorted(PNGS)
    for name in PNGS:
        assert plotted[name]["path"] == str(tmp_path / "plots" / name)
        assert_png(plotted[name]["path"])
    loss = plotted["loss.png"]["series"]
    assert loss["job_step"] == {"x": [1, 100], "y": [0.02, 2.0], "points": len(steps)}
    assert loss["seconds"]["x"] == [steps[0]["seconds"], steps[-1]["seconds"]]
    accuracy = plotted["accuracy.png"]["series"]
    assert accuracy["job_step"] == {"x": [50, 100], "y": [0.8, pytest.approx(0.85)], "points": 2}
    assert accuracy["seconds"]["x"] == [epochs[0]["seconds"], epochs[-1]["seconds"]]
    assert plotted["throughput.png"]["series"]["seconds"] == {
        "x": [steps[0]["seconds"], steps[-1]["seconds"]], "y": [301.0, 400.0], "points": len(steps)}
    fractions = plotted["busy.png"]["stages"]
    assert list(fractions) == PEERS
    for k, p in enumerate(PEERS):
        assert sum(fractions[p].values()) == pytest.approx(1.0)
        assert fractions[p]["busy"] == pytest.approx((3.0 + k) / (4.0 + 1.5 * k))
    timeline = plotted["timeline.png"]
    assert timeline["rows"] == PEERS and timeline["step"] == 100
    assert timeline["spans"] == {p: 6 for p in PEERS} and timeline["x"] == [0.0, pytest.approx(0.085)]


@pytest.mark.parametrize("change, skipped", [
    (lambda s: s.pop("stages"), "busy.png"),
    (lambda s: s.update(stages={}), "busy.png"),
    (lambda s: s.pop("timeline"), "timeline.png"),
    (lambda s: s.update(timeline={"peers": [], "step": 0, "spans": {}}), "timeline.png"),
    (lambda s: [e.update(accuracy=None) for e in s["history"]["epochs"]], "accuracy.png"),
    (lambda s: s["history"].pop("epochs"), "accuracy.png"),
])
def test_a_chart_without_data_is_skipped_and_the_others_drawn(tmp_path, change, skipped):
    summary = synthetic_summary()
    change(summary)
    plotted = write_plots(summary, tmp_path)
    assert set(plotted[skipped]) == {"skipped"} and plotted[skipped]["skipped"]
    assert not (tmp_path / skipped).exists()
    for name in set(PNGS) - {skipped}:
        assert_png(plotted[name]["path"])


def test_a_parallel_scheme_is_plotted_by_round(tmp_path):
    rounds = [{"seconds": 2.0 * (r + 1), "round": r, "loss": 1.0 / (r + 1), "accuracy": 0.5 + 0.1 * r}
              for r in range(4)]
    plotted = write_plots({"scheme": "splitfed-v1", "history": {"rounds": rounds}}, tmp_path)
    assert plotted["loss.png"]["series"]["round"] == {"x": [0, 3], "y": [0.25, 1.0], "points": 4}
    assert plotted["accuracy.png"]["series"]["seconds"] == {"x": [2.0, 8.0], "y": [0.5, pytest.approx(0.8)],
                                                            "points": 4}
    assert {n for n, d in plotted.items() if "skipped" in d} == {"throughput.png", "busy.png", "timeline.png"}
    assert_png(tmp_path / "loss.png")


def test_a_summary_without_history_is_refused(tmp_path):
    for summary in ({"job": "x"}, {"history": {"steps": [], "epochs": []}}, {"history": None}):
        with pytest.raises(plot.SummaryError, match="no history"):
            write_plots(summary, tmp_path)


# --- the command line ---------------------------------------------------------------------------------
def plot_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["plot", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "neither JSON nor JSON Lines"),
    ("[1, 2]", "no JSON object"),
    ("", "no JSON object"),
    (json.dumps({"job": "x", "epochs": 1}), "no history"),
    (json.dumps({"event": "step", "loss": 1.0}) + "\n" + json.dumps({"event": "epoch", "loss": 1.0}),
     "not the job's \"done\""),
])
def test_bad_input_is_exit_2_with_a_message(tmp_path, capsys, content, message):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    code, out, err = plot_cli(capsys, path, "--out", tmp_path / "plots")
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "plots").exists()


def test_plot_reads_the_metrics_file_and_the_train_json(tmp_path, capsys):
    summary = synthetic_summary()
    jsonl, single = tmp_path / "metrics.jsonl", tmp_path / "summary.json"
    jsonl.write_text("\n".join(json.dumps(e) for e in [{"event": "step", **summary["history"]["steps"][0]},
                                                         {"event": "done", "summary": summary}]) + "\n")
    single.write_text(json.dumps(summary))
    for source in (jsonl, single):
        code, out, err = plot_cli(capsys, source, "--out", tmp_path / source.stem)
        assert code == 0, err
        assert out.split() == [str(tmp_path / source.stem / n) for n in PNGS]


def test_plot_a_job_by_id_asks_a_peer(tmp_path, capsys, monkeypatch):
    asked = []
    reply = {"job": "0123456789ab", "events": [{"event": "step"}], "summary": None}

    def call(url, key, name, params=None, timeout=None):
        asked.append((url, name, params))
        return reply
    monkeypatch.setattr(plot, "connect", lambda args: ("http://peer", None))
    monkeypatch.setattr(plot, "call", call)
    code, out, err = plot_cli(capsys, "0123456789ab", "--peer", "http://peer", "--out", tmp_path)
    assert code == 1 and "no summary yet" in err and "still running" in err
    reply["summary"] = synthetic_summary()
    code, out, err = plot_cli(capsys, "0123456789ab", "--peer", "http://peer", "--out", tmp_path)
    assert code == 0 and len(out.split()) == len(PNGS)
    assert asked == [("http://peer", "job", {"job": "0123456789ab"})] * 2


def test_without_matplotlib_the_cli_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    (tmp_path / "s.json").write_text(json.dumps(synthetic_summary()))
    code, out, err = plot_cli(capsys, tmp_path / "s.json", "--out", tmp_path / "plots")
    assert code == 2 and "pip install 'splitring[plot]'" in err
    opened = []
    args = argparse.Namespace(json=True, out=None, plots=str(tmp_path / "plots"), metrics_out=None)
    assert follow("http://x", None, lambda: opened.append(1), args, "train") == 2
    assert opened == [] and "pip install 'splitring[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


# --- --metrics-out --------------------------------------------------------------------------------------
EVENTS = [
    {"event": "step", "seconds": 0.5, "job_step": 1, "epoch": 1, "rotation": 0, "loss": 2.3, "samples_per_s": 100.0},
    {"event": "plan", "rotation": 0},   # not a metric: left out
    {"event": "step", "seconds": 0.9, "job_step": 2, "epoch": 1, "rotation": 0, "loss": 2.1, "samples_per_s": 120.0},
    {"event": "epoch", "seconds": 1.0, "job_step": 2, "epoch": 1, "loss": 2.1, "accuracy": None},
    {"event": "round", "round": 0, "loss": 1.5, "accuracy": 0.7, "helper_busy": {"h1": 0.5}},
    {"event": "done", "summary": {"job": "x", "final_loss": 1.5}},
]
METRICS = [e for e in EVENTS if e["event"] != "plan"]


def test_metrics_jsonl_has_every_metric_event_as_it_arrives(tmp_path):
    path = tmp_path / "m.jsonl"
    writer = MetricsWriter(str(path))
    for k, ev in enumerate(METRICS):
        writer.write(ev)
        assert [json.loads(line) for line in path.read_text().splitlines()] == METRICS[:k + 1]   # flushed
    writer.close()


def test_metrics_csv_has_the_union_of_the_fields_and_no_done(tmp_path):
    path = tmp_path / "m.csv"
    writer = MetricsWriter(str(path))
    for k, ev in enumerate(METRICS[:-1]):
        writer.write(ev)
        with open(path, newline="") as f:
            assert len(list(csv.DictReader(f))) == k + 1   # flushed, header widened in place
    writer.write(METRICS[-1])
    writer.close()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["event", "seconds", "job_step", "epoch", "rotation", "loss", "samples_per_s",
                                 "accuracy", "round", "helper_busy"]
    assert [r["event"] for r in rows] == ["step", "step", "epoch", "round"]
    assert rows[0]["job_step"] == "1" and rows[0]["accuracy"] == "" and rows[0]["round"] == ""
    assert rows[2]["accuracy"] == "" and rows[3]["accuracy"] == "0.7"
    assert json.loads(rows[3]["helper_busy"]) == {"h1": 0.5}


def test_metrics_out_needs_a_known_extension(tmp_path):
    with pytest.raises(ValueError, match=".jsonl, .json or .csv"):
        MetricsWriter(str(tmp_path / "m.txt"))


def test_follow_writes_the_metrics_and_the_plots(tmp_path, capsys):
    summary = synthetic_summary()
    started = {"event": "started", "job": "j", "ring": PEERS, "urls": {p: "http://x" for p in PEERS}, "missing": []}
    args = argparse.Namespace(json=True, out=None, plots=str(tmp_path / "plots"),
                              metrics_out=str(tmp_path / "m.jsonl"))
    code = follow("http://x", None, lambda: iter([started, *EVENTS[:-1], {"event": "done", "summary": summary}]),
                  args, "train")
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out) == summary
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lines] == ["step", "step", "epoch", "round", "done"]
    for name in PNGS:
        assert str(tmp_path / "plots" / name) in err
        assert_png(tmp_path / "plots" / name)


def test_a_bad_metrics_file_stops_train_before_the_job(tmp_path, capsys):
    opened = []
    args = argparse.Namespace(json=True, out=None, plots=None, metrics_out=str(tmp_path / "m.txt"))
    assert follow("http://x", None, lambda: opened.append(1), args, "train") == 2
    assert opened == [] and "--metrics-out" in capsys.readouterr().err


# --- live -------------------------------------------------------------------------------------------------
def test_train_writes_plots_and_metrics_of_a_live_job(start_ring, tmp_path):
    ring = start_ring([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)])
    plots, metrics = tmp_path / "plots", tmp_path / "metrics.jsonl"
    proc = subprocess.run([sys.executable, "-m", "peer", "train", "--peer", ring.urls[0], "--model", "mlp",
                           "--epochs", "1", "--batch-size", "64", "--plots", str(plots), "--metrics-out",
                           str(metrics), "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in PNGS:
        assert (plots / name).stat().st_size > 0 and str(plots / name) in proc.stderr
        assert_png(plots / name)
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert events[-1] == {"event": "done", "summary": summary}
    steps = [e for e in events if e["event"] == "step"]
    total = 3 * math.ceil(479 / 64)   # digits: 1437 training samples, 3 shards of 479, one pass each
    history = summary["history"]["steps"]
    assert len(steps) == total == history[-1]["job_step"]
    assert history[0]["job_step"] == 1 and [e["job_step"] for e in steps] == list(range(1, total + 1))
    assert [e["epoch"] for e in summary["history"]["epochs"]] == [1]
    # the timeline is of the last pass's chain, which the planner may have given to fewer peers than the ring's
    assert set(summary["stages"]) == set(summary["ring"]) >= set(summary["timeline"]["peers"]) != set()
