"""Job configs fuzzed against live agents: hypothesis draws configs over every JobConfig field (valid, at the
limits, just beyond them, absurd, of the wrong type; models built in, unknown and custom) and posts each to
/jobs, /plan and /job/profile of a real agent of a 2-agent ring. Every reply is a 4xx with a JSON error, or
for a config within the limits a 200 (a job is cancelled once it has started); never a 5xx or a hang. A
refused config leaves nothing behind (no job, stage or profile on any agent). The agents stay alive, /status
answers throughout, their memory does not grow when the same configs come a second time nor rise far above
their budget, and no code named by a request runs.

Whether a config is within the limits is decided in process with the agent's own checks (JobConfig,
check_job); valid configs whose profiling would take seconds are not sent (see probe_seconds). The agents
run with a memory budget and an address-space limit, so that a config that makes one allocate more fails
there instead of on this shared machine.

Examples scale with $SPLITRING_FUZZ_SCALE (scripts/fuzz_agent.py --scale runs longer)."""
from __future__ import annotations

import fnmatch
import http.client
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, note, settings, strategies as st
from torch.utils.flop_counter import FlopCounterMode

from conftest import StatusWatch, wait_until
from peer.limits import JOB_LIMITS, check_job
from peer.localring import get_json
from pipeline.config import ASSIGNS, AUX_HEADS, LOCAL_LOSS_SCHEMES, PARALLEL_SCHEMES, SCHEMES, TYPES, JobConfig
from pipeline.models import CUSTOM_NAME, footprint, input_shape, layer_factories
from pipeline.schedule import PIPELINES
from protocols.compression import COMPRESSIONS, WIRE_DTYPES

L = JOB_LIMITS
ALLOWED = ["fuzzallowed*:*"]        # the agents' --allow-model: matches names, but no such module exists
BUDGET = 512 << 20                  # the agents' --memory-budget
AS_HEADROOM = 2 << 30               # address space an agent may add after warm-up (RLIMIT_AS): an agent that
                                    # allocates past its budget fails there instead of exhausting the machine
RSS_REPEAT = 100 << 20              # most an agent's resident memory may grow when the same configs come again
RSS_GROWTH = 400 << 20              # ... and over both runs (what one run loads once: kernels, allocator arenas)
PEAK_OVER = BUDGET + (256 << 20)    # most an agent's resident memory may rise above its start at any time
REPLY_S = 30.0                      # a reply (or, for /jobs, the next event) later than this is a hang
HEAVY_S = 2.0                       # valid configs whose profiling probe would take longer are not sent
MAX_LAYERS_SENT = 64                # ... nor those of more layers (profiling and planning are per layer)
EXAMPLES = 200                      # times $SPLITRING_FUZZ_SCALE

# code a request names must never run: it would create MARKER, delete CANARY, kill or stall the agent
WORK = Path(tempfile.gettempdir()) / f"splitring-fuzz-jobs-{os.getpid()}"
MARKER, CANARY = WORK / "marker", WORK / "canary" / "keep"


# --- values -------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


def nested(depth: int) -> list:
    """[[[...]]], `depth` lists deep (bodies nested too deeply to parse are test_safety's)."""
    return json.loads("[" * depth + "]" * depth)


ABSURD_FLOATS = [10 ** 12, -10 ** 12, 2 ** 63, 10 ** 100, 10 ** 5000, 1e308, -1e308, NAN, INF, -INF]
ABSURD = st.sampled_from(ABSURD_FLOATS + [2 ** 64 + 1, -2 ** 63 - 1, 1e-308, 5e-324])
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
WRONG = st.one_of(st.sampled_from(["1", "", "NaN", "Infinity", "x" * 10_000, "\x00", "ü" * 50, [], [1], [[1, 2]], {},
                                   {"a": 1}, None, True, False, 1.5, [None]]),
                  st.sampled_from([2, 20, 400, 800]).map(lambda d: {"deep": nested(d)}),
                  JSON_JUNK)


def ints(valid, lo: int, hi: int) -> dict:
    """Categories of values of an integer field valid from lo to hi (inclusive)."""
    return {"valid": valid, "edge": st.sampled_from([lo, hi]), "beyond": st.sampled_from([lo - 1, hi + 1]),
            "absurd": ABSURD, "wrong": st.one_of(WRONG.filter(lambda v: type(v) is not int),
                                                 st.sampled_from([float(lo), float(hi), str(lo), True]))}


