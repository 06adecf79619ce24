"""A model none of the ring's devices could train alone: a `gpt` of about 50 M parameters on 4 agents, each
with a memory budget 2.5 times smaller than the model's whole training state (parameters, gradients,
momentum, a microbatch's activations), trained on Python's own source text (byte-level). Prints JSON: the
model's size, the budget, what one agent with that budget was told, each agent's measured peak (the
budget's accounting, and RSS) and the held-out loss after every epoch.
Usage: python scripts/big_gpt.py [--blocks 16] [--width 512] [--epochs 2] [--text-bytes 600000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from peer.localring import LocalRing, train_cli  # noqa: E402
from pipeline.capacity import layer_costs  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.planner.model import stage_memory  # noqa: E402

AGENTS, SHRINK = 4, 2.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--text-bytes", type=int, default=600_000)
    args = ap.parse_args()
    spec = {"name": "gpt", "blocks": args.blocks, "width": args.width, "heads": 8, "context": args.context}
    cfg = JobConfig(model=spec, batch_size=args.batch_size, optimizer="sgd", momentum=0.9, lr=0.02)
    layers = layer_costs(cfg)
    whole = stage_memory(layers, 0, len(layers), buffers=1)
    budget = int(whole / SHRINK)
    options = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    job = ("--model", "gpt", "--model-options", options, "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.02", "--recv-timeout", "600")
    with tempfile.TemporaryDirectory() as tmp:
        text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))[:args.text_bytes]
        path = Path(tmp) / "python.txt"
        path.write_bytes(text)
        with LocalRing([["--data", f"text:{path}", "--memory-budget", str(budget)]]) as alone:
            refused = train_cli(alone.urls[0], *job)
        peers = [["--data", f"text:{path}", "--shard", f"{k}/{AGENTS}", "--memory-budget", str(budget)]
                 for k in range(AGENTS)]
        with LocalRing(peers) as ring:
            proc = train_cli(ring.urls[0], *job, "--metrics-out", str(Path(tmp) / "metrics.jsonl"), timeout=7200)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
            epochs = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({
        "params": sum(l.param_bytes for l in layers) // 4, "whole_training_state_bytes": whole,
        "budget_bytes": budget, "agents": AGENTS, "text_bytes": len(text),
        "one_agent": {"returncode": refused.returncode, "said": refused.stderr.strip()[-600:]},
        "steps": sum(s["steps"] for s in summary["stages"].values() if s["steps"]) // max(1, len(summary["stages"])),
        "seconds": summary["seconds"], "samples_per_s": summary["samples_per_s"],
        "peaks": {p: {"peak_memory_bytes": s["peak_memory_bytes"], "peak_swap_bytes": s["peak_swap_bytes"],
                      "peak_rss_bytes": s["peak_rss_bytes"], "swap_spills": s["swap_spills"],
                      "within_budget": 0 < max(s["peak_memory_bytes"], s["peak_swap_bytes"]) <= budget}
                  for p, s in summary["stages"].items()},
        "held_out_loss_per_epoch": [e["held_out_loss"] for e in epochs if e["event"] == "epoch"],
        "first_step_loss": next(e["loss"] for e in epochs if e["event"] == "step"),
        "final_loss": summary["final_loss"], "perplexity": summary["perplexity"]}))


if __name__ == "__main__":
    main()
