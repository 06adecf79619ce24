"""`gpt`, the decoder-only language model, on byte-level text that ships with Python: its layers, the
text data (sequences of the model's context, a fixed held-out tail), and split training that equals plain
PyTorch, in one process and on a live ring, for sequential N-split and Fast N-split."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_out, max_diff, summary_of
from peer.localring import train_cli
from pipeline import local, reference
from pipeline.config import JobConfig
from pipeline.data import DataError, fits_model, load, text
from pipeline.models import SpecError, build_model, footprint, input_shape, num_layers, sample_input
from pipeline.swaps import even_split

SPEC = {"name": "gpt", "blocks": 2, "width": 32, "heads": 4, "context": 16}
TEXT = Path(json.__file__).parent / "decoder.py"   # ships with Python: about 11 kB of text


def test_layers_shapes_and_sizes():
    model = build_model(SPEC, seed=3)
    assert num_layers(SPEC) == len(model) == 2 + 2
    ids = sample_input(SPEC, 5)
    assert ids.dtype == torch.int64 and ids.shape == (5, 16) and int(ids.max()) < 256
    assert model(ids).shape == (5, 16, 256)
    sizes = footprint(SPEC)   # on the meta device
    assert [shape for shape, _ in sizes] == [(16, 32), (16, 32), (16, 32), (16, 256)]
    assert sum(b for _, b in sizes) == sum(p.numel() * 4 for p in model.parameters())
    # causal: no position sees a later token
    a, b = ids.clone(), ids.clone()
    b[:, 10:] = (b[:, 10:] + 1) % 256
    assert torch.equal(model(a)[:, :10], model(b)[:, :10]) and not torch.equal(model(a)[:, 10:], model(b)[:, 10:])
    with pytest.raises(SpecError, match="multiple of heads"):
        build_model({**SPEC, "width": 30})


def test_text_is_cut_into_sequences_of_the_context_with_a_fixed_tail():
    whole = torch.tensor(list(TEXT.read_bytes()))
    shards = [load(f"text:{TEXT}", f"{k}/2") for k in range(2)]
    cut = len(whole) * 9 // 10
    assert torch.equal(torch.cat([s.tokens for s in shards]), whole[:cut])
    assert all(torch.equal(s.test_tokens, whole[cut:]) for s in shards)
    ds = shards[1].for_model(SPEC)
    n = (len(shards[1].tokens) - 1) // 16
    assert ds.x.shape == ds.y.shape == (n, 16)
    assert torch.equal(ds.x[3], shards[1].tokens[48:64]) and torch.equal(ds.y[3], shards[1].tokens[49:65])
    assert fits_model(ds, input_shape(SPEC), footprint(SPEC)[-1][0]) is None
    assert "labels of shape" in fits_model(ds, input_shape(SPEC), (10,))   # a classifier cannot train on it
    with pytest.raises(DataError, match="does not exist"):
        text("/nonexistent.txt")
    with pytest.raises(DataError, match="contiguous blocks"):
        load(f"text:{TEXT}", "0/2", how="iid")


@pytest.mark.parametrize("scheme,microbatches", [("nsplit", 1), ("fast", 4)])
def test_split_gpt_equals_plain_pytorch_in_one_process(scheme, microbatches):
    heads = [load(f"text:{TEXT}", f"{k}/3").for_model(SPEC) for k in range(3)]
    heads = [type(h)(h.name, h.x[:40], h.y[:40]) for h in heads]   # 40 sequences each: a short last batch
    cfg = JobConfig(model=SPEC, epochs=2, batch_size=12, microbatches=microbatches, optimizer="adam", lr=0.003,
                    scheme=scheme, seed=4)
    got = local.train(cfg, heads, even_split(num_layers(SPEC), 3))
    want = reference.train(cfg, heads).state_dict()
    assert max_diff(got, want) <= 1e-5


def test_loss_of_a_language_model_is_per_token():
    model = build_model(SPEC, seed=0)
    ds = load(f"text:{TEXT}").for_model(SPEC)
    # untrained, the next byte is about uniform over 256: held-out loss near ln 256 per token
    assert reference.held_out_loss(model, ds.x_test, ds.y_test) == pytest.approx(math.log(256), rel=0.05)


@pytest.mark.parametrize("scheme", ["nsplit", "fast"])
def test_a_ring_trains_gpt_on_text_exactly(start_ring, tmp_path, scheme):
    """SGD with momentum here: the agents' GEMMs run on tensors laid out differently in memory (received
    frames), which MKL may round differently in the last bit, and Adam divides the near-zero gradients of some
    weights by their own size, turning such bits into 1e-5-sized steps (in one process, Adam is exact above)."""
    ring = start_ring([["--data", f"text:{TEXT}", "--shard", f"{k}/3"] for k in range(3)])
    out = tmp_path / "model.pt"
    options = ",".join(f"{k}={v}" for k, v in SPEC.items() if k != "name")
    summary = summary_of(train_cli(ring.urls[0], "--model", "gpt", "--model-options", options, "--epochs", "1",
                                   "--batch-size", "16", "--microbatches", "2" if scheme == "fast" else "1",
                                   "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05", "--scheme", scheme,
                                   "--split", "even",
                                   "--out", str(out)))
    order = [ring.agents.index(a) for a in ring.ring_order()]
    heads = [load(f"text:{TEXT}", f"{k}/3").for_model(SPEC) for k in order]
    cfg = JobConfig(model=SPEC, epochs=1, batch_size=16, microbatches=2 if scheme == "fast" else 1, optimizer="sgd",
                    momentum=0.9, lr=0.05, scheme=scheme)
    want = reference.train(cfg, heads)
    assert max_diff(load_out(out), want.state_dict()) <= 1e-5
    # held-out loss and perplexity of the last head's tail (every peer holds the same tail)
    tail = heads[-1]
    assert summary["held_out_loss"] == pytest.approx(reference.held_out_loss(want, tail.x_test, tail.y_test), rel=1e-4)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["held_out_loss"]))
    assert summary["held_out_loss"] < math.log(256)   # it learned something of the bytes' statistics


BIG = {"name": "gpt", "blocks": 8, "width": 128, "heads": 4, "context": 16}   # parameters dominate at batch 4


def training_state(cfg: JobConfig) -> int:
    """What training the whole model in one place holds, as the planner counts it: parameters, gradients,
    optimizer state and a microbatch's activations kept for backward (measured per layer)."""
    from pipeline.planner.model import LayerCost, stage_memory
    from pipeline.profiling import measure

    prof = measure(cfg, repeats=0)
    layers = [LayerCost(0.0, 0.0, p, o, a, s) for p, o, a, s in zip(
        prof["param_bytes"], prof["optim_bytes"], prof["activation_bytes"], prof["saved_bytes"])]
    return stage_memory(layers, 0, len(layers), buffers=1)