def floats(valid, edge: list, beyond: list) -> dict:
    return {"valid": valid, "edge": st.sampled_from(edge), "beyond": st.sampled_from(beyond),
            "absurd": st.sampled_from(ABSURD_FLOATS),
            "wrong": st.one_of(WRONG.filter(lambda v: type(v) not in (int, float)), st.sampled_from(["0.1", True]))}


def names(valid: list[str]) -> dict:
    return {"valid": st.sampled_from(valid), "edge": st.sampled_from(valid),
            "beyond": st.sampled_from([v for v in [w.upper() for w in valid] + [w + " " for w in valid]
                                       + ["", "none", "\x00", "auto"] if v not in valid]),
            "absurd": st.sampled_from(["x" * 100_000, valid[0] * 1000]) | st.text(max_size=20).filter(
                lambda s: s not in valid),
            "wrong": st.one_of(WRONG.filter(lambda v: not isinstance(v, str)), st.just([valid[0]]), st.just(1))}


up = math.nextafter
CUT = {   # needs a client/helper scheme to be valid (valid_configs)
    "valid": st.sampled_from([[], [1], [1, 2]]),
    "edge": st.sampled_from([[1], [L.max_layers - 1], [1, L.max_layers - 1]]),
    "beyond": st.sampled_from([[0], [2, 1], [1, 1], [1, 2, 3], [L.max_layers], [-1], [True], [1.0], "1,2"]),
    "absurd": st.sampled_from([[10 ** 12], [2 ** 64, 2 ** 65], [NAN], [1] * 5000]),
    "wrong": st.one_of(WRONG.filter(lambda v: not isinstance(v, list) or v in ([], [1])), st.just({"1": 2}),
                       st.sampled_from([[None], ["1"], [[1]]])).filter(lambda v: v != [] and v != [1]),
}


def peer_names(prefix: str) -> dict:
    """--clients / --helpers: lists of peer ids (the two prefixes never collide)."""
    return {"valid": st.just([]), "edge": st.sampled_from([[prefix * 64], [f"{prefix}{k}" for k in range(L.max_named_peers)]]),
            "beyond": st.sampled_from([[prefix * 65], [f"{prefix}{k}" for k in range(L.max_named_peers + 1)]]),
            "absurd": st.sampled_from([[prefix * 100_000], [prefix] * 100_000]),
            "wrong": st.one_of(st.sampled_from([prefix, [1], [None], [[prefix]], {prefix: 1}]),
                               WRONG.filter(lambda v: not isinstance(v, list) or v == [1]))}


BACKWARD_AT = {
    "valid": st.just([]),
    "edge": st.sampled_from(["auto", [[1, 0]], [[0, 1]], [[1, 1]], [[0, 0], [1, 1]], [[L.max_layers - 1, 0]],
                             [[0, L.max_layers - 1]]]),
    "beyond": st.sampled_from([[[L.max_layers, 0]], [[0, L.max_layers]], [[1, 0], [1, 1]], [[-1, 0]], [[1]],
                               [[1, 2, 3]], [[True, 0]], [[1.0, 0]], "AUTO", "", "auto ", [[]], [None], [[1, None]]]),
    "absurd": st.sampled_from([[[10 ** 12, 0]], [[0, 2 ** 64]], [[10 ** 5000, 0]], [[NAN, 0]], [[0, 1]] * 5000]),
    "wrong": st.one_of(WRONG.filter(lambda v: not isinstance(v, (list, str))), st.just({"1": 0}),
                       st.sampled_from([[1], [None], ["auto"], [{"0": 1}], [[0, 1], 5]])),
}

