"""Pipelined schedules (Fast N-split) as data: well-formed, deadlock-free, exact."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline import data, local, reference
from pipeline import schedule as S
from pipeline.config import ConfigError, JobConfig
from pipeline.models import num_layers
from pipeline.stage import Stage
from pipeline.swaps import even_split


def check_program(prog, stage, n_stages, n_mb):
    """Each microbatch: F before B, RECV before use, SEND after compute; one STEP at the end."""
    seen = []
    for a in prog:
        if a.kind == S.SEND_F:
            assert (S.F, a.mb) in seen
        if a.kind == S.F and stage > 0:
            assert (S.RECV_F, a.mb) in seen
        if a.kind == S.B:
            assert (S.F, a.mb) in seen
            if stage < n_stages - 1:
                assert (S.RECV_B, a.mb) in seen
        if a.kind == S.SEND_B:
            assert (S.B, a.mb) in seen
        seen.append((a.kind, a.mb))
    assert prog[-1].kind == S.STEP and [a.kind for a in prog].count(S.STEP) == 1
    for m in range(n_mb):
        assert seen.count((S.F, m)) == 1 and seen.count((S.B, m)) == 1


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["nsplit", "1f1b", "gpipe", "eager"]), st.integers(1, 6), st.integers(1, 12))
def test_programs_are_well_formed_and_buffers_bounded(kind, n_stages, n_mb):
    scheme, pipe = ("nsplit", "1f1b") if kind == "nsplit" else ("fast", kind)
    for j in range(n_stages):
        prog = S.program(scheme, pipe, j, n_stages, n_mb)
        check_program(prog, j, n_stages, n_mb)
        bound = {"nsplit": 1, "1f1b": min(n_stages - j, n_mb), "gpipe": n_mb,
                 "eager": n_mb if j < n_stages - 1 else 1}[kind]
        assert S.in_flight(prog) == bound
    S.timeline([S.program(scheme, pipe, j, n_stages, n_mb) for j in range(n_stages)])   # raises on a deadlock


def test_1f1b_timeline_for_three_stages():
    assert S.render([S.one_f_one_b(j, 3, 3) for j in range(3)]).splitlines() == [
        "stage 0: F0 SEND_F0 F1 SEND_F1 F2 SEND_F2 RECV_B0 B0 RECV_B1 B1 RECV_B2 B2 STEP",
        "stage 1: RECV_F0 F0 SEND_F0 RECV_F1 F1 SEND_F1 RECV_B0 B0 SEND_B0 RECV_F2 F2 SEND_F2 RECV_B1 B1 SEND_B1 "
        "RECV_B2 B2 SEND_B2 STEP",
        "stage 2: RECV_F0 F0 B0 SEND_B0 RECV_F1 F1 B1 SEND_B1 RECV_F2 F2 B2 SEND_B2 STEP",
    ]


@pytest.mark.parametrize("pipe", ["1f1b", "gpipe", "eager"])
@pytest.mark.parametrize("n_peers", [2, 3])
def test_pipelined_training_equals_sequential_nsplit_and_pytorch(pipe, n_peers):
    shards = [data.load("digits", f"{k}/{n_peers}") for k in range(n_peers)]
    shards[0] = data.Dataset("cut", shards[0].x[:100], shards[0].y[:100])
    spec = {"name": "mlp", "depth": 4, "width": 64}
    ranges = even_split(num_layers(spec), n_peers)
    fast = JobConfig(model=spec, epochs=1, momentum=0.9, microbatches=5, batch_size=40, scheme="fast", pipeline=pipe)
    seq = JobConfig(**{**fast.to_dict(), "scheme": "nsplit"})
    got = local.train(fast, shards, ranges)
    for want in (local.train(seq, shards, ranges), reference.train(seq, shards).state_dict()):
        assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5


def test_timeline_shows_pipelining_and_the_cli_draws_it(tmp_path):
    import subprocess
    import sys
    seq = S.timeline([S.nsplit(j, 3, 4) for j in range(3)])
    fast = S.timeline([S.one_f_one_b(j, 3, 4) for j in range(3)])
    assert max(s[3] for s in seq) == 36 and max(s[3] for s in fast) == 18
    image = tmp_path / "t.png"
    proc = subprocess.run([sys.executable, "-m", "peer", "plan", "--show-schedule", "--scheme", "fast",
                           "--pipeline", "gpipe", "--microbatches", "4", "--stages", "2", "--schedule-image",
                           str(image)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stage 1:  . F0 F1 F2 F3 B0 B0" in proc.stdout
    assert image.read_bytes()[:4] == b"\x89PNG"


def test_timeline_detects_a_deadlock():
    bad = [[S.Action(S.RECV_B, 0), S.Action(S.F, 0), S.Action(S.SEND_F, 0)],
           [S.Action(S.RECV_F, 0), S.Action(S.F, 0), S.Action(S.B, 0), S.Action(S.SEND_B, 0)]]
    with pytest.raises(RuntimeError, match="deadlock"):
        S.timeline(bad)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1, max_size=6), st.integers(0, 3))
def test_async_programs_run_1f1b_across_steps_with_bounded_staleness(n_stages, mbs, k):
    progs = [S.pass_program("fast-async", "1f1b", j, n_stages, mbs, k) for j in range(n_stages)]
    S.timeline(progs)   # raises if the programs deadlock
    for j, prog in enumerate(progs):
        assert [a.step for a in prog if a.kind == S.STEP] == list(range(len(mbs)))
        for s, n in enumerate(mbs):
            assert sorted(a.mb for a in prog if a.kind == S.F and a.step == s) == list(range(n))
            assert sorted(a.mb for a in prog if a.kind == S.B and a.step == s) == list(range(n))
        natural = math.ceil((n_stages - 1 - j) / min(mbs))   # warm-up forwards over the fewest microbatches
        assert max(S.staleness(prog).values()) <= min(k, natural)
        assert S.in_flight(prog) <= n_stages - j
    if k == 0:   # no staleness allowed: exactly synchronous 1F1B, a flush per step
        assert progs == [S.pass_program("fast", "1f1b", j, n_stages, mbs) for j in range(n_stages)]


def test_async_pipelining_drops_the_flush_when_the_bound_allows():
    def makespan(scheme, n_stages, mbs, k=0):
        return max(s[3] for s in S.timeline([S.pass_program(scheme, "1f1b", j, n_stages, mbs, k)
                                              for j in range(n_stages)]))
    # 3 stages, 6 steps of 4 microbatches: warm-ups lag one step at most, so K = 1 needs no flush
    assert (makespan("fast", 3, [4] * 6), makespan("fast-async", 3, [4] * 6, 1)) == (108, 78)
    assert makespan("fast-async", 3, [4] * 6, 5) == 78
    # 4 stages, 1 microbatch per step: the head lags 3 steps; K = 1 flushes every 2 steps
    sync, k1, k3 = makespan("fast", 4, [1] * 6), makespan("fast-async", 4, [1] * 6, 1), makespan("fast-async", 4, [1] * 6, 3)
    assert sync > k1 > k3
    assert max(S.staleness(S.pass_program("fast-async", "1f1b", 0, 4, [1] * 6, 1)).values()) == 1
    assert max(S.staleness(S.pass_program("fast-async", "1f1b", 0, 4, [1] * 6, 3)).values()) == 3


def test_pass_programs_render_step_and_microbatch():
    text = S.render([S.pass_program("fast-async", "1f1b", j, 2, [2, 2], 1) for j in range(2)])
    assert text.splitlines()[0].startswith("stage 0: F0.0 SEND_F0.0 F0.1 SEND_F0.1 RECV_B0.0 B0.0 F1.0 SEND_F1.0")
    assert "STEP0" in text and "STEP1" in text
    with pytest.raises(ValueError, match="pass_program"):
        S.program("fast-async", "1f1b", 0, 2, 2)


def test_stage_memory_counts_the_weight_copies_of_stale_forwards():
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 32}, scheme="fast-async", microbatches=2)
    stage = Stage.build(cfg, 0, 3)
    params = sum(p.numel() * 4 for m in stage.layers.values() for p in m.parameters())
    x = torch.zeros(4, 64)
    stage.forward((0, 0), x, needs_input_grad=False)
    base = stage.memory_bytes()
    stage.forward((1, 0), x, needs_input_grad=False, stale=True)    # its backward will come after a step
    with_copy = stage.memory_bytes()
    stage.backward((0, 0), torch.ones(4, 10))
    stage.step()
    assert stage.lag((1, 0)) == 1
    after_step = stage.memory_bytes()                               # the copy outlives the step ...
    stage.backward((1, 0), torch.ones(4, 10))
    stage.step()
    assert with_copy - base >= params and after_step - stage.memory_bytes() >= params   # ... not its microbatch


def test_stage_memory_follows_optimizer_state_and_owned_layers():
    cfg = JobConfig(model={"name": "mlp", "depth": 2, "width": 32}, scheme="fast", microbatches=1, momentum=0.9)
    stage = Stage.build(cfg, 0, 3)
    size = {i: sum(p.numel() * 4 for p in m.parameters()) for i, m in stage.layers.items()}
    assert stage.memory_bytes() == 2 * sum(size.values())                 # parameters and gradients
    stage.forward_loss((0, 0), torch.zeros(4, 64), torch.zeros(4, dtype=torch.long), 4, needs_input_grad=False)
    stage.backward((0, 0), None)
    stage.step()
    assert stage.memory_bytes() == 3 * sum(size.values())                 # + momentum, from the first step
    stage.drop_optimizer_state()
    assert stage.memory_bytes() == 2 * sum(size.values())
    stage.remove(2)
    assert stage.memory_bytes() == 2 * (size[0] + size[1])


@pytest.mark.parametrize("k,spec", [(1, {"name": "mlp", "depth": 4, "width": 32}),
                                    (2, {"name": "mlp", "depth": 4, "width": 32}),
                                    (1, {"name": "cnn", "channels": 4})])
def test_async_training_equals_weight_stashing_in_plain_pytorch(k, spec):
    """fast-async computes each microbatch's gradient on the weights its forward used (as many steps old
    as the schedule says) and applies it to the current weights: the same as plain PyTorch doing that.
    (The CNN's convolutions take the autograd path, the Linear layers the deferred weight gradients.)"""
    n_peers = 3
    shards = [data.load("digits", f"{j}/{n_peers}") for j in range(n_peers)]
    shards = [data.Dataset("cut", s.x[:90], s.y[:90]) for s in shards]
    ranges = even_split(num_layers(spec), n_peers)
    cfg = JobConfig(model=spec, epochs=1, momentum=0.9, microbatches=2, batch_size=16, scheme="fast-async",
                    max_staleness=k)
    seen = []
    got = local.train(cfg, shards, ranges, on_step=lambda results: seen.append(max(r.staleness for r in results)))
    mbs = [len(data.microbatch_sizes(b, 2)) for b in data.batch_sizes(90, 16)]
    progs = [S.pass_program("fast-async", "1f1b", j, n_peers, mbs, k) for j in range(n_peers)]
    lag_of = [S.lags(p) for p in progs]
    stage_of = {i: j for j, (a, b) in enumerate(ranges) for i in range(a, b)}
    want = reference.train_stale(cfg, shards, lambda p, i, s, m: lag_of[stage_of[i]][s, m]).state_dict()
    assert max((got[key] - want[key]).abs().max().item() for key in want) <= 1e-5
    expected = [max(S.staleness(p)[s] for p in progs) for s in range(len(mbs))] * n_peers
    assert seen == expected and max(seen) == min(k, 1)   # 2 microbatches, 3 stages: 1 step behind at most
    sync = local.train(JobConfig(**{**cfg.to_dict(), "scheme": "fast"}), shards, ranges)
    assert max((got[key] - sync[key]).abs().max().item() for key in want) > 1e-4   # staleness changes the result


def test_async_with_no_staleness_is_exact():
    shards = [data.load("digits", f"{j}/2") for j in range(2)]
    spec = {"name": "mlp", "depth": 3, "width": 32}
    cfg = JobConfig(model=spec, epochs=1, microbatches=4, batch_size=64, scheme="fast-async", max_staleness=0)
    got = local.train(cfg, shards, even_split(num_layers(spec), 2))
    want = reference.train(cfg, shards).state_dict()
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(n=st.integers(3, 5), mbs=st.lists(st.integers(1, 4), min_size=1, max_size=6), k=st.integers(0, 3),
       data_=st.data())
def test_remote_backward_programs_are_complete_and_never_deadlock(n, mbs, k, data_):
    stages = data_.draw(st.sets(st.integers(1, n - 2), min_size=1))
    remote = {j: data_.draw(st.sampled_from([h for h in range(n) if h != j])) for j in stages}
    roles = S.Roles(n, remote)
    spans = S.timeline(roles.pass_programs(mbs, k), roles=roles)
    every = sorted((s, m) for s, c in enumerate(mbs) for m in range(c))
    for j in range(n):
        back = roles.backward_of(j)
        assert sorted((a.step, a.mb) for i, a, *_ in spans if i == j and a.kind == S.F) == every
        assert sorted((a.step, a.mb) for i, a, *_ in spans if i == back and a.kind == S.B) == every
        assert [a.step for i, a, *_ in spans if i == back and a.kind == S.STEP] == list(range(len(mbs)))
    for p in range(roles.programs):   # every message has exactly the sender the receiver expects
        for kind in ("fwd", "bwd", "input", "weights", "lend", "return"):
            sender = roles.sender(p, kind)
            assert sender is None or roles.to(sender, kind) == p


def test_only_middle_stages_run_their_backward_elsewhere():
    for remote in ({0: 1}, {2: 1}, {1: 1}, {1: 3}):
        with pytest.raises(ValueError, match="a middle stage"):
            S.Roles(3, remote)
    with pytest.raises(ConfigError, match="fast-async"):
        JobConfig(scheme="fast", backward_at=[[1, 2]])
    with pytest.raises(ConfigError, match="one per stage"):
        JobConfig(scheme="fast-async", backward_at=[[1, 2], [1, 0]])


@pytest.mark.parametrize("k,remote", [(1, {1: 3}), (2, {1: 0, 2: 3}), (0, {2: 0})])
def test_remote_backward_equals_weight_stashing_in_plain_pytorch(k, remote):
    """A remote backward role recomputes each forward on the weights its forward role used
    (forward_version: k steps old at most, predicted k steps ahead along the momentum) and applies the
    gradient to the current weights; the other stages run fast-async. Same as plain PyTorch doing that,
    to float tolerance, over 2 epochs (the state goes back to the owner after each pass)."""
    n_peers = 4
    spec = {"name": "mlp", "depth": 5, "width": 32}
    shards = [data.Dataset("cut", s.x[:48], s.y[:48]) for s in (data.load("digits", f"{j}/4") for j in range(4))]
    ranges = even_split(num_layers(spec), n_peers)
    cfg = JobConfig(model=spec, epochs=2, momentum=0.9, microbatches=2, batch_size=8, scheme="fast-async",
                    max_staleness=k, backward_at=[[j, h] for j, h in remote.items()])
    seen = []
    got = local.train(cfg, shards, ranges, on_step=lambda results: seen.append([r.staleness for r in results]))
    mbs = [len(data.microbatch_sizes(b, 2)) for b in data.batch_sizes(48, 8)]
    lag_of = [S.lags(S.asynchronous(j, n_peers, mbs, k)) for j in range(n_peers)]
    stage_of = {i: j for j, (a, b) in enumerate(ranges) for i in range(a, b)}

    def lag(p, i, s, m):
        j = stage_of[i]
        return s - S.forward_version(s, k) if j in remote else lag_of[j][s, m]
    def ahead(p, i, s, m):   # weights made by a step of this pass are predicted k steps ahead
        return k if stage_of[i] in remote and S.forward_version(s, k) > 0 else 0
    want = reference.train_stale(cfg, shards, lag, ahead).state_dict()
    assert max((got[key] - want[key]).abs().max().item() for key in want) <= 1e-5
    assert all(r[j] == min(s % len(mbs), k) for s, r in enumerate(seen) for j in remote)
    if k:   # the lag and the prediction matter: without either, the result differs
        for other in (reference.train_stale(cfg, shards, lambda p, i, s, m: lag_of[stage_of[i]][s, m], ahead),
                      reference.train_stale(cfg, shards, lag)):
            assert max((got[key] - other.state_dict()[key]).abs().max().item() for key in want) > 1e-4


@pytest.mark.parametrize("scheme,extra", [("fast", {}), ("fast-async", {"max_staleness": 1}),
                                          ("fast-async", {"max_staleness": 1, "backward_at": [[1, 2]]})])
def test_working_ahead_while_waiting_does_not_change_the_result(monkeypatch, scheme, extra):
    """Stages sum complete groups of deferred weight gradients while they wait (agents do so in a step's
    drain; here at every wait, the most there can be): the same sums in the same order as at the step, so
    the parameters are bitwise equal."""
    shards = [data.Dataset("cut", s.x[:300], s.y[:300]) for s in (data.load("digits", f"{j}/3") for j in range(3))]
    spec = {"name": "mlp", "depth": 4, "width": 64}
    cfg = JobConfig(model=spec, epochs=1, momentum=0.9, microbatches=8, batch_size=256, scheme=scheme, **extra)
    ranges = even_split(num_layers(spec), 3)
    worked = []
    real = Stage.work_ahead
    monkeypatch.setattr(Stage, "work_ahead", lambda self: worked.append(real(self)) or worked[-1])
    lazy = local.train(cfg, shards, ranges)
    eager = local.train(cfg, shards, ranges, work_ahead=True)
    assert any(worked)   # groups of 4 microbatches of 32 rows were summed ahead
    assert all(torch.equal(lazy[k], eager[k]) for k in lazy)


def test_slack_is_the_drain_of_each_step():
    """A stage may work ahead only at receives with no forward of its own left before its next step."""
    def waits(program):
        return [f"{program[i].kind}{program[i].mb}" for i in sorted(S.slack(program))]
    assert waits(S.one_f_one_b(0, 2, 8)) == ["RECV_B6", "RECV_B7"]
    assert waits(S.one_f_one_b(1, 2, 8)) == []   # the last stage forwards right after every receive
    assert waits(S.gpipe(0, 3, 3)) == ["RECV_B0", "RECV_B1", "RECV_B2"]
    assert waits(S.one_f_one_b(1, 3, 4)) == ["RECV_B2", "RECV_B3"]
    assert waits(S.eager(0, 2, 4)) == ["RECV_B0", "RECV_B1", "RECV_B2", "RECV_B3"]   # every backward's wait
    assert waits(S.eager(1, 2, 4)) == []
    program = S.asynchronous(0, 3, [4, 4, 4], 2)
    assert S.slack(program)
    for i in S.slack(program):
        rest = program[i:]
        assert all(a.kind != S.F for a in rest[:next(j for j, a in enumerate(rest) if a.kind == S.STEP)])
