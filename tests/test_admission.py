"""Message admission (pipeline.admission), in one process: which stage messages a peer takes in, from
whom, under which key, and how it refuses the rest. No models, no network: layer shapes are made up."""
import ast
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import admission
from pipeline import schedule as S
from pipeline.admission import Admission, MessageKey, Mode, box_of
from pipeline.data import batch_sizes, microbatch_sizes
from protocols import ProtocolError, message

WIDTHS = [8, 16, 12, 11, 10, 6, 4, 3]   # shapes[i] = (WIDTHS[i],): one sample's input of layer i
PER_STEP = ("weights", "lend", "return")


def layer_shapes(i: int, state: bool) -> dict:
    """A made-up layer i: a weight and a bias, and in its state dict a counter too."""
    out = {"weight": ((WIDTHS[i + 1], WIDTHS[i]), torch.float32), "bias": ((WIDTHS[i + 1],), torch.float32)}
    return {**out, "count": ((), torch.int64)} if state else out


def admissions(chain, ranges, train_roles, samples=9, batch_size=4, microbatches=2,
               test_samples=5) -> dict[str, Admission]:
    """Each peer's admission (and a stranger's, outside the chain)."""
    modes = {"train": Mode(train_roles, samples, batch_size, microbatches),
             "eval": Mode(S.Roles(len(chain)), test_samples, 4, 1)}   # evaluation batches of 4
    shapes = [(w,) for w in WIDTHS[:max(b for _, b in ranges.values()) + 1]]
    return {p: Admission(p, 0, 0, list(chain), dict(ranges), modes, shapes, layer_shapes)
            for p in [*chain, "stranger"]}


def layers(a: int, b: int, state: bool, override: dict | None = None) -> dict:
    def tensors(i):
        named = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in layer_shapes(i, state).items()}
        return {"params": named, "optim": {}} if state else named
    return {**{i: tensors(i) for i in range(a, b)}, **(override or {})}


CHAIN = ["p0", "p1", "p2"]
RANGES = {"p0": (0, 2), "p1": (2, 4), "p2": (4, 6)}
PLAIN = admissions(CHAIN, RANGES, S.Roles(3))                 # batches of 4, 4, 1; microbatches of 2, 2, 1
REMOTE = admissions(CHAIN, RANGES, S.Roles(3, {1: 2}))        # stage 1's backward runs on p2
C = dict(job="j", rotation=0, step=0)


def fwd(stage, n=2, width=None, dtype=torch.float32, labels=torch.int64, **kw):
    width = WIDTHS[RANGES[CHAIN[stage]][0]] if width is None else width
    return message("fwd", **{**C, "mb": 0, "mode": "train", "stage": stage, **kw}, x=torch.zeros(n, width, dtype=dtype),
                   y=torch.zeros(n, dtype=labels))


def bwd(stage, n=2, **kw):
    return message("bwd", **{**C, "mb": 0, "stage": stage, **kw}, grad=torch.zeros(n, WIDTHS[RANGES[CHAIN[stage]][1]]))


def per_step(kind, step=0, override=None):
    field = "weights" if kind == "weights" else "layers"
    return message(kind, **{**C, "step": step}, stage=1, **{field: layers(2, 4, kind != "weights", override)})


GOOD = [   # (admissions, receiver, sender, message, key)
    (PLAIN, "p1", "p0", fwd(1), MessageKey(0, "train", 0, "fwd@1", 0)),
    (PLAIN, "p2", "p1", fwd(2, mb=1, step=1), MessageKey(0, "train", 1, "fwd@2", 1)),
    (PLAIN, "p2", "p1", fwd(2, n=1, step=2), MessageKey(0, "train", 2, "fwd@2", 0)),   # the short last batch
    (PLAIN, "p1", "p2", bwd(1), MessageKey(0, "train", 0, "bwd@1", 0)),
    (PLAIN, "p0", "p1", bwd(0, mb=1), MessageKey(0, "train", 0, "bwd@0", 1)),
    (PLAIN, "p1", "p0", fwd(1, n=4, mode="eval"), MessageKey(0, "eval", 0, "fwd@1", 0)),
    (REMOTE, "p2", "p1", fwd(2), MessageKey(0, "train", 0, "fwd@2", 0)),                 # from the forward role
    (REMOTE, "p2", "p1", message("input", **C, mb=1, stage=1, x=torch.zeros(2, WIDTHS[2])),
     MessageKey(0, "train", 0, "input@1", 1)),
    (REMOTE, "p0", "p2", bwd(0), MessageKey(0, "train", 0, "bwd@0", 0)),                 # from stage 1's backward
    (REMOTE, "p2", "p2", bwd(1), MessageKey(0, "train", 0, "bwd@1", 0)),                 # tail to the backward role
    (REMOTE, "p2", "p1", per_step("lend"), MessageKey(0, "train", 0, "lend@1", 0)),
    (REMOTE, "p1", "p2", per_step("weights", step=1), MessageKey(0, "train", 1, "weights@1", 0)),
    (REMOTE, "p1", "p2", per_step("return", step=3), MessageKey(0, "train", 3, "return@1", 0)),
]