# one entry per JobConfig field (asserted below, so a new field cannot be left out): categories of values
FIELDS: dict[str, dict] = {
    "seed": ints(st.integers(0, 1000), 0, L.max_seed),
    "epochs": ints(st.just(1), 1, L.max_epochs),
    "batch_size": ints(st.integers(1, 64), 1, L.max_batch_size),
    "eval_batch": ints(st.integers(1, 300), 1, L.max_batch_size),
    "microbatches": ints(st.integers(1, 4), 1, L.max_microbatches),
    "max_staleness": ints(st.integers(0, 2), 0, L.max_staleness),
    "lr": floats(st.floats(1e-4, 0.5), [5e-324, 1e-300, L.max_lr, 10], [0.0, -0.0, up(L.max_lr, INF), -1e-9, 11]),
    "momentum": floats(st.sampled_from([0.0, 0.5, 0.9, 0]), [0.0, -0.0, up(L.max_momentum, 0)],
                       [L.max_momentum, 1, up(L.max_momentum, 2), -5e-324, -1]),
    "weight_decay": floats(st.sampled_from([0.0, 1e-4]), [0.0, 0, L.max_weight_decay, 1],
                           [up(L.max_weight_decay, 2), -1e-300, 2]),
    "recv_timeout": floats(st.sampled_from([30.0, 120.0, 60]), [5e-324, L.max_recv_timeout, 1],
                           [0.0, -1.0, up(L.max_recv_timeout, INF), 0]),
    "peer_timeout": floats(st.sampled_from([10.0, 30.0, 5]), [1, 1.0, L.max_recv_timeout],
                           [0.5, 0.0, -1.0, up(L.max_recv_timeout, INF)]),
    "rejoin_timeout": floats(st.sampled_from([60.0, 0.0, 5]), [0, 0.0, L.max_recv_timeout],
                             [-1.0, -5e-324, up(L.max_recv_timeout, INF)]),
    "shuffle": {"valid": st.booleans(), "edge": st.booleans(), "beyond": st.sampled_from([0, 1, "true", "false"]),
                "absurd": st.sampled_from([10 ** 12, NAN]), "wrong": WRONG.filter(lambda v: type(v) is not bool)},
    "optimizer": names(["sgd", "adam"]),
    "scheme": names(list(SCHEMES)),
    "pipeline": names(list(PIPELINES)),
    "split": names(["planned", "even", "proportional"]),
    "wire_dtype": names(list(WIRE_DTYPES)),
    "compress": names(list(COMPRESSIONS)),
    "backward_at": BACKWARD_AT,
    "cut": CUT,
    "rounds": ints(st.integers(1, 2), 1, L.max_rounds),
    "local_steps": ints(st.integers(0, 2), 0, L.max_local_steps),
    "assign": names(list(ASSIGNS)),
    "clients": peer_names("c"),
    "helpers": peer_names("h"),
    "resolve_drift": floats(st.sampled_from([0.25, 0.5]), [5e-324, 1e308], [0.0, -1e-9, INF, -1]),
    "aux_head": names(list(AUX_HEADS)),
    "mixup_alpha": floats(st.sampled_from([0.2, 1.0]), [5e-324, 1e6], [0.0, -1.0, up(1e6, INF), INF]),
    "mix_updates": ints(st.integers(0, 2), 0, L.max_mix_updates),
    "model": None,   # below
}


# --- model specs ------------------------------------------------------------------------------------
def option(lo: int, hi: int, small) -> dict:
    return {"valid": small, "edge": st.sampled_from([lo, hi]), "beyond": st.sampled_from([lo - 1, hi + 1]),
            "absurd": ABSURD, "wrong": st.one_of(WRONG, st.sampled_from([float(lo), str(hi), True]))}


SMALL_OPTIONS = {"mlp": {"in_features": st.sampled_from([64, 64, 64, 32]), "depth": st.integers(0, 3),
                         "width": st.integers(1, 64), "classes": st.integers(10, 16) | st.just(2)},
                 "cnn": {"channels": st.integers(1, 8), "classes": st.integers(10, 16)},
                 # (their jobs are tested in test_gpt.py and test_resnet.py; fuzzed here are the options' bounds)
                 "gpt": {"blocks": st.integers(1, 2), "width": st.just(16), "heads": st.just(2),
                         "context": st.integers(1, 8), "vocab": st.just(256)},
                 "resnet": {"depth": st.just(18), "width": st.integers(1, 4), "classes": st.integers(10, 16),
                            "in_channels": st.just(3)}}
OPTIONS = {name: {k: option(lo, hi, SMALL_OPTIONS[name][k]) for k, (lo, hi) in bounds.items()}
           for name, bounds in L.model_options.items()}
MAX_NUMEL = L.max_input_numel
SHAPES = {
    "valid": st.just([64]),
    "edge": st.sampled_from([[1], [MAX_NUMEL], [1, 1, 1, 1], [4096, 4096], [1, 8, 8], [2, 32]]),
    "beyond": st.sampled_from([[], [0], [-1], [MAX_NUMEL + 1], [1, 1, 1, 1, 1], [4096, 4097], [64, 0]]),
    "absurd": st.sampled_from([[10 ** 12], [2 ** 63, 2 ** 63], [10 ** 5000], [NAN], [INF], [64] * 10_000]),
    "wrong": st.one_of(st.sampled_from([["64"], [64.0], [True], "64", 64, None, [[64]], {}, {"0": 64}]), JSON_JUNK),
}


def weighted(cats: dict, **weights) -> st.SearchStrategy:
    """One of a field's categories, each as many times as its weight (default 1)."""
    return st.one_of(*[s for k, s in cats.items() for _ in range(weights.get(k, 1))])


