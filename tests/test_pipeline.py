"""The pure core: models, data, stages, schedules, swaps, and single-process N-split against PyTorch."""
import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline import data, direct, local, reference
from pipeline import schedule as S
from pipeline.config import ConfigError, JobConfig
from pipeline.execute import StepInput, run_program
from pipeline.models import SpecError, build_layer, build_model, num_layers, parse_spec, spec_hash
from pipeline.stage import Stage, checksum
from pipeline.swaps import even_split, owners, swap_moves
from pipeline.wgrad import Deferred, pad_rows


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("spec", [{"name": "mlp"}, {"name": "mlp", "depth": 4, "width": 32}, {"name": "cnn"}])
def test_layer_i_depends_only_on_spec_seed_and_i(spec):
    model = build_model(spec, seed=7)
    for i in reversed(range(num_layers(spec))):  # built alone and out of order: same weights
        alone = build_layer(spec, 7, i)
        assert max_diff(alone.state_dict(), model[i].state_dict()) == 0
    other = build_model(spec, seed=8)
    assert max_diff(model.state_dict(), other.state_dict()) > 0
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_spec_hash_and_errors():
    assert spec_hash({"name": "mlp"}) == spec_hash({"name": "mlp"})
    assert spec_hash({"name": "mlp"}) != spec_hash({"name": "mlp", "width": 64})
    assert parse_spec("mlp", "depth=4,width=256") == {"name": "mlp", "depth": 4, "width": 256}
    with pytest.raises(SpecError, match="unknown model"):
        spec_hash({"name": "resnet9000"})
    with pytest.raises(SpecError, match="not importable"):
        spec_hash({"name": "no_such_module:f"})
    with pytest.raises(SpecError, match="bad options"):
        num_layers({"name": "mlp", "colour": "red"})


def test_digits_split_is_fixed_and_shards_are_disjoint():
    full = data.load("digits")
    assert (len(full), full.n_test) == (1437, 360)
    shards = [data.load("digits", f"{k}/3") for k in range(3)]
    assert sum(len(s) for s in shards) == 1437
    assert torch.equal(torch.cat([s.x for s in shards]), full.x)
    assert torch.equal(data.load("digits").y, full.y)  # deterministic


def test_digits_are_what_scikit_learn_loads():
    from sklearn.datasets import load_digits

    table, d = data.digits_table(), load_digits()
    assert np.array_equal(table[:, :-1], d.data) and np.array_equal(table[:, -1].astype(np.int64), d.target)