BAD = [   # (admissions, receiver, sender, message, code, the refusal's text)
    (PLAIN, "p1", "p2", fwd(1), "unexpected", "fwd for stage 1 from p2 is not expected by p1 (stage 1)"),
    (PLAIN, "p2", "p0", fwd(1), "unexpected", "fwd for stage 1 from p0 is not expected by p2 (stage 2)"),
    (PLAIN, "p0", "stranger", bwd(0), "unexpected", "from stranger"),
    (PLAIN, "p1", "p0", fwd(0), "unexpected", "fwd for stage 0"),
    (PLAIN, "p1", "p0", {**fwd(1), "stage": 3}, "unexpected", "fwd for stage 3"),
    (PLAIN, "p1", "p0", fwd(1, rotation=1), "stale", "message for rotation 1; this stage is at 0"),
    (PLAIN, "stranger", "p0", fwd(1), "stale", "this stage is at 0"),
    (PLAIN, "p1", "p0", fwd(1, step=3), "unexpected", "step 3 out of range (3 steps in this pass)"),
    (PLAIN, "p1", "p0", fwd(1, mb=2), "unexpected", "microbatch 2 out of range (2)"),
    (PLAIN, "p1", "p0", fwd(1, step=2, mb=1), "unexpected", "microbatch 1 out of range (1)"),
    (PLAIN, "p1", "p0", fwd(1, n=2, step=2), "bad_shape", "activation: expected torch.float32 [1, 12], got "
                                                          "torch.float32 [2, 12]"),
    (PLAIN, "p1", "p0", fwd(1, width=7), "bad_shape", "activation: expected torch.float32 [2, 12]"),
    (PLAIN, "p1", "p0", fwd(1, dtype=torch.float64), "bad_shape", "got torch.float64 [2, 12]"),
    (PLAIN, "p1", "p0", fwd(1, labels=torch.float32), "bad_shape", "labels: expected torch.int64 [2]"),
    (PLAIN, "p1", "p2", {**bwd(1), "grad": torch.zeros(2, 12, dtype=torch.bfloat16)}, "bad_shape",
     "gradient: expected torch.float32 [2, 10]"),
    (PLAIN, "p1", "p0", fwd(1, mode="test"), "malformed", "unknown mode 'test'"),
    (PLAIN, "p1", "p0", {**fwd(1), "attempt": 1}, "stale", "message of attempt 1 of the job; this stage runs attempt 0"),
    (PLAIN, "p1", "p0", fwd(1, mode="eval", step=2), "unexpected", "step 2 out of range (2 steps in this pass)"),
    (PLAIN, "p1", "p2", bwd(1, mode="eval"), "unexpected", "bwd for stage 1"),   # evaluation is forward only
    (PLAIN, "p2", "p1", per_step("lend"), "unexpected", "lend for stage 1"),      # no remote backward here
    (REMOTE, "p2", "p0", message("input", **C, mb=0, stage=1, x=torch.zeros(2, 12)), "unexpected", "from p0"),
    (REMOTE, "p1", "p2", message("input", **C, mb=0, stage=1, x=torch.zeros(2, 12)), "unexpected", "by p1"),
    (REMOTE, "p2", "p1", message("input", **C, mb=0, stage=1, x=torch.zeros(2, 7)), "bad_shape", "[2, 12]"),
    (REMOTE, "p1", "p2", bwd(1), "unexpected", "bwd for stage 1 from p2 is not expected by p1"),
    (REMOTE, "p0", "p1", bwd(0), "unexpected", "from p1"),   # stage 1's forward role sends no gradients
    (REMOTE, "p2", "p1", per_step("lend", step=1), "unexpected", "lend for step 1 (this pass has 3 steps)"),
    (REMOTE, "p1", "p2", per_step("return", step=2), "unexpected", "return for step 2 (this pass has 3 steps)"),
    (REMOTE, "p1", "p2", per_step("weights", step=3), "unexpected", "weights for step 3"),
    (REMOTE, "p2", "p1", per_step("weights"), "unexpected", "weights for stage 1 from p1"),
    (REMOTE, "p1", "p2", per_step("weights", override={4: {}}), "bad_shape", "expected the state of layers [2,4)"),
    (REMOTE, "p1", "p2", {**per_step("weights"), "weights": layers(2, 3, False)}, "bad_shape", "layers [2,4)"),
    (REMOTE, "p1", "p2", per_step("weights", override={3: {"weight": torch.zeros(10, 11)}}), "bad_shape",
     "layer 3: expected tensors ['bias', 'weight']"),
    (REMOTE, "p1", "p2", per_step("weights", override={3: {"weight": torch.zeros(3), "bias": torch.zeros(10)}}),
     "bad_shape", "layer 3 weight: expected torch.float32 [10, 11], got torch.float32 [3]"),
    (REMOTE, "p1", "p2", per_step("weights", override={3: {"weight": 1, "bias": torch.zeros(10)}}), "bad_shape",
     "layer 3 weight: expected torch.float32 [10, 11], got int"),
    (REMOTE, "p2", "p1", per_step("lend", override={3: {"params": layers(3, 4, True)[3]["params"]}}), "bad_shape",
     "layer 3: expected tensors"),                                                 # no optimizer state
    (REMOTE, "p2", "p1", per_step("lend", override={2: layers(2, 3, False)[2]}), "bad_shape", "layer 2"),  # no state
]


