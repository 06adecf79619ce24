"""A longer fuzzing run of the agent, with `--scale` times as many cases per test as the suite runs:

- the in-process hypothesis tests of tests/test_security.py (frame decoder, schema, every HTTP route, the
  data plane, open and with a ring secret);
- the job-config fuzzing of tests/test_fuzz_jobs.py: configs over every JobConfig field (valid, at the
  limits, beyond them, absurd, of the wrong type; built-in, unknown and custom models) posted to /jobs,
  /plan and /job/profile of two live agents, checking that each answer is a 4xx with a JSON error or a
  200 (never a 5xx or a hang), that the agents stay alive, that /status answers within a second, that
  their memory does not grow, and that no code named by a request runs.

    .venv/bin/python scripts/fuzz_agent.py --scale 20
    .venv/bin/python scripts/fuzz_agent.py --scale 20 -k live     # only the live job-config fuzzing

A failing job config is printed as hypothesis drew it (the live test does not shrink: after a crash or a
hang every later example would fail too); add -s to pytest's arguments (PYTEST_ADDOPTS=-s) to see the live
test's tally of answers, /status latency and the agents' memory when it passes.
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_security.py", "tests/test_fuzz_jobs.py"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=10.0, help="cases per test, as a multiple of the suite's")
    p.add_argument("-k", default="fuzz or handler or adversarial or refuse or decoder or schema",
                   help="pytest -k expression choosing the tests (every test of test_fuzz_jobs.py matches 'fuzz')")
    args = p.parse_args()
    env = {**os.environ, "SPLITRING_FUZZ_SCALE": str(args.scale)}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-k", args.k,
                            *(str(ROOT / t) for t in TESTS)], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