def _spec(name: str, mode: str) -> st.SearchStrategy:
    """A spec of built-in `name`: "small" (light, valid), "edge" (one option at a limit), "any"."""
    opts = OPTIONS[name]
    if mode == "small":
        return st.fixed_dictionaries({"name": st.just(name)}, optional={k: c["valid"] for k, c in opts.items()})
    if mode == "edge":
        return st.sampled_from(sorted(opts)).flatmap(lambda key: st.fixed_dictionaries(
            {"name": st.just(name), key: opts[key]["edge"]},
            optional={k: c["valid"] for k, c in opts.items() if k != key}))
    return st.fixed_dictionaries({"name": st.just(name)}, optional={
        **{k: weighted(c, valid=2) for k, c in opts.items()}, "input_shape": weighted(SHAPES, valid=2)})


DANGEROUS = [   # what a spec naming code could do if the agent ran it
    {"name": "os:system", "command": f"touch {MARKER}"},
    {"name": "subprocess:getoutput", "cmd": f"touch {MARKER}"},
    {"name": "subprocess:run", "args": ["touch", str(MARKER)]},
    {"name": "subprocess:Popen", "args": ["touch", str(MARKER)], "input_shape": [64]},
    {"name": "builtins:eval", "source": f"open({str(MARKER)!r}, 'w')"},
    {"name": "builtins:exec", "source": f"open({str(MARKER)!r}, 'w')"},
    {"name": "builtins:open", "file": str(MARKER), "mode": "w"},
    {"name": "pathlib:Path.touch", "self": str(MARKER)},
    {"name": "os:remove", "path": str(CANARY)},
    {"name": "shutil:rmtree", "path": str(CANARY.parent)},
    {"name": "os:_exit", "status": 3},
    {"name": "os:abort"},
    {"name": "os:kill", "pid": 0, "signal": 9},
    {"name": "sys:exit", "status": 3},
    {"name": "time:sleep", "secs": 3600},
    {"name": "torch:load", "f": str(MARKER)},
    {"name": "pickle:loads", "data": "x"},
    {"name": "importlib:import_module", "name2": "os"},
    {"name": "torch.nn:Linear", "in_features": 64, "out_features": 10, "input_shape": [64]},
    {"name": "pipeline.models:mlp", "depth": 1},
    {"name": "fuzzallowed:build"},                                  # allowed, but no such module
    {"name": "fuzzallowed.os:system", "command": f"touch {MARKER}"},
    {"name": "fuzzallowed_x:y", "input_shape": [64], "deep": [[[[1]]]]},
    {"name": "fuzzallowed:deep", "deep": nested(800)},
]
UNKNOWN_NAMES = ["", "MLP", "mlp ", " mlp", "mlp\x00", "cnn2", "x" * 5000, "os", "os:", ":system", "os::system",
                 "../os:system", "ü:ö", "os.:x", "1os:x", "os:system;id", "os:system\n", "mlp:mlp"]
SPECS = st.one_of(
    _spec("mlp", "small"), _spec("mlp", "small"), _spec("cnn", "small"),
    _spec("mlp", "edge"), _spec("cnn", "edge"), _spec("mlp", "any"), _spec("cnn", "any"),
    st.sampled_from(DANGEROUS), st.sampled_from(DANGEROUS),
    st.builds(lambda n, o: {"name": n, **o}, st.from_regex(CUSTOM_NAME, fullmatch=True).filter(lambda s: len(s) < 60),
              st.dictionaries(st.text(max_size=8).filter(lambda k: k != "name"), JSON_JUNK, max_size=3)),
    st.builds(lambda n, o: {"name": n, **o}, st.sampled_from(UNKNOWN_NAMES) | st.text(max_size=30),
              st.dictionaries(st.text(max_size=8).filter(lambda k: k != "name"), JSON_JUNK, max_size=2)),
    st.builds(lambda name, key, value: {"name": name, key: value}, st.sampled_from(sorted(OPTIONS)),
              st.sampled_from(["surprise", "input_features", "__init__", "self", "", "x" * 5000, "name\x00"]),
              JSON_JUNK),
    st.builds(lambda spec, shape: {**spec, "input_shape": shape}, _spec("mlp", "small") | _spec("cnn", "small"),
              weighted(SHAPES)),
    st.builds(lambda name: {"name": name}, WRONG),                  # a name that is not a name
    st.sampled_from(["mlp", "cnn", None, [], 5, {}, {"name": None}, {"Name": "mlp"}, [{"name": "mlp"}],
                     {"name": "mlp", "pad": "x" * L.max_spec_bytes}]),
    JSON_JUNK,
)
FIELDS["model"] = {"valid": st.one_of(_spec("mlp", "small"), _spec("mlp", "small"), _spec("cnn", "small")),
                   "edge": _spec("mlp", "edge") | _spec("cnn", "edge"), "beyond": SPECS, "absurd": SPECS,
                   "wrong": WRONG}