def test_a_ring_trains_a_gpt_none_of_its_peers_could_hold_within_every_budget(start_ring, tmp_path):
    """Four agents, each with a budget 2.5 times smaller than the model's whole training state: the plan
    fits it across them (swaps included: a layer that does not fit beside the old ones waits on disk until
    the commit), every agent's measured peak stays within its budget, and the result equals plain PyTorch.
    One agent with the same budget is refused before training, the shortfall named."""
    cfg = JobConfig(model=BIG, epochs=1, batch_size=4, optimizer="sgd", momentum=0.9, lr=0.05)
    budget = int(training_state(cfg) / 2.5)
    options = ",".join(f"{k}={v}" for k, v in BIG.items() if k != "name")
    args = ("--model", "gpt", "--model-options", options, "--epochs", "1", "--batch-size", "4",
            "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05")
    alone = start_ring([["--data", f"text:{TEXT}", "--memory-budget", str(budget)]])
    refused = train_cli(alone.urls[0], *args)
    assert refused.returncode != 0 and "cannot hold the model" in refused.stderr, refused.stderr
    assert " short" in refused.stderr and "resume" not in refused.stderr   # the shortfall; nothing to resume
    ring = start_ring([["--data", f"text:{TEXT}", "--shard", f"{k}/4", "--memory-budget", str(budget)]
                       for k in range(4)])
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.urls[0], *args, "--out", str(out)))
    for agent in ring.agents:
        peaks = summary["stages"][agent.peer_id]
        assert 0 < peaks["peak_memory_bytes"] <= budget and 0 < peaks["peak_swap_bytes"] <= budget, (peaks, budget)
        assert peaks["peak_rss_bytes"] > peaks["peak_memory_bytes"]
    assert summary["bytes_moved"] > 0   # layers were swapped
    order = [ring.agents.index(a) for a in ring.ring_order()]
    heads = [load(f"text:{TEXT}", f"{k}/4").for_model(BIG) for k in order]
    assert max_diff(load_out(out), reference.one_thread(reference.train)(cfg, heads).state_dict()) <= 1e-5


def test_the_largest_model_offline_is_what_a_live_ring_accepts(start_ring):
    """`splitring plan --max-model` with 3 devices of 6 MiB says how many blocks fit; a live ring of 3 agents with
    those budgets plans that model and refuses one block more, naming the peer that runs out."""
    import subprocess
    import sys

    options = "width=64,heads=4,context=16"
    common = ("--batch-size", "4", "--optimizer", "sgd", "--momentum", "0.9")
    proc = subprocess.run([sys.executable, "-m", "peer", "plan", "--max-model", "gpt", "--model-options", options,
                           *common, "--devices", "a,b,c", "--memory-budget", "6MiB", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    blocks = got["largest"]
    assert got["option"] == "blocks" and blocks >= 2 and "short" in got["next_refused"]
    ring = start_ring([["--data", f"text:{TEXT}", "--shard", f"{k}/3", "--memory-budget", "6MiB"] for k in range(3)])

    def live(n: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "peer", "plan", "--peer", ring.urls[0], "--model", "gpt",
                               "--model-options", f"{options},blocks={n}", *common, "--json"],
                              capture_output=True, text=True, timeout=300)
    assert live(blocks).returncode == 0, live(blocks).stderr
    refused = live(blocks + 1)
    assert refused.returncode != 0 and "cannot hold the model" in refused.stderr, refused.stderr
    asked = subprocess.run([sys.executable, "-m", "peer", "plan", "--max-model", "gpt", "--model-options", options,
                            *common, "--peer", ring.urls[1], "--json"], capture_output=True, text=True, timeout=300)
    assert asked.returncode == 0 and json.loads(asked.stdout)["largest"] == blocks, asked.stderr   # the live ring's