def test_npz_loading_and_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((5, 64), np.float32), y=np.arange(5), x_test=np.ones((2, 64), np.float32),
             y_test=np.arange(2))
    ds = data.load(str(good))
    assert len(ds) == 5 and ds.n_test == 2 and ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(data.DataError, match="not a readable"):
        data.load(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(data.DataError, match="lacks"):
        data.load(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "floaty.npz", x=np.ones((3, 2), np.float32), y=np.ones(3, np.float32))
    with pytest.raises(data.DataError, match="integer"):
        data.load(str(tmp_path / "floaty.npz"))
    np.savez(tmp_path / "len.npz", x=np.ones((3, 2), np.float32), y=np.arange(4))
    with pytest.raises(data.DataError, match="must be"):
        data.load(str(tmp_path / "len.npz"))
    with pytest.raises(data.DataError):
        data.parse_shard("3/3")


def test_batches_and_microbatches():
    assert data.batch_sizes(70, 32) == [32, 32, 6]
    assert data.batch_sizes(0, 32) == []
    assert data.microbatch_sizes(7, 3) == [3, 2, 2]
    assert data.microbatch_sizes(2, 4) == [1, 1]
    assert torch.equal(data.pass_order(5, 0, 0, shuffle=False), torch.arange(5))
    assert not torch.equal(data.pass_order(50, 0, 0, True), data.pass_order(50, 0, 1, True))


@given(st.integers(0, 600), st.integers(1, 40))
def test_microbatch_sizes_cut_as_tensor_split(batch, microbatches):
    """The head cuts a batch with torch.tensor_split; every stage must expect the same sizes."""
    parts = torch.arange(batch).tensor_split(min(microbatches, batch)) if batch else ()
    assert data.microbatch_sizes(batch, microbatches) == [len(p) for p in parts]


@pytest.mark.parametrize("cfg", [
    JobConfig(epochs=2, momentum=0.9, microbatches=2, shuffle=False),
    JobConfig(epochs=1, optimizer="adam", lr=0.01, weight_decay=0.01, microbatches=3, batch_size=20),
    JobConfig(epochs=1, model={"name": "cnn"}, batch_size=16, momentum=0.5),
], ids=["sgd-momentum", "adam", "cnn"])
def test_local_nsplit_equals_plain_pytorch(cfg):
    shards = [data.load("digits", f"{k}/3") for k in range(3)]
    shards[1] = data.Dataset("cut", shards[1].x[:50], shards[1].y[:50])  # unequal shards, short last batch
    n_layers = num_layers(cfg.model)
    got = local.train(cfg, shards, even_split(n_layers, 3))
    want = reference.train(cfg, shards).state_dict()
    assert max_diff(got, want) <= 1e-5


def test_stage_export_install_round_trip_with_checksum():
    cfg = JobConfig(optimizer="adam", lr=0.01)
    a = Stage.build(cfg, 0, 3)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    a.forward_loss(0, x, y, 8, needs_input_grad=False)
    a.backward(0, None)
    a.step()
    exported = a.export([1, 2])
    b = Stage(cfg, {})
    b.install(exported)
    assert checksum(b.export()) == checksum(exported)
    exported[1]["params"]["0.weight"][0, 0] += 1  # a copy: the source stage is untouched
    assert checksum(a.export([1, 2])) == checksum(b.export())
    assert checksum(a.export([1, 2])) != checksum(exported)
    # the moved layers keep training identically (optimizer state moved with them)
    h = torch.randn(8, 128)
    for stage in (a, b):
        stage.layers = {i: m for i, m in stage.layers.items() if i in (1, 2)}
        stage.optimizers = {i: o for i, o in stage.optimizers.items() if i in (1, 2)}
        stage.forward_loss(1, h, y, 8, needs_input_grad=True)
        stage.backward(1, None)
        stage.step()
    assert checksum(a.export()) == checksum(b.export())


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 7))
def test_even_split_and_swap_moves(n_layers, n, r):
    ranges = even_split(n_layers, n)
    assert ranges[0][0] == 0 and ranges[-1][1] == n_layers
    assert all(a <= b for a, b in ranges) and all(x[1] == y[0] for x, y in zip(ranges, ranges[1:]))
    assert ranges[0][1] > ranges[0][0]  # the head always computes layer 0
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    ring = [f"p{i}" for i in range(n)]
    old = dict(zip(S.chain_order(ring, r), ranges))
    new = dict(zip(S.chain_order(ring, r + 1), ranges))
    moves = swap_moves(old, new)
    after = owners(old)
    for layer, src, dst in moves:
        assert after[layer] == src
        after[layer] = dst
    assert after == owners(new)
    assert all(src != dst for _, src, dst in moves)


def test_chain_order_rotates():
    assert S.chain_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert S.chain_order(["a", "b", "c"], 4) == ["b", "c", "a"]


def test_nsplit_schedule_is_one_microbatch_at_a_time():
    progs = [S.nsplit(j, 3, 2) for j in range(3)]
    assert [str(a) for a in progs[0]] == ["F0", "SEND_F0", "RECV_B0", "B0", "F1", "SEND_F1", "RECV_B1", "B1", "STEP"]
    assert [str(a) for a in progs[2]] == ["RECV_F0", "F0", "B0", "SEND_B0", "RECV_F1", "F1", "B1", "SEND_B1", "STEP"]
    assert "stage 1:" in S.render(progs)


def test_config_validation():
    with pytest.raises(ConfigError, match="optimizer"):
        JobConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="unknown job config"):
        JobConfig.from_dict({"epochs": 1, "warp": 9})
    with pytest.raises(ConfigError, match="unknown scheme 'async' \\(nsplit, fast, fast-async, sl, splitfed-v1"):
        JobConfig(scheme="async")
    with pytest.raises(ConfigError, match="max_staleness must be >= 0"):
        JobConfig(scheme="fast-async", max_staleness=-1)
    with pytest.raises(ConfigError, match="unknown pipeline schedule 'zb' \\(1f1b, gpipe, eager\\)"):
        JobConfig(scheme="fast", pipeline="zb")
    with pytest.raises(ConfigError, match="gpipe and eager are for scheme fast"):
        JobConfig(scheme="fast-async", pipeline="eager")
    assert JobConfig.from_dict(JobConfig(epochs=3).to_dict()).epochs == 3


