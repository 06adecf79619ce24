"""Every limit an agent enforces on what it receives, with its default, in one place.

Not a knob: a fwd/bwd tensor must have exactly the dtype and shape the receiving stage expects for its
step and microbatch (peer.worker.JobRuntime.accept), so the largest tensor accepted is 1x the expected one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from pipeline.config import ConfigError, JobConfig
from pipeline.models import BUILTIN, check_allowed


@dataclass(frozen=True)
class Limits:
    # largest data-plane frame (header + tensor payloads); larger ones are refused before their
    # payloads are read
    max_frame: int = 1 << 30
    # largest control-API request body; swaps carry a stage's layer state through it
    max_control_body: int = 1 << 30
    # data-plane messages of one job and kind (fwd, bwd) waiting unread; the connection is not
    # read further until there is room, so a neighbour cannot queue more than this (and a plan keeps
    # room for them in the peer's memory budget: pipeline.jobplan.kept_room)
    pending_messages: int = 4
    # new data-plane connections and refused (unauthenticated) requests per second from one remote
    # address, with a burst allowance; more are answered 429 without further work
    connections_per_s: float = 20.0
    connection_burst: int = 50
    # seconds a new data-plane connection has to prove itself (hello, and auth in a ring with a secret);
    # one that has not is closed, so idle unauthenticated connections cannot pile up
    handshake_s: float = 10.0


LIMITS = Limits()


class RateLimiter:
    """A token bucket per remote address (pure: the caller passes the clock)."""

    def __init__(self, rate: float, burst: int, max_remotes: int = 10_000):
        self.rate, self.burst, self.max_remotes = rate, burst, max_remotes
        self.buckets: dict[str, tuple[float, float]] = {}  # remote -> (tokens, at)

    def allow(self, remote: str, now: float) -> bool:
        tokens, at = self.buckets.get(remote, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if len(self.buckets) >= self.max_remotes and remote not in self.buckets:
            # forget full buckets (remotes that have been quiet) to stay bounded
            self.buckets = {r: b for r, b in self.buckets.items()
                            if b[0] + (now - b[1]) * self.rate < self.burst}
        ok = tokens >= 1
        self.buckets[remote] = (tokens - 1 if ok else tokens, now)
        return ok


@dataclass(frozen=True)
class JobLimits:
    """What an agent accepts in a job, checked before anything is built or allocated (check_job). A value
    outside these is refused with a message naming the field and its limit."""
    max_epochs: int = 100_000
    max_rounds: int = 100_000          # client/helper schemes
    max_local_steps: int = 100_000
    max_named_peers: int = 1_024       # in --clients, and in --helpers
    max_mix_updates: int = 64          # locfedmix
    max_batch_size: int = 65_536
    max_microbatches: int = 1_024
    max_lr: float = 10.0               # learning rates above this diverge on every model we ship
    max_momentum: float = 1.0          # exclusive: momentum 1 never forgets a gradient
    max_weight_decay: float = 1.0
    max_staleness: int = 16
    max_recv_timeout: float = 3_600.0
    max_seed: int = 2**32 - 1
    max_layers: int = 4_096            # layers of a model (built-in or custom)
    max_spec_bytes: int = 4_096        # the model spec as JSON
    max_input_numel: int = 1 << 24     # values in one input sample
    # built-in models' options: (lowest, highest), integers
    model_options: dict = field(default_factory=lambda: {
        "mlp": {"in_features": (1, 1 << 20), "depth": (0, 1_024), "width": (1, 1 << 16), "classes": (2, 1 << 20)},
        "cnn": {"channels": (1, 1_024), "classes": (2, 1 << 20)},
        "gpt": {"blocks": (1, 1_024), "width": (1, 1 << 15), "heads": (1, 1_024), "context": (1, 1 << 16),
                "vocab": (2, 1 << 20)},
        "resnet": {"depth": (18, 34), "width": (1, 1_024), "classes": (2, 1 << 20), "in_channels": (1, 64)},
    })
    # finished models the coordinator keeps on disk (its state dir's models/), and for how long
    kept_models: int = 20
    kept_model_s: float = 7 * 24 * 3600.0
    # measured layer costs an agent keeps on disk (its state dir's profiles/), one per model spec, microbatch
    # size, optimizer, seed and budget: the newest
    kept_profiles: int = 64
    # finished jobs whose events and summary a coordinator keeps in memory (for /jobs/ID and /status)
    kept_jobs: int = 64
    # finished jobs (done or failed) whose last commit's files and journal a peer keeps in its state dir
    kept_job_files: int = 20
    # plans listed in a job's summary (the first rotations'; the rest are counted)
    summary_plans: int = 64


JOB_LIMITS = JobLimits()


def check_job(cfg: JobConfig, allowed_models=(), limits: JobLimits = JOB_LIMITS) -> None:
    """Refuse a job config (pipeline.config.JobConfig, already type-checked) whose values are outside the
    limits, or whose model is custom code the agent's owner has not allowed. Pure and cheap: nothing is
    imported or built here. Raises ConfigError or SpecError."""
    L = limits
    checks = [
        (cfg.epochs <= L.max_epochs, f"epochs must be <= {L.max_epochs}"),
        (cfg.rounds <= L.max_rounds, f"rounds must be <= {L.max_rounds}"),
        (cfg.local_steps <= L.max_local_steps, f"local_steps must be <= {L.max_local_steps}"),
        (max(len(cfg.clients), len(cfg.helpers)) <= L.max_named_peers and
         all(len(p) <= 64 for p in cfg.clients + cfg.helpers),
         f"clients and helpers each name at most {L.max_named_peers} peers of up to 64 characters"),
        (all(v < L.max_layers for v in cfg.cut), f"cut must be < {L.max_layers}"),
        (cfg.mix_updates <= L.max_mix_updates, f"mix_updates must be <= {L.max_mix_updates}"),
        (cfg.mixup_alpha <= 1e6, "mixup_alpha must be <= 1e6"),
        (cfg.batch_size <= L.max_batch_size, f"batch_size must be <= {L.max_batch_size}"),
        (cfg.eval_batch <= L.max_batch_size, f"eval_batch must be <= {L.max_batch_size}"),
        (cfg.microbatches <= L.max_microbatches, f"microbatches must be <= {L.max_microbatches}"),
        (cfg.lr <= L.max_lr, f"lr must be <= {L.max_lr}"),
        (cfg.momentum < L.max_momentum, f"momentum must be < {L.max_momentum}"),
        (cfg.weight_decay <= L.max_weight_decay, f"weight_decay must be <= {L.max_weight_decay}"),
        (cfg.max_staleness <= L.max_staleness, f"max_staleness must be <= {L.max_staleness}"),
        (cfg.recv_timeout <= L.max_recv_timeout, f"recv_timeout must be <= {L.max_recv_timeout:.0f} s"),
        (max(cfg.peer_timeout, cfg.rejoin_timeout) <= L.max_recv_timeout,
         f"peer_timeout and rejoin_timeout must be <= {L.max_recv_timeout:.0f} s"),
        (cfg.seed <= L.max_seed, f"seed must be <= {L.max_seed}"),
        (cfg.backward_at == "auto" or all(v < L.max_layers for p in cfg.backward_at for v in p),
         "backward_at names chain positions beyond any ring"),
    ]
    for ok, text in checks:
        if not ok:
            raise ConfigError(text)
    spec = cfg.model
    try:
        size = len(json.dumps(spec))
    except (TypeError, ValueError, RecursionError):
        raise ConfigError("the model spec must be plain JSON values") from None
    if size > L.max_spec_bytes:
        raise ConfigError(f"the model spec is {size} bytes as JSON, more than {L.max_spec_bytes}")
    check_allowed(spec, allowed_models)
    if "input_shape" in spec:
        shape = spec["input_shape"]
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(type(d) is int and d >= 1 for d in shape)
                and math.prod(shape) <= L.max_input_numel):
            raise ConfigError(f"input_shape must be a list of 1 to 4 positive integers with at most "
                              f"{L.max_input_numel} values in all, got {shape!r}")
    if spec["name"] in BUILTIN:
        bounds = L.model_options.get(spec["name"], {})
        for key, value in spec.items():
            if key in ("name", "input_shape"):
                continue
            if key not in bounds:
                raise ConfigError(f"model {spec['name']!r} has no option {key!r} (it has {', '.join(sorted(bounds))})")
            lo, hi = bounds[key]
            if type(value) is not int or not lo <= value <= hi:
                raise ConfigError(f"model option {key} must be an integer from {lo} to {hi}, got {value!r}")

