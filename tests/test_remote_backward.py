"""The remote backward's messages (input, weights, lend, return) as a receiving peer checks them: who may
send what for which stage, with which shapes. Each bad message gets a clear error and changes nothing."""
import asyncio

import pytest
import torch

from peer.worker import JobRuntime
from pipeline import schedule as S
from pipeline.config import JobConfig
from pipeline.data import empty
from pipeline.stage import Stage
from protocols import ProtocolError, message

SPEC = {"name": "mlp", "depth": 5, "width": 64}
CFG = JobConfig(model=SPEC, scheme="fast-async", batch_size=64, microbatches=2, backward_at=[[1, 2]])
RANGES = {"p0": (0, 2), "p1": (2, 4), "p2": (4, 6)}


def runtime(me: str) -> JobRuntime:
    ring = [{"peer": p, "url": f"http://{p}"} for p in RANGES]
    rt = JobRuntime("j", CFG, me, ring, "p0", empty(), links=None, client=None, compute=None, state_dir=None)
    rt.rotation, rt.chain, rt.ranges, rt.head_samples = 0, list(RANGES), dict(RANGES), 128
    rt.roles_of = {"train": S.Roles(3, {1: 2}), "eval": S.Roles(3)}
    return rt


def state(a: int, b: int) -> dict:
    return Stage.build(CFG, a, b).export()


def weights(a: int, b: int) -> dict:
    return Stage.build(CFG, a, b).snapshot()


common = dict(job="j", rotation=0, step=0)
GOOD = [   # (receiving peer, sender, message): all accepted
    ("p2", "p1", message("input", **common, mb=0, stage=1, x=torch.zeros(32, 64))),
    ("p2", "p1", message("lend", **common, stage=1, layers=state(2, 4))),
    ("p1", "p2", message("weights", **common, stage=1, weights=weights(2, 4))),
    ("p1", "p2", message("return", **{**common, "step": 2}, stage=1, layers=state(2, 4))),
    ("p0", "p2", message("bwd", **common, mb=0, stage=0, grad=torch.zeros(32, 64))),   # from stage 1's backward
]
BAD = [   # (receiving peer, sender, message, error code, words of the message)
    ("p2", "p0", message("input", **common, mb=0, stage=1, x=torch.zeros(32, 64)), "unexpected", "from p0"),
    ("p2", "p1", message("input", **common, mb=0, stage=1, x=torch.zeros(32, 7)), "bad_shape", "[32, 64]"),
    ("p2", "p1", message("input", **common, mb=0, stage=7, x=torch.zeros(32, 64)), "unexpected", "stage 7"),
    ("p2", "p1", message("weights", **common, stage=1, weights=weights(2, 4)), "unexpected", "weights"),
    ("p2", "p1", message("lend", **common, stage=1, layers=state(2, 3)), "bad_shape", "layers [2,4)"),
    ("p2", "p1", message("lend", **common, stage=1, layers={**state(2, 4), 3: {"params": {}, "optim": {}}}),
     "bad_shape", "layer 3"),
    ("p1", "p2", message("weights", **common, stage=1, weights={2: weights(2, 3)[2], 3: {"0.weight": torch.zeros(3)}}),
     "bad_shape", "layer 3"),
    ("p1", "p2", message("return", **{**common, "step": 9}, stage=1, layers=state(2, 4)), "unexpected", "step"),
    ("p0", "p1", message("bwd", **common, mb=0, stage=0, grad=torch.zeros(32, 64)), "unexpected", "from p1"),
    ("p1", "p2", message("bwd", **common, mb=0, stage=1, grad=torch.zeros(32, 64)), "unexpected", "bwd"),
]


@pytest.mark.parametrize("me,sender,msg", GOOD, ids=[m["type"] for _, _, m in GOOD])
def test_the_remote_backward_messages_are_delivered(me, sender, msg):
    async def go():
        rt = runtime(me)
        await rt.deliver(sender, msg)
        return [k for k, f in rt.mailbox.slots.items() if f.done()]
    box = f"{msg['type']}@{msg['stage']}"
    assert asyncio.run(go()) == [(0, "train", msg["step"], box, msg.get("mb", 0))]


@pytest.mark.parametrize("me,sender,msg,code,words", BAD, ids=[f"{m['type']}-{c}" for _, _, m, c, _ in BAD])
def test_bad_remote_backward_messages_are_refused_clearly(me, sender, msg, code, words):
    async def go():
        rt = runtime(me)
        with pytest.raises(ProtocolError) as e:
            await rt.deliver(sender, msg)
        return e.value, rt.mailbox.slots
    err, slots = asyncio.run(go())
    assert err.code == code and words in err.message and not slots