@pytest.mark.parametrize("adm,me,sender,msg,key", GOOD, ids=[f"{m['type']}@{m['stage']}-{k.step}.{k.mb}"
                                                            for _, _, _, m, k in GOOD])
def test_expected_messages_are_admitted_under_their_key(adm, me, sender, msg, key):
    got, payload = adm[me].admit(sender, msg)
    assert got == key and isinstance(got, MessageKey)
    fields = {"fwd": {"x", "y"}, "bwd": {"grad"}, "input": {"x"}, "weights": {"weights"}}.get(msg["type"], {"layers"})
    assert set(payload) == fields and all(payload[f] is msg[f] for f in fields)


@pytest.mark.parametrize("adm,me,sender,msg,code,text", BAD, ids=[f"{m['type']}-{c}" for _, _, _, m, c, _ in BAD])
def test_other_messages_are_refused_with_a_reason(adm, me, sender, msg, code, text):
    with pytest.raises(ProtocolError) as e:
        adm[me].admit(sender, msg)
    assert e.value.code == code and text in e.value.message, e.value.message


# --- property: what correct programs send is admitted by its receiver, and nothing else -------------------
@st.composite
def chains(draw):
    n = draw(st.integers(2, 4))
    cuts = sorted(draw(st.sets(st.integers(1, len(WIDTHS) - 2), min_size=n - 1, max_size=n - 1)))
    bounds = [0, *cuts, draw(st.integers(cuts[-1] + 1 if cuts else 1, len(WIDTHS) - 1))]
    chain = [f"p{i}" for i in range(n)]
    remote = {j: h for j in range(1, n - 1) if (h := draw(st.none() | st.sampled_from([h for h in range(n) if h != j])))
              is not None}
    if remote:
        scheme = ("fast-async", "1f1b")
    else:
        scheme = draw(st.sampled_from([("nsplit", "1f1b"), ("fast", "1f1b"), ("fast", "gpipe"), ("fast", "eager"),
                                       ("fast-async", "1f1b")]))
    batch_size = draw(st.integers(1, 5))
    return dict(chain=chain, ranges={p: (bounds[i], bounds[i + 1]) for i, p in enumerate(chain)},
                roles=S.Roles(n, remote), scheme=scheme, max_staleness=draw(st.integers(0, 2)),
                samples=draw(st.integers(1, 3 * batch_size)), batch_size=batch_size,
                microbatches=draw(st.integers(1, 3)), test_samples=draw(st.integers(0, 6)))


def payload(kind: str, stage: int, size: int, chain, ranges) -> dict:
    a, b = ranges[chain[stage]]
    if kind == "fwd":
        return {"x": torch.zeros(size, WIDTHS[a]), "y": torch.zeros(size, dtype=torch.int64)}
    if kind in ("bwd", "input"):
        return {"grad" if kind == "bwd" else "x": torch.zeros(size, WIDTHS[b if kind == "bwd" else a])}
    return {"weights": layers(a, b, False)} if kind == "weights" else {"layers": layers(a, b, True)}


def wire(kind, mode, step, mb, stage, size, chain, ranges) -> dict:
    """A stage message as JobRuntime._drive sends it."""
    return message(kind, job="j", rotation=0, step=step, stage=stage, **payload(kind, stage, size, chain, ranges),
                   **({} if kind in PER_STEP else {"mb": mb}), **({"mode": mode} if kind == "fwd" else {}))


