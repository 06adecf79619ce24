"""A longer fuzzing run of the agent: the in-process hypothesis tests of tests/test_security.py (frame
decoder, schema, every HTTP route, the data plane, open and with a ring secret) with `--scale` times
as many cases each.

    .venv/bin/python scripts/fuzz_agent.py --scale 20
"""
import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=10.0, help="cases per test, as a multiple of the suite's")
    p.add_argument("-k", default="fuzz or handler or adversarial or refuse or decoder or schema",
                   help="pytest -k expression choosing the tests")
    args = p.parse_args()
    env = {**os.environ, "SPLITRING_FUZZ_SCALE": str(args.scale)}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:logging", "-k", args.k,
                            str(ROOT / "tests" / "test_security.py")], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