assert set(FIELDS) == {f.name for f in fields(JobConfig)}, \
    f"the fuzz strategy must cover every JobConfig field: missing {sorted({f.name for f in fields(JobConfig)} - set(FIELDS))}"
assert set(TYPES) <= set(FIELDS)
BAD = ("beyond", "absurd", "wrong")


@st.composite
def valid_configs(draw) -> dict:
    """A config within the limits (mostly small values, some at a limit): cross-field rules kept."""
    def value(name):
        return draw(weighted(FIELDS[name], valid=6, edge=1, beyond=0, absurd=0, wrong=0))
    cfg = {}
    for f in fields(JobConfig):
        if f.name in ("pipeline", "backward_at", "cut") or not draw(st.booleans()):
            continue
        cfg[f.name] = value(f.name)
    if cfg.get("scheme") == "fast-async":
        if draw(st.booleans()):
            cfg["pipeline"] = "1f1b"
        if draw(st.booleans()):
            cfg["backward_at"] = draw(FIELDS["backward_at"]["edge"] | FIELDS["backward_at"]["valid"])
    elif cfg.get("scheme") == "fast" and draw(st.booleans()):
        cfg["pipeline"] = draw(FIELDS["pipeline"]["valid"])
    elif cfg.get("scheme") in PARALLEL_SCHEMES:
        cfg.pop("microbatches", None)   # whole batches
        if draw(st.booleans()):
            cfg["cut"] = value("cut")
            if cfg["scheme"] in LOCAL_LOSS_SCHEMES:   # a single cut
                cfg["cut"] = cfg["cut"][:1]
    elif draw(st.booleans()):
        cfg["backward_at"] = []
    return cfg


def mutated(base: st.SearchStrategy) -> st.SearchStrategy:
    """A valid config with one field given a value beyond its limits, absurd or of the wrong type."""
    return st.tuples(base, st.sampled_from([f.name for f in fields(JobConfig)]), st.sampled_from(BAD)).flatmap(
        lambda t: FIELDS[t[1]][t[2]].map(lambda v: {**t[0], t[1]: v}))


ANY_CONFIG = st.fixed_dictionaries({}, optional={name: weighted(cats) for name, cats in FIELDS.items()})
EXTRA_KEYS = st.sampled_from(["nope", "Model", "__class__", "model.name", "", "ü", "epochs ", "x" * 1000])
CONFIGS = st.one_of(
    valid_configs(), valid_configs(), valid_configs(),
    mutated(valid_configs()), mutated(valid_configs()), mutated(valid_configs()),
    ANY_CONFIG,
    st.builds(lambda c, k, v: {**c, k: v}, valid_configs(), EXTRA_KEYS, JSON_JUNK),   # an unknown field
    st.one_of(st.sampled_from([None, [], "mlp", 1, True, [{"model": {"name": "mlp"}}]]), JSON_JUNK),  # not a map
)


# --- what the agent should answer ------------------------------------------------------------------
def dumps(obj) -> bytes:
    """JSON as Python writes it (NaN, Infinity), ints of any length included."""
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(obj).encode()
    finally:
        sys.set_int_max_str_digits(old)


def judge(config) -> tuple[str, object]:
    """("refused", why) for a config the agent must refuse (a 4xx), ("valid", JobConfig) for one within its
    limits, decided in process with the code the agent runs (after a JSON round trip, as it reads it)."""
    try:
        config = json.loads(dumps(config))   # raises for ints over 4300 digits, as the agent's json.loads does
    except (ValueError, RecursionError) as e:
        return "refused", f"not JSON: {e}"
    if not isinstance(config, dict):
        return "refused", "config is not a map"
    try:
        cfg = JobConfig.from_dict(config)
        check_job(cfg, ALLOWED)
    except Exception as e:   # ConfigError, SpecError (anything else would be the agent's 500, caught live)
        return "refused", f"{type(e).__name__}: {e}"
    return "valid", cfg


def layers_of(spec: dict) -> int | None:
    if spec["name"] == "mlp":
        return spec.get("depth", 2) + 1
    if spec["name"] == "cnn":
        return 4
    return None   # custom: refused, or not importable


