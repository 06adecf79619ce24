"""Faults injected at exact moments, for tests only: SPLITRING_TEST_FAULT, unset in normal use, is a
comma-separated list of ACTION:POINT:N, "at the N-th time this agent reaches POINT, do ACTION":

    kill:swap_receive:2    SIGKILL this agent (swap_receive: a layer transfer read but not kept;
                           commit: its checkpoint written, not replicated or acknowledged)
    corrupt:swap_receive:1 change one value of the layer state received, before it is verified
                           (corrupted in transit)
    lie:swap_receive:1     answer a layer transfer with a checksum other than the one computed (a
                           receiver whose copy is not what was sent)
    dup:send_fwd:3         send the 3rd fwd message twice in a row (send_bwd: bwd messages)
    replay:send_fwd:3      send the 3rd fwd message again, just before the next fwd message
    hold:rotation:4        the coordinator waits, before its 4th rotation, until the job is stopped (so a
                           stop surely finds the job running, however slowly the stop comes)
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import torch

log = logging.getLogger("splitring.faults")
ACTIONS = ("kill", "corrupt", "lie", "dup", "replay", "hold")


def parse(text: str) -> dict[tuple[str, int], str]:
    """{(point, n): action} from ACTION:POINT:N,..."""
    faults = {}
    for item in filter(None, text.split(",")):
        action, point, n = item.split(":")
        if action not in ACTIONS:
            raise ValueError(f"SPLITRING_TEST_FAULT: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        faults[(point, int(n))] = action
    return faults


FAULTS = parse(os.environ.get("SPLITRING_TEST_FAULT", ""))
_reached: dict[str, int] = {}


def reach(point: str) -> str | None:
    """Count one more arrival at `point`; the action due now, if any (kill is done here)."""
    if not FAULTS:
        return None
    _reached[point] = _reached.get(point, 0) + 1
    action = FAULTS.get((point, _reached[point]))
    if action:
        log.warning("test fault: %s at %s:%d", action, point, _reached[point])
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return action


async def hold() -> None:
    """Wait until cancelled."""
    await asyncio.get_running_loop().create_future()


def corrupt(state: dict) -> bool:
    """Change one value of the first floating-point tensor in a nested dict (a changed copy replaces it);
    whether there was one."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            state[k] = v.clone()
            state[k].view(-1)[0] += 1.0
            return True
        if isinstance(v, dict) and corrupt(v):
            return True
    return False
