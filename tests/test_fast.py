"""Fast N-split on a live ring: pipelined microbatches give exactly the sequential result."""
import pytest

from conftest import load_out, max_diff, summary_of
from peer.localring import train_cli
from pipeline import data, reference
from pipeline.config import JobConfig


@pytest.mark.parametrize("pipe", ["1f1b", "gpipe"])
def test_fast_nsplit_on_a_live_ring_is_exact(digits_ring, tmp_path, pipe):
    ring = digits_ring
    out = tmp_path / "model.pt"
    args = ["--epochs", "1", "--batch-size", "64", "--microbatches", "4", "--lr", "0.05", "--momentum", "0.9",
            "--model-options", "depth=5,width=64", "--scheme", "fast", "--pipeline", pipe, "--split", "even",
            "--out", str(out)]
    summary = summary_of(train_cli(ring.urls[1], *args))
    assert summary["scheme"] == "fast" and summary["pipeline"] == pipe
    assert all(len([r for r in p["ranges"].values() if r[1] > r[0]]) == 3 for p in summary["plans"])
    order = ring.ring_order()
    heads = [data.load("digits", f"{ring.agents.index(a)}/3") for a in order]
    cfg = JobConfig(model={"name": "mlp", "depth": 5, "width": 64}, batch_size=64, microbatches=4, lr=0.05,
                    momentum=0.9)
    assert max_diff(load_out(out), reference.train(cfg, heads).state_dict()) <= 1e-5