def probe_seconds(cfg: JobConfig) -> float:
    """About how long the agent's profiling probe (pipeline.profiling.measure: a few timed forward and
    backward rounds of each layer that fits its budget, on one microbatch) takes on one core: from the
    layers' FLOPs (counted on the meta device) and the values they read and write; inf for many layers."""
    n = layers_of(cfg.model)
    if n is None:
        return 0.0
    if n > MAX_LAYERS_SENT:
        return INF
    try:
        sizes = footprint(cfg.model)
    except Exception:   # the spec does not build: the agent refuses it before measuring
        return 0.0
    rows = max(1, math.ceil(cfg.batch_size / cfg.microbatches))
    ratio = 2.0 if cfg.optimizer == "adam" else 1.0 if cfg.momentum > 0 else 0.0
    shapes = [input_shape(cfg.model)] + [s for s, _ in sizes]
    rounds, seconds = 3 * 5, 0.0   # forward and backward (twice the forward), of at least 5 rounds
    x = torch.empty((1, *shapes[0]), device="meta")
    with torch.device("meta"):
        for i, f in enumerate(layer_factories(cfg.model)):
            values = rows * (math.prod(shapes[i]) + math.prod(shapes[i + 1]))
            with FlopCounterMode(display=False) as counter:
                x = f()(x)
            if sizes[i][1] * (2 + ratio) + 2 * values * 4 <= BUDGET:
                seconds += rounds * (rows * counter.get_total_flops() / 20e9 + values * 10e-9)
    return seconds


# --- the live agents ---------------------------------------------------------------------------------
def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Reply:
    def __init__(self, status: int, ctype: str, body: bytes = b"", events: list | None = None, took: float = 0.0):
        self.status, self.ctype, self.body, self.events, self.took = status, ctype, body, events, took

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"Reply({self.status}, {self.ctype!r}, {self.body[:300]!r}, events={self.events}, took={self.took:.2f}s)"


def request(url: str, method: str, path: str, body: bytes = b"", timeout: float = REPLY_S,
            on_event=None) -> Reply:
    """One request; an NDJSON stream is read event by event (on_event(event) is called on each), each within
    `timeout` s. socket.timeout (a hang) propagates."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        ctype = r.getheader("Content-Type", "")
        if r.status == 200 and ctype.startswith("application/x-ndjson"):
            events = []
            while True:
                line = r.readline()
                if not line:
                    break
                events.append(json.loads(line))
                if on_event:
                    on_event(events[-1])
            return Reply(r.status, ctype, events=events, took=time.monotonic() - t0)
        return Reply(r.status, ctype, r.read(), took=time.monotonic() - t0)
    finally:
        conn.close()


def left_behind(ring) -> dict:
    """What jobs leave on the agents: their stages, the jobs they coordinate, their profiles on disk."""
    return {url: {"stages": (st := get_json(f"{url}/status", timeout=10))["stages"], "jobs": sorted(st["jobs"]),
                  "profiles": sorted(p.name for p in (ring.workdir / f"agent{k}" / "profiles").glob("*"))}
            for k, url in enumerate(ring.urls)}


def settled(urls: list[str]) -> None:
    """Until every job the agents coordinate has ended (done, failed or stopped) and no stage is left."""
    def quiet():
        for url in urls:
            st = get_json(f"{url}/status", timeout=10)
            if st["stages"] or any(j.get("event") not in ("done", "failed", "stopped") for j in st["jobs"].values()):
                return False
        return True
    wait_until(quiet, 60, "every job has ended and freed its stages")


def stages_left(urls: list[str], wait: float = 10.0) -> list:
    """Stages the agents still hold after a job ended, once they have had `wait` s to let go."""
    deadline = time.monotonic() + wait
    while True:
        left = [s for url in urls for s in get_json(f"{url}/status", timeout=10)["stages"]]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


ROUTES = [("/jobs", "job_start"), ("/plan", "job_start"), ("/job/profile", "job_profile")]


OUT_OF_MEMORY = ("allocate memory", "DefaultCPUAllocator", "MemoryError", "out of memory")


def check_reply(route: str, verdict: str, why, reply: Reply, n_layers: int | None) -> str:
    """Assert what the agent must answer; return the outcome's name for the tally."""
    assert reply.status < 500, f"{route}: a 5xx: {reply}"
    text = repr(reply.events) if reply.events is not None else reply.body.decode(errors="replace")
    assert not any(s in text for s in OUT_OF_MEMORY), f"{route}: allocated past its budget (RLIMIT_AS): {reply}"
    if 400 <= reply.status < 500:
        body = reply.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], reply
        assert isinstance(body.get("message"), str) and body["message"].strip(), reply
        if verdict == "refused" and "--allow-model" in why:   # custom code: refused as such
            assert "--allow-model" in body["message"], reply
        return f"{reply.status}"
    assert verdict == "valid", f"{route} accepted a config outside the limits ({why}): {reply}"
    assert reply.status == 200, reply
    if route == "/jobs":
        assert reply.events and all(isinstance(e, dict) and "event" in e for e in reply.events), reply
        assert reply.events[-1]["event"] in ("done", "failed", "stopped"), reply   # stopped: cancelled here
        started = any(e["event"] == "started" for e in reply.events)
        return f"200 {'started' if started else 'failed'}"
    body = reply.json()
    if route == "/plan":
        assert isinstance(body["rotations"], list) and len(body["ring"]) == 2, reply
    else:
        assert all(len(body["profile"][k]) == n_layers for k in ("forward_s", "param_bytes")), reply
    return "200"


