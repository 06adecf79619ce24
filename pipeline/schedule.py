"""Schedules as data: for each stage of a chain, the ordered actions of a pass.

Actions (as in torch.distributed.pipelining): F m / B m compute the forward / backward of microbatch
m, RECV_F / SEND_F move activations (with labels) down the chain, RECV_B / SEND_B move gradients up,
STEP applies the stage's optimizers. The head's F reads its own data; the tail's F computes the loss.
Every action names its step, so one program can span a whole pass: the synchronous schemes repeat
one step's program (a flush per step); `fast-async` runs 1F1B across step boundaries.

Remote backward (fast-async): a middle stage's forward and backward run on different peers, each a role
with its own program (`Roles`). The forward role lends its layers' state to the backward role (SEND_L),
sends it each microbatch's input (SEND_I) and keeps nothing else; the backward role recomputes the
forward on the weights the forward used, takes the gradients, steps the optimizer, sends the new weights
back (SEND_W) and, at the end of the pass, the state (SEND_R).
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Action:
    kind: str
    mb: int | None = None
    step: int = 0

    def __str__(self) -> str:
        return self.kind if self.mb is None else f"{self.kind}{self.mb}"


F, B, SEND_F, RECV_F, SEND_B, RECV_B, STEP = "F", "B", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "STEP"
SEND_I, RECV_I, SEND_W, RECV_W = "SEND_I", "RECV_I", "SEND_W", "RECV_W"
SEND_L, RECV_L, SEND_R, RECV_R = "SEND_L", "RECV_L", "SEND_R", "RECV_R"


def _forward(stage: int, n_stages: int, m: int, step: int = 0) -> list[Action]:
    acts = [Action(RECV_F, m, step)] if stage > 0 else []
    acts.append(Action(F, m, step))
    if stage < n_stages - 1:
        acts.append(Action(SEND_F, m, step))
    return acts


def _backward(stage: int, n_stages: int, m: int, step: int = 0) -> list[Action]:
    acts = [Action(RECV_B, m, step)] if stage < n_stages - 1 else []
    acts.append(Action(B, m, step))
    if stage > 0:
        acts.append(Action(SEND_B, m, step))
    return acts


def nsplit(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """Sequential N-split: each microbatch goes down and back up before the next one starts."""
    acts: list[Action] = []
    for m in range(n_mb):
        acts += _forward(stage, n_stages, m) + _backward(stage, n_stages, m)
    return acts + [Action(STEP)]


def gpipe(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """GPipe: every microbatch forward, then every backward, then the step (a flush per step)."""
    acts: list[Action] = []
    for m in range(n_mb):
        acts += _forward(stage, n_stages, m)
    for m in range(n_mb):
        acts += _backward(stage, n_stages, m)
    return acts + [Action(STEP)]


def eager(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """Eager forwards: the stages before the last run every forward first (as GPipe), the last alternates
    (as 1F1B). An upstream stage's backwards then all come in its drain (`slack`), where it spends the
    waits for gradients on deferred weight-gradient work, so its flush is short and the next step's first
    forward reaches the last stage before that has finished its own update. Costs the upstream stages
    n_mb forward buffers (1F1B: n_stages - stage)."""
    return gpipe(stage, n_stages, n_mb) if stage < n_stages - 1 else one_f_one_b(stage, n_stages, n_mb)


def _interleaved(stage: int, n_stages: int, order: list[tuple[int, int]], sizes: dict[int, int]) -> list[Action]:
    """1F1B over a sequence of (step, microbatch): warm up with (stages after this one) forwards, then
    alternate one forward and one backward, then drain the backwards; STEP s follows the backward of
    step s's last microbatch (sizes[s] microbatches)."""
    warmup = min(n_stages - 1 - stage, len(order))
    acts: list[Action] = []

    def backward(s: int, m: int) -> list[Action]:
        return _backward(stage, n_stages, m, s) + ([Action(STEP, None, s)] if m == sizes[s] - 1 else [])

    for s, m in order[:warmup]:
        acts += _forward(stage, n_stages, m, s)
    for i in range(len(order) - warmup):
        acts += _forward(stage, n_stages, order[warmup + i][1], order[warmup + i][0]) + backward(*order[i])
    for s, m in order[len(order) - warmup:]:
        acts += backward(s, m)
    return acts