@pytest.mark.parametrize("transposed", [False, True])
def test_deferred_linear_equals_nn_linear_and_keeps_the_input_layout(transposed):
    """The deferred Linear's gradients are nn.Linear's; its input gradient has its input's layout (a transposed
    view stays one), so the elementwise op before it runs its backward over matching memory."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    deferred = copy.deepcopy(plain)
    wrappers = [Deferred(m) for m in deferred]
    x = torch.randn(24, 5).t() if transposed else torch.randn(5, 24)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]   # clone keeps the layout
    layouts = []
    for _ in range(2):   # two microbatches accumulate
        g = torch.randn(5, 8)
        plain(xs[0]).backward(g)
        h = deferred[1](deferred[0](xs[1]))
        h.register_hook(lambda grad, h=h: layouts.append((grad.stride(), h.stride())))
        deferred[2](h).backward(g)
    for w in wrappers:
        w.flush()
    assert len(layouts) == 2 and all(got == want for got, want in layouts)
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-6)
    for p, q in zip(plain.parameters(), deferred.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_deferred_weight_gradients_carry_no_graph():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    wrappers = [Deferred(m) for m in layer]
    layer(torch.randn(3, 8, requires_grad=True)).sum().backward()
    for w in wrappers:
        w.flush()
    assert all(p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("case", ["input_without_grad", "three_d", "no_bias", "frozen_bias"])
def test_deferred_linear_edge_cases_equal_plain_pytorch(case):
    """An input that needs no gradient with an in-place op after the Linear, 3-D inputs, no bias, a frozen
    bias: the deferred Linear gives plain PyTorch's gradients (and trains nothing frozen)."""
    torch.manual_seed(1)
    plain = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=case != "no_bias"), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(5, 3))
    if case == "frozen_bias":
        plain[0].bias.requires_grad_(False)
    deferred = copy.deepcopy(plain)
    wrappers = [Deferred(m) for m in deferred]
    x = torch.randn(2, 4, 6) if case == "three_d" else torch.randn(4, 6)
    for model in (plain, deferred):
        model(x.clone().requires_grad_(case != "input_without_grad")).sum().backward()
    for w in wrappers:
        w.flush()
    for p, q in zip(plain.parameters(), deferred.parameters()):
        assert (p.grad is None) == (q.grad is None) == (not p.requires_grad)
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-6)


def test_deferred_sums_a_whole_step_at_once_when_told():
    """A stage with nothing to do ahead sums a step's weight gradients in one group at the flush: nothing is
    summed early, and the gradients are the grouped ones (to float tolerance)."""
    torch.manual_seed(2)
    layers = [torch.nn.Linear(16, 8) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    wrappers = [Deferred(m) for m in layers]
    wrappers[1].whole_step = True
    for _ in range(8):   # 8 microbatches of 32 rows: groups of GROUP_ROWS = 128 rows, or one of 256
        x, g = torch.randn(32, 16, requires_grad=True), torch.randn(32, 8)
        for m in layers:
            m(x).backward(g)
    assert wrappers[0].work_ahead() and not wrappers[1].work_ahead()
    assert len(wrappers[1].pending[layers[1]]) == 8
    for w in wrappers:
        w.flush()
    for p, q in zip(layers[0].parameters(), layers[1].parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_only_a_stage_without_slack_sums_by_step():
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 16}, scheme="fast", microbatches=2)
    for j in range(2):
        stage = Stage.build(cfg, *even_split(3, 2)[j])
        program = S.pass_program("fast", "eager", j, 2, [2])
        feed = iter([StepInput([(torch.randn(2, 64), torch.zeros(2, dtype=torch.long))] * 2)])
        next(run_program(stage, program, j, 2, [4], feed))   # the first request: set up for the pass
        assert all(d.whole_step == (j == 1) for d in stage.deferred.values())


def _stage_layers(case: str) -> dict:
    torch.manual_seed(3)
    L, R, Seq = torch.nn.Linear, torch.nn.ReLU, torch.nn.Sequential
    if case == "mlp":
        return {0: Seq(L(6, 8), R()), 1: Seq(L(8, 8), R()), 2: L(8, 3)}
    return {0: Seq(R(), L(6, 8, bias=False), R(inplace=True)), 1: Seq(Seq(L(8, 3)))}   # ReLU first, no bias, nested


