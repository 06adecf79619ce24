"""Run one benchmark script on this work tree and on another revision, alternately, and report each
figure's paired ratio (this tree / the other, median over rounds): does a change alter speed beyond noise?

    .venv/bin/python scripts/compare_revisions.py 4260fbd --rounds 2 -- scripts/bench_pipeline.py --steps 30

The other revision is checked out in a temporary git worktree and run with its own code (PYTHONPATH and
working directory), from this venv. The script's last stdout line of JSON per run (or every JSON line,
for scripts that print one per size, keyed by its size) is read; numeric fields are compared.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, script: list[str]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, *script, "--json"], cwd=tree, env=env, capture_output=True, text=True,
                         check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def numbers(rows: list[dict]) -> dict[str, float]:
    """Numeric fields, keyed by row (its size if rows are per size, else its index) and name."""
    out = {}
    for i, row in enumerate(rows):
        size = row.get("size_bytes", row.get("bytes", i))
        tag = f"{size}:" if len(rows) > 1 else ""
        out.update({tag + k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the revision to compare this work tree with")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    argv = sys.argv[1:]
    if "--" not in argv:
        ap.error("give the benchmark after --: -- SCRIPT [ARGS...] (it is run with --json)")
    args, script = ap.parse_args(argv[:argv.index("--")]), argv[argv.index("--") + 1:]
    with tempfile.TemporaryDirectory(prefix="splitring-rev-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), args.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs = {"this": [], "other": []}
            for _ in range(args.rounds):
                runs["this"].append(numbers(run(ROOT, script)))
                runs["other"].append(numbers(run(other, script)))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
    keys = sorted(set.intersection(*(set(r) for r in runs["this"] + runs["other"])))
    ratios = {k: statistics.median(a[k] / b[k] for a, b in zip(runs["this"], runs["other"]) if b[k])
              for k in keys if all(b[k] for b in runs["other"])}
    print(json.dumps({"script": script, "rev": args.rev, "rounds": args.rounds, "paired_ratio_this_over_rev": ratios,
                      "this": runs["this"], "rev_runs": runs["other"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
