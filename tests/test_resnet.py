"""The `resnet` built-in (pipeline/resnet.py): its layers, N-split of it against plain PyTorch in one process
(BatchNorm's running statistics moving with their layers in swaps), and on a live ring."""
import pytest
import torch
from torch.nn import functional as F

from conftest import load_out, max_diff, save_npz, summary_of
from peer.localring import train_cli
from pipeline import data, local, models, reference
from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.execute import run_program
from pipeline.models import SpecError, build_layer, build_model, footprint, num_layers, parse_spec
from pipeline.resnet import resnet, resnet_input_shape
from pipeline.stage import Stage
from pipeline.swaps import even_split, moves_from, owners

if "resnet" not in models.BUILTIN:   # until pipeline/models.py registers it (agents need that registration)
    models.BUILTIN["resnet"] = resnet
    models.INPUT_SHAPES["resnet"] = resnet_input_shape

SPEC = {"name": "resnet", "depth": 18, "width": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """Compute on one thread, as agents do: several times faster on a busy 2-core machine (two OpenMP threads
    contend with the other processes), and the same arithmetic as the agents'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def images(n: int, seed: int) -> data.Dataset:
    """n 32x32 RGB images: one smooth pattern per class (the same for every seed) plus noise; labels 0..9."""
    patterns = F.interpolate(torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234)), size=32,
                             mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = patterns[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return data.Dataset(f"images{seed}", x.float().contiguous(), y)


# --- the model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,blocks", [(18, 8), (34, 16)])
def test_layers_shapes_and_footprint(depth, blocks):
    spec = {"name": "resnet", "depth": depth, "width": 8}
    model = build_model(spec, seed=3)
    assert len(model) == 1 + blocks + 1
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    sizes = footprint(spec)   # on the meta device
    assert [shape for shape, _ in sizes][:2] == [(8, 32, 32), (8, 32, 32)] and sizes[-1][0] == (10,)
    assert sizes[-2][0] == (64, 4, 4)   # stage 3: width * 8 channels at 4x4
    assert [b for _, b in sizes] == [sum(p.numel() * p.element_size() for p in layer.parameters())
                                     for layer in model]
    assert models.input_shape(spec) == (3, 32, 32)


def test_layer_i_depends_only_on_seed_and_i():
    model = build_model(SPEC, seed=7)
    for i in reversed(range(len(model))):   # built alone and out of order: the same weights and buffers
        assert max_diff(build_layer(SPEC, 7, i).state_dict(), model[i].state_dict()) == 0
    assert max_diff(build_model(SPEC, seed=8).state_dict(), model.state_dict()) > 0


def test_options():
    assert parse_spec("resnet", "depth=34,width=8") == {"name": "resnet", "depth": 34, "width": 8}
    assert num_layers(parse_spec("resnet", "depth=34,width=8")) == 18
    as_depth = build_model(SPEC, 1).state_dict()
    for blocks in ("2,2,2,2", [2, 2, 2, 2]):   # the same model, said as its layout
        assert max_diff(build_model({"name": "resnet", "blocks": blocks, "width": 8}, 1).state_dict(), as_depth) == 0
    assert num_layers({"name": "resnet", "blocks": "3,4,6,3"}) == 18
    grey = build_model({"name": "resnet", "width": 4, "classes": 3, "in_channels": 1})
    assert grey(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert models.input_shape({"name": "resnet", "in_channels": 1}) == (1, 32, 32)
    # a block that changes stride or width has a projection shortcut (1x1 conv + BatchNorm); the others none
    model = build_model(SPEC)
    projected = [i for i, layer in enumerate(model[1:-1], 1) if len(layer.shortcut)]
    assert projected == [3, 5, 7]
    with pytest.raises(SpecError, match=r"depth must be one of \[18, 34\]"):
        num_layers({"name": "resnet", "depth": 50})
    with pytest.raises(SpecError, match="4 positive integers"):
        num_layers({"name": "resnet", "blocks": "2,2,2"})
    with pytest.raises(SpecError, match="not both"):
        num_layers({"name": "resnet", "depth": 18, "blocks": "2,2,2,2"})
    with pytest.raises(SpecError, match=">= 1"):
        num_layers({"name": "resnet", "width": 0})


# --- N-split in one process -----------------------------------------------------------------------------
def bn_buffers(state: dict) -> list[str]:
    return [k for k in state if k.rsplit(".", 1)[-1] in BN_BUFFERS]


def train_with_swaps(cfg: JobConfig, shards: list[data.Dataset],
                     plans: list[list[tuple[int, int]]]) -> tuple[dict, int]:
    """N-split as a ring of len(shards) peers runs it: pass p (rotation p mod n) has head peer p mod n and
    chain position j owns layers plans[p % len(plans)][j]; before each pass the layers whose owner changes
    move as a swap moves them (Stage.export, then install on the new owner, then removed from the old).
    Returns the final state dict (as build_model's) and the number of layers moved."""
    n = len(shards)
    peers: list[Stage] = []
    held: dict[int, int] = {}
    moved = 0
    for epoch in range(cfg.epochs):
        for r in range(n):
            chain = [(r + j) % n for j in range(n)]
            ranges = plans[(epoch * n + r) % len(plans)]
            assignment = {chain[j]: ranges[j] for j in range(n)}
            if not peers:
                peers = [Stage.build(cfg, *assignment[k]) for k in range(n)]
            else:
                for i, src, dst in moves_from(held, assignment):
                    peers[dst].install(peers[src].export([i]))
                    peers[src].remove(i)
                    moved += 1
            held = owners(assignment)
            assert all(peers[k].range == assignment[k] and peers[k].contiguous() for k in range(n))
            head = shards[r]
            order = data.pass_order(len(head), cfg.seed, epoch, cfg.shuffle)
            sizes = data.batch_sizes(len(head), cfg.batch_size)
            starts = [sum(sizes[:s]) for s in range(len(sizes))]
            inputs = (local.make_step_input(head, order[a:a + b], cfg.microbatches) for a, b in zip(starts, sizes))
            mbs = [len(data.microbatch_sizes(b, cfg.microbatches)) for b in sizes]
            local.drive([run_program(peers[chain[j]], S.pass_program(cfg.scheme, cfg.pipeline, j, n, mbs,
                                                                     cfg.max_staleness), j, n, sizes,
                                     inputs if j == 0 else None) for j in range(n)])
    state = {}
    for st in peers:
        for i, m in st.layers.items():
            state.update({f"{i}.{k}": v for k, v in m.state_dict().items()})
    return state, moved


@pytest.mark.parametrize("cfg", [
    JobConfig(model=SPEC, epochs=2, batch_size=8, momentum=0.9, seed=4),
    JobConfig(model=SPEC, epochs=2, batch_size=8, optimizer="adam", lr=0.003, weight_decay=0.001, seed=4),
], ids=["sgd-momentum", "adam"])
def test_local_nsplit_with_swaps_equals_plain_pytorch(cfg):
    shards = [images(20, 1), images(12, 2), images(18, 3)]   # unequal: short last batches of 4, 4 and 2
    want = reference.train(cfg, shards).state_dict()
    plans = [even_split(10, 3), [(0, 2), (2, 8), (8, 10)], [(0, 5), (5, 6), (6, 10)]]
    got, moved = train_with_swaps(cfg, shards, plans)
    assert moved > 0
    buffers = bn_buffers(want)
    assert len(buffers) == 3 * (1 + 2 * 8 + 3) and got.keys() == want.keys()   # stem, 2 per block, 3 shortcuts
    assert all(got[k].dtype == want[k].dtype for k in want)
    assert max_diff(got, want) <= 1e-5   # parameters and BatchNorm buffers
    # the running statistics did move away from their initial values, identically
    steps = cfg.epochs * sum(data.num_steps(len(s), cfg.batch_size) for s in shards)
    assert all(int(want[k]) == steps for k in buffers if k.endswith("num_batches_tracked"))
    initial = build_model(SPEC, cfg.seed).state_dict()
    assert min((want[k] - initial[k]).abs().max().item() for k in buffers if "running" in k) > 0
    # the same with local.train (every chain position keeps its layers)
    assert max_diff(local.train(cfg, shards, even_split(10, 3)), want) <= 1e-5


def test_stage_evaluate_uses_running_statistics_and_leaves_them_alone():
    """Evaluation runs BatchNorm in eval mode (running statistics, not the batch's), changes no buffer,
    and training afterwards goes on in train mode (needs the Stage.evaluate fix in pipeline/stage.py)."""
    cfg = JobConfig(model=SPEC, batch_size=8)
    ds = images(8, 5)
    stage, model = Stage.build(cfg, 0, 10), build_model(SPEC, cfg.seed)
    for key in range(2):   # some training first, so the running statistics are not the initial ones
        stage.forward_loss(key, ds.x, ds.y, 8, needs_input_grad=False)
        stage.backward(key, None)
        stage.step()
    model.load_state_dict({f"{i}.{k}": v for i, m in stage.layers.items() for k, v in m.state_dict().items()})
    before = {i: {k: v.clone() for k, v in m.state_dict().items()} for i, m in stage.layers.items()}
    test = images(6, 6)
    model.eval()
    with torch.no_grad():
        want = model(test.x)
    assert (stage.evaluate(test.x) - want).abs().max().item() <= 1e-5
    assert all(max_diff(stage.layers[i].state_dict(), before[i]) == 0 for i in stage.layers)
    assert all(m.training for layer in stage.layers.values() for m in layer.modules())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    F.cross_entropy(model(ds.x), ds.y).backward()
    opt.step()
    stage.forward_loss(2, ds.x, ds.y, 8, needs_input_grad=False)
    stage.backward(2, None)
    stage.step()
    got = {f"{i}.{k}": v for i, m in stage.layers.items() for k, v in m.state_dict().items()}
    assert max_diff(got, model.state_dict()) <= 1e-5


# --- a live ring ----------------------------------------------------------------------------------------
def test_live_ring_trains_resnet_exactly(start_ring, tmp_path):
    """Three agents, each with its own .npz of images; `--model resnet` equals plain PyTorch over the same
    samples in the same order, BatchNorm buffers included (needs resnet registered in pipeline/models.py and
    allowed by peer/limits.py, and the Stage.evaluate fix: the ring evaluates after each epoch)."""
    sets = []
    for k in range(3):
        train, test = images(48, 10 + k), images(32, 20 + k)
        sets.append(data.Dataset(f"p{k}", train.x, train.y, test.x, test.y))
    paths = [save_npz(tmp_path / f"p{k}.npz", s.x, s.y, x_test=s.x_test, y_test=s.y_test) for k, s in enumerate(sets)]
    ring = start_ring([["--data", p] for p in paths])
    out = tmp_path / "model.pt"
    summary = summary_of(train_cli(ring.urls[0], "--model", "resnet", "--model-options", "depth=18,width=8",
                                   "--epochs", "2", "--batch-size", "16", "--momentum", "0.9", "--split", "even",
                                   "--out", str(out)))
    order = [ring.agents.index(a) for a in ring.ring_order()]
    assert summary["ring"] == [ring.agents[k].peer_id for k in order]
    cfg = JobConfig(model=SPEC, epochs=2, batch_size=16, momentum=0.9)
    # on one thread, as agents compute (--threads 1; the one_thread fixture, said again here because it matters):
    # with BatchNorm, a conv's last-bit differences between thread counts grow to visible ones within a few steps
    model = reference.one_thread(reference.train)(cfg, [sets[k] for k in order])
    want, got = model.state_dict(), load_out(out)
    assert len(bn_buffers(got)) == 3 * 20 and got.keys() == want.keys()
    assert max_diff(got, want) <= 1e-5   # parameters and BatchNorm buffers
    # the held-out accuracy is the last pass's head's, on the final model in eval mode
    model.eval()
    last = sets[order[-1]]
    assert abs(reference.accuracy(model, last.x_test, last.y_test) - summary["accuracy"]) < 1e-6