@pytest.mark.parametrize("case", ["mlp", "relu_first_no_bias"])
@pytest.mark.parametrize("position", ["head", "middle", "tail"])
def test_direct_stage_equals_the_autograd_stage(case, position):
    """pipeline.direct runs Linear/ReLU stages without autograd: same outputs, input gradients, losses and
    trained weights as the autograd path, over two steps of two microbatches (momentum: state carries)."""
    cfg = JobConfig(scheme="fast", microbatches=2, momentum=0.9, lr=0.1)
    layers = _stage_layers(case)
    stages = [Stage(cfg, copy.deepcopy(layers)) for _ in range(2)]
    stages[1].autograd_only = True
    torch.manual_seed(4)
    x, labels, grads = torch.randn(2, 4, 6), torch.randint(0, 3, (2, 4)), torch.randn(2, 4, 3)
    runs, given = [], x.clone()
    for stage in stages:
        got = []
        for s in range(2):
            for m in range(2):
                part = slice(2 * m, 2 * m + 2)
                if position == "tail":
                    got.append(torch.tensor(stage.forward_loss((s, m), x[s, part], labels[s, part], 4, True)))
                else:
                    got.append(stage.forward((s, m), x[s, part], needs_input_grad=position != "head"))
            assert (stage.buffers[s, 0][4] is None) == stage.autograd_only   # which path ran
            assert torch.equal(x, given)   # the input is left alone
            for m in range(2):
                got.append(stage.backward((s, m), None if position == "tail" else grads[s, 2 * m:2 * m + 2]))
            stage.step()
        runs.append(got + [p.detach().clone() for m in stage.layers.values() for p in m.parameters()])
    for a, b in zip(*runs):
        assert (a is None) == (b is None)
        assert a is None or torch.allclose(a, b, atol=1e-6)
    assert sum(a is None for a in runs[0]) == (4 if position == "head" else 0)   # no input gradient at the head


def test_direct_takes_only_trainable_linear_and_relu_layers():
    def ops(layers):
        pending = {m: [] for layer in layers.values() for m in layer.modules() if type(m) is torch.nn.Linear}
        return direct.ops_of(layers, pending)
    L, R, Seq = torch.nn.Linear, torch.nn.ReLU, torch.nn.Sequential
    assert len(ops(_stage_layers("mlp"))) == 5 and len(ops(_stage_layers("relu_first_no_bias"))) == 4
    frozen = Seq(L(4, 4), R())
    frozen[0].bias.requires_grad_(False)
    for other in (Seq(L(4, 4), torch.nn.GELU()), Seq(torch.nn.Conv1d(1, 1, 1)), torch.nn.Flatten(), frozen):
        assert ops({0: Seq(L(4, 4), R()), 1: other}) is None


def test_direct_stage_memory_counts_what_microbatches_in_flight_keep():
    """Per microbatch in flight: its input and what the tape keeps (each Linear's input, each ReLU's output),
    each tensor once, however many views of it are held."""
    cfg = JobConfig(scheme="fast", microbatches=2)
    stage = Stage(cfg, _stage_layers("mlp"))   # Linear(6,8) ReLU Linear(8,8) ReLU Linear(8,3)
    idle = stage.memory_bytes()
    stage.forward((0, 0), torch.randn(4, 6), needs_input_grad=True)
    assert stage.buffers[0, 0][4] is not None
    # input 4x6; ReLU outputs 4x8 twice (also the next Linears' inputs); the output 4x3, not kept by the tape
    assert stage.memory_bytes() - idle == 4 * 4 * (6 + 8 + 8 + 3)
    stage.forward((0, 1), torch.randn(4, 6), needs_input_grad=True)
    assert stage.memory_bytes() - idle == 2 * 4 * 4 * (6 + 8 + 8 + 3)


def test_weights_with_rows_a_multiple_of_2_kib_are_padded_and_train_as_plain_pytorch(monkeypatch):
    """pad_rows moves a weight whose rows are 2 KiB (or a multiple) apart into a wider buffer: same values,
    stride not a multiple of 2 KiB; exports are contiguous; training is plain PyTorch's (autograd and direct)."""
    wide, narrow = torch.nn.Linear(512, 4), torch.nn.Linear(500, 4)
    before = wide.weight.detach().clone()
    pad_rows(wide)
    pad_rows(narrow)
    assert wide.weight.stride() == (528, 1) and torch.equal(wide.weight, before) and wide.weight.requires_grad
    assert narrow.weight.stride() == (500, 1)
    spec = {"name": "mlp", "in_features": 64, "depth": 2, "width": 512}
    cfg = JobConfig(model=spec, epochs=1, momentum=0.9, microbatches=2, batch_size=16, scheme="fast")
    stage = Stage.build(cfg, 1, 3)
    assert stage.layers[1][0].weight.stride() == (528, 1)   # 512 inputs: padded (a deferred Linear)
    assert Stage.build(JobConfig(**{**cfg.to_dict(), "scheme": "nsplit"}), 1, 3).layers[1][0].weight.is_contiguous()
    assert all(t.is_contiguous() for entry in stage.export().values() for t in entry["params"].values())
    shards = [data.Dataset("cut", s.x[:48], s.y[:48]) for s in (data.load("digits", f"{k}/2") for k in range(2))]
    want = reference.train(cfg, shards).state_dict()
    for path in ("direct", "autograd"):
        if path == "autograd":
            monkeypatch.setattr(direct, "ops_of", lambda *args: None)
        assert max_diff(local.train(cfg, shards, even_split(num_layers(spec), 2)), want) <= 1e-5