def one_f_one_b(stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """1F1B: at most n_stages - stage microbatches are buffered here."""
    return _interleaved(stage, n_stages, [(0, m) for m in range(n_mb)], {0: n_mb})


def asynchronous(stage: int, n_stages: int, mbs: list[int], max_staleness: int) -> list[Action]:
    """fast-async: 1F1B run across step boundaries. A stage's warm-up forwards of the next step run
    before this step's update reaches it, so their weights are a few steps old: at most
    ceil((n_stages-1-stage) / min(mbs)) steps (`lags`). When that can exceed max_staleness, the pass is
    flushed every max_staleness + 1 steps instead, so no forward's weights are more than max_staleness
    steps old; max_staleness 0 is synchronous 1F1B. Every stage decides alike (from the head, which
    lags most), so the programs of a chain agree."""
    def groups(size: int) -> list[Action]:
        acts: list[Action] = []
        for first in range(0, len(mbs), size):
            steps = range(first, min(first + size, len(mbs)))
            acts += _interleaved(stage, n_stages, [(s, m) for s in steps for m in range(mbs[s])],
                                 {s: mbs[s] for s in steps})
        return acts

    whole = [(s, m) for s in range(len(mbs)) for m in range(mbs[s])]
    head_lag = max(lags(_interleaved(0, n_stages, whole, dict(enumerate(mbs)))).values(), default=0)
    return groups(len(mbs) if head_lag <= max_staleness else max_staleness + 1)


def forward_version(step: int, max_staleness: int) -> int:
    """Remote backward: the weights a forward role uses for `step` are those after this many steps of
    the pass (a fixed lag, so the result is reproducible whatever the timing)."""
    return max(0, step - max_staleness)


def forward_role(mbs: list[int], max_staleness: int) -> list[Action]:
    """The forward role of a middle stage whose backward runs on another peer. It lends its layers'
    state (weights and optimizer) to the backward role first and gets it back last; before step s it
    installs the weights of version forward_version(s) (RECV_W of the step that made them); per
    microbatch it forwards and sends its input to the backward role."""
    acts = [Action(SEND_L, None, 0)]
    for s, n in enumerate(mbs):
        if forward_version(s, max_staleness) > forward_version(s - 1, max_staleness):
            acts.append(Action(RECV_W, None, forward_version(s, max_staleness) - 1))
        for m in range(n):
            acts += [Action(RECV_F, m, s), Action(F, m, s), Action(SEND_F, m, s), Action(SEND_I, m, s)]
    return acts + [Action(RECV_R, None, len(mbs))]


def backward_role(mbs: list[int], max_staleness: int) -> list[Action]:
    """The backward role of that stage, on another peer: per microbatch, the forward's input and the
    output gradient, then B (recompute the forward, backward) and the input gradient upstream; after each
    step the new weights go to the forward role when a later step of the pass uses them; at the end the
    layers' state goes back."""
    acts = [Action(RECV_L, None, 0)]
    for s, n in enumerate(mbs):
        for m in range(n):
            acts += [Action(RECV_I, m, s), Action(RECV_B, m, s), Action(B, m, s), Action(SEND_B, m, s)]
        acts.append(Action(STEP, None, s))
        if any(forward_version(t, max_staleness) == s + 1 for t in range(len(mbs))):
            acts.append(Action(SEND_W, None, s))
    return acts + [Action(SEND_R, None, len(mbs))]


class Roles:
    """Who runs what in a fast-async chain of n_stages where some middle stages' backward runs on another
    peer: remote = {stage position: chain position of the peer running its backward}. Programs are
    numbered: 0..n_stages-1 for the chain positions (the forward role where remote), then one backward
    role per remote stage, in stage order."""

    def __init__(self, n_stages: int, remote: dict[int, int] | None = None):
        self.n, self.remote = n_stages, dict(sorted((remote or {}).items()))
        bad = [f"{j}:{h}" for j, h in self.remote.items()
               if not 0 < j < n_stages - 1 or not 0 <= h < n_stages or h == j]
        if bad:
            raise ValueError(f"backward-at {', '.join(bad)}: a middle stage (1..{n_stages - 2}) can run its "
                             f"backward at another chain position (0..{n_stages - 1}); the head's input is its "
                             "private data and the tail's forward is its loss")
        self.back = {j: n_stages + k for k, j in enumerate(self.remote)}   # stage -> program of its backward
        self.backed = list(self.remote)   # program n_stages + k works on stage backed[k]

    @property
    def programs(self) -> int:
        return self.n + len(self.remote)

    def stage(self, program: int) -> int:
        """The stage (chain position of the layers) a program works on."""
        return program if program < self.n else self.backed[program - self.n]

    def host(self, program: int) -> int:
        """The chain position of the peer that runs a program."""
        return program if program < self.n else self.remote[self.stage(program)]

    def backward_of(self, stage: int) -> int:
        return self.back.get(stage, stage)

    def to(self, sender: int, kind: str) -> int:
        """The program that receives what `sender` sends."""
        j = self.stage(sender)
        return {"fwd": j + 1, "bwd": self.backward_of(j - 1), "input": self.back.get(j), "weights": j,
                "lend": self.back.get(j), "return": j}[kind]

    def receiver(self, stage: int, kind: str) -> int:
        """The program a message of `kind` for `stage` is for."""
        return self.backward_of(stage) if kind in ("bwd", "input", "lend") else stage

    def sender(self, receiver: int, kind: str) -> int | None:
        """The only program that may send `kind` to `receiver` (None: none may)."""
        j, backward_role, forward_role = self.stage(receiver), receiver >= self.n, receiver in self.remote
        if kind == "fwd":
            return j - 1 if j > 0 and not backward_role else None
        if kind == "bwd":
            return self.backward_of(j + 1) if j < self.n - 1 and not forward_role else None
        if kind in ("input", "lend"):
            return j if backward_role else None
        if kind in ("weights", "return"):
            return self.back[j] if forward_role else None
        return None

    def pass_programs(self, mbs: list[int], max_staleness: int) -> list[list[Action]]:
        progs = [forward_role(mbs, max_staleness) if j in self.remote else asynchronous(j, self.n, mbs, max_staleness)
                 for j in range(self.n)]
        return progs + [backward_role(mbs, max_staleness) for _ in self.remote]


MESSAGE = {SEND_F: "fwd", RECV_F: "fwd", SEND_B: "bwd", RECV_B: "bwd", SEND_I: "input", RECV_I: "input",
           SEND_W: "weights", RECV_W: "weights", SEND_L: "lend", RECV_L: "lend", SEND_R: "return", RECV_R: "return"}
SENDS = {k for k in MESSAGE if k.startswith("SEND")}


def evaluation(stage: int, n_stages: int) -> list[Action]:
    """Forward only (one microbatch per eval batch): no buffers, no backward, no step."""
    return _forward(stage, n_stages, 0)


PIPELINES = {"1f1b": one_f_one_b, "gpipe": gpipe, "eager": eager}


def program(scheme: str, pipeline: str, stage: int, n_stages: int, n_mb: int) -> list[Action]:
    """One step's actions for a stage: sequential N-split, or a pipelined schedule (Fast N-split)."""
    if scheme == "nsplit":
        return nsplit(stage, n_stages, n_mb)
    if scheme != "fast":
        raise ValueError(f"{scheme} has no one-step program: see pass_program")
    return PIPELINES[pipeline](stage, n_stages, n_mb)


def pass_program(scheme: str, pipeline: str, stage: int, n_stages: int, mbs: list[int],
                 max_staleness: int = 0) -> list[Action]:
    """A whole pass's actions for a stage; step s has mbs[s] microbatches."""
    if scheme == "fast-async":
        return asynchronous(stage, n_stages, mbs, max_staleness)
    return [replace(a, step=s) for s, n in enumerate(mbs) for a in program(scheme, pipeline, stage, n_stages, n)]


def evaluation_pass(stage: int, n_stages: int, n_steps: int) -> list[Action]:
    """Forward only, one microbatch per evaluation batch."""
    return [replace(a, step=s) for s in range(n_steps) for a in evaluation(stage, n_stages)]


def lags(program: list[Action]) -> dict[tuple[int, int], int]:
    """Per (step, microbatch): the optimizer steps this stage applies between its forward and its
    backward, i.e. how many steps old the weights its forward ran on are when its gradient is applied."""
    steps_done, at_forward, out = 0, {}, {}
    for a in program:
        if a.kind == F:
            at_forward[a.step, a.mb] = steps_done
        elif a.kind == B:
            out[a.step, a.mb] = steps_done - at_forward.pop((a.step, a.mb))
        elif a.kind == STEP:
            steps_done += 1
    return out


def staleness(program: list[Action]) -> dict[int, int]:
    """Per step: the largest lag of its microbatches."""
    worst: dict[int, int] = {}
    for (s, _), lag in lags(program).items():
        worst[s] = max(worst.get(s, 0), lag)
    return worst


def slack(program: list[Action]) -> set[int]:
    """Indices of the receives after which the stage forwards nothing more before its next optimizer
    step (the drain of a step). Waiting there holds up no forward, so the stage may spend the wait on
    deferred work (Stage.work_ahead); a message that comes meanwhile waits for the unit under way (one
    weight-gradient GEMM), which in a middle stage delays the gradient it sends back by as much."""
    out: set[int] = set()
    drained = True   # scanning backwards: no forward between here and the next STEP
    for i in range(len(program) - 1, -1, -1):
        kind = program[i].kind
        if kind == STEP:
            drained = True
        elif kind == F:
            drained = False
        elif kind in (RECV_F, RECV_B) and drained:
            out.add(i)
    return out


def in_flight(program: list[Action]) -> int:
    """Most microbatches whose forward buffer a stage holds at once under this program."""
    held = peak = 0
    for a in program:
        if a.kind == F:
            held += 1
            peak = max(peak, held)
        elif a.kind == B:
            held -= 1
    return peak


def held(program: list[Action], deferred: bool = True) -> list[tuple[int, int, int]]:
    """What a stage holds after each action of its program, in microbatches (pipeline.stage): (forward
    buffers, microbatches whose backward is done and whose deferred weight-gradient pairs wait for the
    step (`deferred`: the pipelined schemes defer them, pipeline.wgrad), weight copies of stale forwards:
    one per optimizer version that a forward in flight ran on, a forward being stale when a step comes
    before its backward). The planner's memory model (pipeline.planner.model) takes its worst case."""
    stale = {key: lag > 0 for key, lag in lags(program).items()}
    version, buffers, pending, out = 0, {}, 0, []
    for a in program:
        if a.kind == F:
            buffers[a.step, a.mb] = version if stale[a.step, a.mb] else None
        elif a.kind == B:
            del buffers[a.step, a.mb]
            pending += deferred
        elif a.kind == STEP:
            version, pending = version + 1, 0
        else:
            continue
        out.append((len(buffers), pending, len({v for v in buffers.values() if v is not None})))
    return out


def chain_order(ring: list[str], rotation: int) -> list[str]:
    """The chain of a rotation: ring order starting at peer (rotation mod N)."""
    k = rotation % len(ring)
    return ring[k:] + ring[:k]


def render(programs: list[list[Action]]) -> str:
    """One line per stage: its actions in order (as step.microbatch when they span several steps)."""
    several = any(a.step for p in programs for a in p)

    def label(a: Action) -> str:
        if not several:
            return str(a)
        return f"{a.kind}{a.step}" if a.mb is None else f"{a.kind}{a.step}.{a.mb}"
    return "\n".join(f"stage {i}: " + " ".join(map(label, p)) for i, p in enumerate(programs))


def timeline(programs: list[list[Action]], forward: float = 1.0, backward: float = 2.0,
             roles: Roles | None = None) -> list[tuple]:
    """Simulate the programs with unit costs (transfers free): (program, action, start, end) for every
    F, B and STEP. `roles` routes messages (default a plain chain); the B of a backward role also redoes
    the forward. Raises RuntimeError if the programs deadlock."""
    roles = roles or Roles(len(programs))
    clock = [0.0] * len(programs)
    ready: dict[tuple, float] = {}   # (kind, receiving program, step, mb) -> time it is available
    pc = [0] * len(programs)
    spans = []
    while any(p < len(prog) for p, prog in zip(pc, programs)):
        moved = False
        for j, prog in enumerate(programs):
            while pc[j] < len(prog):
                a = prog[pc[j]]
                if a.kind in MESSAGE and a.kind not in SENDS:
                    key = (MESSAGE[a.kind], j, a.step, a.mb)
                    if key not in ready:
                        break
                    clock[j] = max(clock[j], ready.pop(key))
                elif a.kind in SENDS:
                    ready[MESSAGE[a.kind], roles.to(j, MESSAGE[a.kind]), a.step, a.mb] = clock[j]
                else:
                    cost = {F: forward, B: backward + (forward if j >= roles.n else 0.0)}.get(a.kind, 0.0)
                    spans.append((j, a, clock[j], clock[j] + cost))
                    clock[j] += cost
                pc[j] += 1
                moved = True
        if not moved:
            raise RuntimeError(f"schedule deadlocks at {[str(p[i]) if i < len(p) else '-' for p, i in zip(programs, pc)]}")
    if ready:
        raise RuntimeError(f"messages sent but never received: {sorted(ready)[:5]}")
    return spans


def render_timeline(spans: list[tuple], scale: float = 1.0) -> str:
    """A text Gantt chart: one row per stage, one 3-character cell per time unit."""
    end = max(s[3] for s in spans)
    rows = {}
    for j, a, t0, t1 in spans:
        row = rows.setdefault(j, [" . "] * int(round(end / scale)))
        for t in range(int(round(t0 / scale)), int(round(t1 / scale))):
            row[t] = f"{str(a):<3}"[:3]
    return "\n".join(f"stage {j}: " + "".join(rows[j]) for j in sorted(rows))


def plot_timeline(spans: list[tuple], path: str, title: str = "") -> None:
    """The same chart as an image (matplotlib, installed with the `plot` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(s[0] for s in spans) + 1
    fig, ax = plt.subplots(figsize=(max(6, max(s[3] for s in spans) * 0.35), 0.6 * n + 1))
    colours = {F: "tab:blue", B: "tab:orange", STEP: "tab:green"}
    for j, a, t0, t1 in spans:
        ax.broken_barh([(t0, max(t1 - t0, 0.2))], (n - 1 - j - 0.4, 0.8), color=colours.get(a.kind, "grey"))
        ax.text((t0 + t1) / 2, n - 1 - j, str(a), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(n), [f"stage {n - 1 - j}" for j in range(n)])
    ax.set_xlabel("time (forward = 1 unit, backward = 2)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
