"""Every control-plane call, declared once: its route, the request message it takes (protocols.messages
SCHEMAS), the reply it gives, and whether the reply is a stream of events. The agent's routes and every
client (agents, the CLI) are derived from these declarations, and replies and events are checked like
requests (`check_reply`, `check_event`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols.errors import ProtocolError
from protocols.messages import Bool, Dict, Float, Int, List, Str, check_fields

Opt = type(None)   # in a reply schema, (T, Opt): a T or null


@dataclass(frozen=True)
class Call:
    name: str                        # how clients name it
    method: str                      # HTTP method
    path: str                        # route; {job} is the job id
    request: str | None              # the request message type (None: no body)
    reply: dict[str, Any] = field(default_factory=dict)   # required reply fields and their types
    stream: bool = False             # the reply is NDJSON events, each checked by check_event
    events: frozenset[str] = frozenset()   # the event names a stream may carry

    def url_path(self, **params) -> str:
        return self.path.format(**params)


JOB_EVENTS = frozenset({"accepted", "started", "plan", "swap", "step", "epoch", "schedule", "round", "done", "failed",
                        "lost", "rollback", "rejoined", "resumed", "replanned", "stopped"})
PASS_EVENTS = frozenset({"stage_step", "step", "end", "error"})
ROUND_EVENTS = frozenset({"client_step", "end", "error"})

CALLS: dict[str, Call] = {c.name: c for c in [
    # a user's (or the CLI's) calls to any peer; status answers anyone its public part, ring members the rest
    Call("status", "GET", "/status", None, {"peer": Str, "ring": Str, "version": Int, "capabilities": List}),
    Call("start_job", "POST", "/jobs", "job_start", stream=True, events=JOB_EVENTS),
    Call("plan_job", "POST", "/plan", "job_start", {"ring": List, "rotations": List}),
    Call("cancel_job", "POST", "/jobs/{job}/cancel", None, {"cancelled": Str, "coordinator": Str}),
    Call("resume_job", "POST", "/jobs/{job}/resume", None, stream=True, events=JOB_EVENTS),
    Call("job", "GET", "/jobs/{job}", None, {"job": Str, "events": List, "summary": (Dict, Opt)}),
    Call("follow_job", "GET", "/jobs/{job}/events", None, stream=True, events=JOB_EVENTS),
    Call("jobs", "GET", "/jobs", None, {"jobs": List}),
    Call("journal", "GET", "/jobs/{job}/journal", None, {"journal": (Dict, Opt)}),
    Call("job_view", "POST", "/jobs/{job}/view", "job_view", {"job": Str, "view": Dict}),   # for a dashboard
    Call("data_probe", "POST", "/data/probe", "data_probe", {"url": Str, "bytes": Int, "count": Int,
                                                             "seconds": Float}),
    # a coordinator's calls to the peers of its job
    Call("prepare", "POST", "/job/prepare", "job_prepare", {"samples": Int, "test_samples": Int}),
    Call("profile", "POST", "/job/profile", "job_profile", {"memory_budget": (Int, Opt), "profile": Dict,
                                                            "samples": Int, "test_samples": Int,
                                                            "pending_messages": Int}),
    Call("commit", "POST", "/job/commit", "job_commit", {"layers": List, "checksum": Str}),
    Call("heartbeat", "POST", "/job/heartbeat", "job_heartbeat", {"known": Bool, "attempt": (Int, Opt)}),
    Call("journal_put", "POST", "/job/journal", "journal_put", {"saved": Bool}),
    Call("run_pass", "POST", "/job/pass", "job_pass", stream=True, events=PASS_EVENTS),
    Call("swap_send", "POST", "/job/swap/send", "swap_send", {"sent": Int}),
    Call("abort", "POST", "/job/abort", "job_abort", {"aborted": Bool}),
    Call("end", "POST", "/job/end", "job_end", {"ended": Bool}),
    # the dashboard's: a stage's per-action trace of its last training steps, on its own clock (now)
    Call("trace", "GET", "/job/{job}/trace", None, {"now": Float, "spans": List}),
    # client/helper schemes (peer/parallel.py): a round's facts, running it, and the parts averaged or relayed
    Call("round_plan", "POST", "/job/round/plan", "round_plan", {"role": Str}),
    Call("run_round", "POST", "/job/round", "run_round", stream=True, events=ROUND_EVENTS),
    Call("part_set", "POST", "/job/part", "part_set", {"layers": List}),
    # a peer's call to another at a swap
    Call("swap_receive", "POST", "/job/swap/receive", "swap_receive", {"checksum": Str}),
    Call("replica_put", "POST", "/job/replica", "replica_put", {"received": Int, "checksum": (Str, Opt)}),
]}

# what each event carries (beyond "event"), checked as replies are
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "accepted": {"job": Str},   # a job's first event, before its ring is prepared: its id, so Ctrl-C can stop it
    "started": {"job": Str, "ring": List, "coordinator": Str, "urls": Dict, "missing": List, "layers": Int,
                "samples": Dict, "config": Dict, "total_steps": Int},
    "plan": {"rotation": Int, "ranges": Dict, "predicted_step_s": Float, "bytes_moved": Int, "backward_at": List},
    "swap": {"rotation": Int, "layers_moved": Int, "bytes_moved": Int},
    "step": {"step": Int, "steps": Int, "loss": Float},
    "epoch": {"epoch": Int, "loss": (Float, Opt), "accuracy": (Float, Opt)},
    "done": {"summary": Dict},
    "failed": {"error": Str},
    "stage_step": {"step": Int, "stage": Int, "staleness": Int},
    "schedule": {"round": Int, "assignment": Dict, "orders": Dict, "predicted_s": Float, "resolved": Bool},
    "round": {"round": Int, "loss": (Float, Opt), "accuracy": (Float, Opt), "makespan_s": Float,
              "predicted_s": Float, "helper_busy": Dict},
    "client_step": {"client": Str, "step": Int, "samples": Int, "loss": Float},
    "end": {},
    "error": {"error": Str},
    # recovery (peer/coordinator.py): a peer lost, the rollback to the last commit, a peer back, the job going on
    "lost": {"peer": Str, "error": Str},
    "rollback": {"rotation": (Int, Opt)},
    "rejoined": {"peer": Str},
    "resumed": {"rotation": (Int, Opt), "attempt": Int},
    "replanned": {"lost": List, "ring": List, "skipped": List, "total_steps": Int},
    "stopped": {"job": Str, "rotation": (Int, Opt), "reason": Str},
}


def check_reply(call: Call, reply: Any) -> dict:
    """The reply of a call if it is what the call declares; ProtocolError("bad_reply") otherwise."""
    if not isinstance(reply, dict):
        raise ProtocolError("bad_reply", f"{call.name}: the reply is not a map")
    check_fields(reply, call.reply, f"{call.name} reply", "bad_reply")
    return reply


def check_event(call: Call, event: Any) -> dict:
    """One event of a streaming call's reply, checked against its declaration. A pass stream's failure is
    {"error": ...} without an "event" name."""
    if not isinstance(event, dict):
        raise ProtocolError("bad_reply", f"{call.name}: an event is not a map")
    name = event.get("event", "error" if "error" in event else None)
    if name not in call.events:
        raise ProtocolError("bad_reply", f"{call.name}: unexpected event {name!r}")
    check_fields(event, EVENT_FIELDS[name], f"{call.name} event {name!r}", "bad_reply")
    return event