def fuzz_settings(n: int) -> settings:
    scale = float(os.environ.get("SPLITRING_FUZZ_SCALE", "1"))
    # no shrinking: after a crash or a hang every later example fails too, so shrinking would shrink to any
    # example; the failing config is printed as drawn
    return settings(max_examples=max(1, int(n * scale)), deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False,
                    suppress_health_check=list(HealthCheck))


# --- tests -------------------------------------------------------------------------------------------
def test_the_strategy_covers_every_job_config_field():
    assert set(FIELDS) == {f.name for f in fields(JobConfig)}
    for name, cats in FIELDS.items():
        assert set(cats) == {"valid", "edge", "beyond", "absurd", "wrong"}, name


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(valid_configs())
def test_the_valid_strategy_draws_configs_within_the_limits(config):
    verdict, why = judge(config)
    assert verdict == "valid", (config, why)


@settings(max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_every_bad_value_of_every_field_is_refused_in_process(data):
    """The strategy's beyond/absurd/wrong values are what they say: each, in a valid config, is refused."""
    base = data.draw(valid_configs())
    name = data.draw(st.sampled_from(sorted(set(FIELDS) - {"model"})))   # model: every kind of spec, below
    if name == "backward_at":   # needs fast-async to be judged on its own
        base = {**base, "scheme": "fast-async", "pipeline": "1f1b"}
    value = data.draw(FIELDS[name][data.draw(st.sampled_from(BAD))])
    verdict, why = judge({**base, name: value})
    assert verdict == "refused", ({**base, name: value}, why)


@pytest.mark.parametrize("spec", DANGEROUS, ids=lambda spec: spec["name"])
def test_specs_naming_code_are_refused_in_process_unless_allowed(spec):
    verdict, why = judge({"model": spec})
    if any(fnmatch.fnmatchcase(spec["name"], p) for p in ALLOWED):
        assert verdict == "valid", why     # allowed, and refused live when the agent cannot import it
    else:
        assert verdict == "refused", why


@pytest.fixture
def fuzz_ring(start_ring):
    WORK.mkdir(parents=True, exist_ok=True)
    CANARY.parent.mkdir(parents=True, exist_ok=True)
    CANARY.write_text("keep")
    MARKER.unlink(missing_ok=True)
    ring = start_ring([["--data", "digits", "--shard", f"{k}/2", "--memory-budget", str(BUDGET),
                        *[a for p in ALLOWED for a in ("--allow-model", p)]] for k in range(2)])
    yield ring
    shutil.rmtree(WORK, ignore_errors=True)


def warm_up(ring) -> None:
    """A finished job, a plan, a profile and some refusals, so that what the agents load once is loaded."""
    url = ring.urls[0]
    for cfg in ({"model": {"name": "mlp", "depth": 1}, "epochs": 1}, {"model": {"name": "cnn", "channels": 2}}):
        reply = request(url, "POST", "/jobs", dumps({"v": 1, "type": "job_start", "config": cfg}), timeout=120)
        assert reply.status == 200 and reply.events[-1]["event"] == "done", reply
    for route, kind in ROUTES[1:]:
        assert request(url, "POST", route, dumps({"v": 1, "type": kind, "config": {}})).status == 200
    for cfg in ({"epochs": 0}, {"model": {"name": "os:system"}}, {"lr": NAN}, {"model": {"name": "fuzzallowed:x"}}):
        assert request(url, "POST", "/jobs", dumps({"v": 1, "type": "job_start", "config": cfg})).status == 409


def test_fuzzed_job_configs_against_live_agents(fuzz_ring):
    ring = fuzz_ring
    url, urls = ring.urls[0], ring.urls
    pids = [a.proc.pid for a in ring.agents]
    warm_up(ring)
    for pid in pids:   # allocating past the budget fails in the agent (a finding) instead of on this machine
        limit = vm_kib(pid, "VmSize") * 1024 + AS_HEADROOM
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    rss_before = [vm_kib(pid, "VmRSS") for pid in pids]
    try:   # the peak (VmHWM) from here on
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        peak_known = True
    except OSError:
        peak_known = False
    tally: Counter = Counter()
    t_start = time.monotonic()

    @fuzz_settings(EXAMPLES)
    @given(config=CONFIGS)
    def example(config):
        verdict, why = judge(config)
        n_layers = None
        if verdict == "valid":
            if probe_seconds(why) > HEAVY_S:
                tally["valid but heavy: not sent"] += 1
                assume(False)
            n_layers = layers_of(why.model)
        tally[verdict] += 1
        note(f"verdict: {verdict}: {why}")
        for route, kind in ROUTES:
            body = dumps({"v": 1, "type": kind, "config": config})
            started = []

            def on_event(event):   # a job that starts is cancelled at once: a valid config may ask for a lot
                if event.get("event") == "started" and not started:
                    started.append(event["job"])
                    cancel = request(url, "POST", f"/jobs/{event['job']}/cancel", timeout=10)
                    assert cancel.status == 200, cancel

            before = left_behind(ring) if verdict == "refused" else None
            try:
                reply = request(url, "POST", route, body, on_event=on_event)
            except TimeoutError:
                raise AssertionError(f"{route}: no answer (or no next event) within {REPLY_S} s") from None
            note(f"{route}: {reply}")
            tally[f"{route} {check_reply(route, verdict, why, reply, n_layers)}"] += 1
            if before is not None:   # refused before anything was made for it, on any agent
                assert left_behind(ring) == before, f"{route}: a refused config left something behind: {reply}"
            assert all(a.proc.poll() is None for a in ring.agents), \
                f"{route}: an agent died: {[a.proc.returncode for a in ring.agents]}"
            if route == "/jobs" and reply.status == 200:
                assert stages_left(urls) == [], f"stages left behind by {reply}"
        assert not MARKER.exists(), "code named by a request ran"
        assert CANARY.exists(), "code named by a request ran"

    with StatusWatch(urls) as poller:
        example()          # loads what these configs need once (kernels, caches, allocator arenas) ...
        settled(urls)
        rss_mid = [vm_kib(pid, "VmRSS") for pid in pids]
        example()          # ... so that what stays after the same configs again is kept per request: a leak
    elapsed = time.monotonic() - t_start
    settled(urls)
    rss_after = [vm_kib(pid, "VmRSS") for pid in pids]
    peak = [vm_kib(pid, "VmHWM") for pid in pids]
    profiles = [len(list((ring.workdir / f"agent{k}" / "profiles").glob("*"))) for k in range(len(pids))]
    print(f"\n{sum(tally[v] for v in ('valid', 'refused'))} configs in {elapsed:.1f} s: {dict(sorted(tally.items()))}; "
          f"/status slowest {poller.slowest:.3f} s of {poller.count}; RSS KiB {rss_before} -> {rss_mid} -> {rss_after} "
          f"(peak {peak}); profiles cached on disk: {profiles}")
    assert all(a.proc.poll() is None for a in ring.agents)
    assert not poller.errors, poller.errors[:5]
    assert poller.count > 0   # answered throughout (each answer within StatusWatch's 10 s, or an error above)
    for before, mid, after in zip(rss_before, rss_mid, rss_after):
        assert (after - mid) * 1024 < RSS_REPEAT, f"agent RSS grew from {mid} KiB to {after} KiB on the same configs again"
        assert (after - before) * 1024 < RSS_GROWTH, f"agent RSS grew from {before} KiB to {after} KiB"
    if peak_known:
        for before, top in zip(rss_before, peak):
            assert (top - before) * 1024 < PEAK_OVER, \
                f"agent RSS peaked at {top} KiB, {(top - before) >> 10} MiB over its start, with a budget of {BUDGET >> 20} MiB"
    assert not MARKER.exists() and CANARY.exists()
    assert tally["valid"] > 0 and tally["refused"] > 0
    jobs = get_json(f"{url}/status", timeout=10)["jobs"]
    assert len(jobs) <= L.kept_jobs + 1