def microbatches(c, mode: str) -> list[list[int]]:
    """Per step, the sizes of its microbatches (evaluation batches of 4, not cut)."""
    if mode == "eval":
        return [[b] for b in batch_sizes(c["test_samples"], 4)]
    return [microbatch_sizes(b, c["microbatches"]) for b in batch_sizes(c["samples"], c["batch_size"])]


def traffic(c):
    """Every message of a train pass and an evaluation: (sender, receiver, message, the receiver's key),
    and every key the receiving programs wait for (their RECV actions)."""
    chain, ranges, n = c["chain"], c["ranges"], len(c["chain"])
    sent, waits = [], []
    for mode in ("train", "eval"):
        sizes = microbatches(c, mode)
        roles = c["roles"] if mode == "train" else S.Roles(n)
        if mode == "eval":
            progs = [S.evaluation_pass(j, n, len(sizes)) for j in range(n)]
        elif roles.remote:
            progs = roles.pass_programs([len(s) for s in sizes], c["max_staleness"])
        else:
            progs = [S.pass_program(*c["scheme"], j, n, [len(s) for s in sizes], c["max_staleness"]) for j in range(n)]
        for p, prog in enumerate(progs):
            for a in (a for a in prog if a.kind in S.MESSAGE):
                kind = S.MESSAGE[a.kind]
                if a.kind in S.SENDS:
                    to = roles.to(p, kind)
                    size = 0 if kind in PER_STEP else sizes[a.step][a.mb]
                    msg = wire(kind, mode, a.step, a.mb, roles.stage(to), size, chain, ranges)
                    sent.append((chain[roles.host(p)], chain[roles.host(to)], msg,
                                 MessageKey(0, mode, a.step, box_of(kind, roles.stage(to)), a.mb or 0)))
                else:
                    waits.append(MessageKey(0, mode, a.step, box_of(kind, roles.stage(p)), a.mb or 0))
    return sent, waits


def admitted(adm: Admission, sender: str, msg: dict) -> MessageKey | None:
    try:
        return adm.admit(sender, msg)[0]
    except ProtocolError:
        return None


def ring_of(c) -> dict[str, Admission]:
    return admissions(c["chain"], c["ranges"], c["roles"], c["samples"], c["batch_size"], c["microbatches"],
                      c["test_samples"])


@settings(max_examples=60, deadline=None)
@given(chains())
def test_every_message_a_pass_sends_is_admitted_by_its_receiver_only(c):
    adm = ring_of(c)
    sent, waits = traffic(c)
    assert sorted(k for *_, k in sent) == sorted(waits) and len(set(waits)) == len(waits)
    for sender, receiver, msg, key in sent:
        assert adm[receiver].admit(sender, msg)[0] == key
        assert [(p, s) for p in adm for s in adm if admitted(adm[p], s, msg)] == [(receiver, sender)]


@settings(max_examples=30, deadline=None)
@given(chains())
def test_nothing_else_is_admitted(c):
    """Every stage message that any peer could send any other, for any stage, step and microbatch (with the
    shapes that stage, step and microbatch take): admitted iff a program of the pass sends it. Weights are
    admitted for any step of the pass: which steps send them depends on max_staleness, not a fact here."""
    chain, ranges, n, adm = c["chain"], c["ranges"], len(c["chain"]), ring_of(c)
    sent, _ = traffic(c)
    expected = {(r, s, k) for s, r, _, k in sent}
    weights = {(chain[j], chain[h], box_of("weights", j)) for j, h in c["roles"].remote.items()}   # back to the owner
    for mode in ("train", "eval"):
        sizes = microbatches(c, mode)
        for kind in ("fwd", "bwd", "input", "weights", "lend", "return"):
            for stage in range(n + 1):
                for step in range(len(sizes) + 2):
                    for mb in [0] if kind in PER_STEP else range(c["microbatches"] + 1):
                        size = sizes[step][mb] if step < len(sizes) and mb < len(sizes[step]) else 1
                        msg = {**wire(kind, mode, step, mb, min(stage, n - 1), size, chain, ranges), "mode": mode,
                               "stage": stage}
                        key = MessageKey(0, mode, step, box_of(kind, stage), mb)
                        for r in adm:
                            for s in adm:
                                loose = mode == "train" and (r, s, key.box) in weights and step < len(sizes)
                                assert (admitted(adm[r], s, msg) == key) == ((r, s, key) in expected or loose)


def test_admission_is_pure():
    """pipeline.admission imports nothing of peer, aiohttp or asyncio, and no model code."""
    tree = ast.parse(pathlib.Path(admission.__file__).read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("peer", "aiohttp", "asyncio") or m == "pipeline.models"}
