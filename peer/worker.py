"""One job as seen by one peer: its stage, the chain of the current rotation, and how it runs a pass,
an evaluation and a swap. Decisions come from the coordinator; the math from pipeline."""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import time

import torch

from pipeline import schedule as S
from pipeline.admission import Admission, MessageKey, Mode, box_of
from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes, microbatch_sizes, pass_order
from pipeline.execute import Recv, Send, StepDone, run_backward_role, run_forward_role, run_program
from pipeline.local import make_step_input
from pipeline.models import activation_shapes, build_layer, input_shape
from pipeline.stage import Stage, checksum, peer_memory
from peer.client import JobError, PeerClient
from peer.dataplane import MAILBOX_LIMIT, Links, Mailbox, wire_policy
from peer.state import REPLICA_PART
from peer.trace import Trace
from protocols import ProtocolError, message

log = logging.getLogger("splitring.worker")
TRANSFER_S = 600.0   # deadline of moving a stage's state to another peer (a swap, a replica)
LABELS = {"fwd": "F", "bwd": "B"}


def state_bytes(exported) -> int:
    """Bytes of exported layers' tensors (Stage.export's entries: params, optimizer state; None: on disk)."""
    return sum(t.numel() * t.element_size() for e in exported if e is not None
               for t in [*e["params"].values(), *(v for s in e["optim"].values() for v in s.values())]
               if torch.is_tensor(t))


def peak_rss() -> int:
    """The most resident memory this process has had, in bytes (the kernel's count: tensors, libraries,
    everything)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def label(kind: str, mb: int) -> str:
    """A traced action's label: the message it computed, awaited or sent (F3: microbatch 3's forward)."""
    return f"{LABELS.get(kind, kind)}{mb}"


class JobRuntime:
    def __init__(self, job: str, cfg: JobConfig, me: str, ring: list[dict], coordinator: str,
                 data: Dataset, links: Links, client: PeerClient, compute, state_dir,
                 memory_budget: int | None = None, sizes: list | None = None, attempt: int = 0,
                 pending_messages: int = MAILBOX_LIMIT):
        """sizes: pipeline.models.footprint of the job's model, if the caller has it already. attempt: how many
        times the job was resumed (its stage messages carry it: an earlier attempt's are refused)."""
        self.job, self.cfg, self.me, self.attempt = job, cfg, me, attempt
        self.heard = time.monotonic()   # when the coordinator was last heard from (see WorkService.watch)
        self.urls = {p["peer"]: p["url"] for p in ring}
        self.ring = [p["peer"] for p in ring]
        self.coordinator = coordinator
        self.data, self.links, self.client, self.state_dir = data, links, client, state_dir
        self._compute = compute  # async callable(fn, *args): runs fn on the agent's compute thread
        self.memory_budget = memory_budget
        self.peak_memory = 0   # most bytes held in a pass, as the budget counts them (accounted only under a budget)
        self.peak_swap = 0     # most bytes held at a swap or commit (old layers and received ones; under a budget)
        self.spilled = 0       # layers received in swaps that waited on disk for the commit (at the budget)
        outputs = [shape for shape, _ in sizes] if sizes is not None else activation_shapes(cfg.model)
        self.shapes = [input_shape(cfg.model)] + outputs  # shapes[i] = input of layer i
        self.stage = Stage(cfg, {})
        self.restored = False   # the stage came from checkpoints (restore), not from (spec, seed)
        self.pending: dict[int, dict[int, dict]] = {}   # rotation -> received layers awaiting commit
        self.rotation = self.version = self.epoch = -1
        self.chain: list[str] = []
        self.roles_of = {"train": S.Roles(0), "eval": S.Roles(0)}   # this rotation's, per mode (see roles)
        self.ranges: dict[str, tuple[int, int]] = {}
        self.head_samples = self.head_test_samples = 0
        self.mailbox = Mailbox(pending_messages)   # (the plan keeps room for them: pipeline.jobplan.kept_room)
        self.stage_bytes = 0  # what this peer's stages held at their last change (see _drive.account)
        self.peak_stage = 0   # the most of it: peak_memory less the messages waiting unread
        self._shapes_of: dict[tuple, dict] = {}
        self.backward_roles: dict[int, Stage] = {}   # program -> stage: other stages' backward run here (this pass)
        self.progress = {"rotation": -1, "step": 0, "loss": None}
        self.trace = Trace()   # what each action of this peer's passes took (busy, waiting, sending)
        self.task: asyncio.Task | None = None

    # --- helpers ------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.chain.index(self.me) if self.me in self.chain else -1

    # --- ownership: commit a rotation's assignment ---------------------------------------------
    def restore(self, version: int, attempt: int, checksums: dict, adopt: list) -> dict:
        """Resuming a job: this peer's stage is its checkpoint of commit `version` (made by attempt `attempt`),
        plus the layers of the lost peers in `adopt` (their replicas here), each verified against the checksum
        the journal recorded.
        Returns which layers came from where: {"own": [...], "adopted": {lost peer: [...]}}."""
        if not isinstance(checksums.get(self.me), str) or not all(isinstance(checksums.get(p), str) for p in adopt):
            raise ProtocolError("malformed", f"restore names no checkpoint of peer {self.me} or of a peer it adopts")
        stage, got = Stage(self.cfg, {}), {"adopted": {}}
        own = self.state_dir.load_checkpoint(self.job, version, attempt, checksums[self.me])["layers"]
        stage.install(own)
        got["own"] = sorted(own)
        for lost in adopt:
            layers = self.state_dir.load_checkpoint(self.job, version, attempt, checksums[lost], owner=lost)["layers"]
            stage.install(layers)
            got["adopted"][lost] = sorted(layers)
        self.stage, self.restored = stage, True
        return got

    def commit(self, rotation: int, version: int, epoch: int, chain: list[str], ranges: dict[str, list[int]],
               head_samples: int, head_test_samples: int, backward_at: list = ()) -> dict:
        """Take ownership for `rotation` (the job's commit number `version`, in epoch `epoch`): install received
        layers, free moved ones, checkpoint. backward_at: [[stage, host], ...], the remote backwards of this
        rotation (chain positions)."""
        if rotation <= self.rotation:
            raise ProtocolError("stale", f"rotation {rotation} is not after the current {self.rotation}")
        try:
            remote = {int(j): int(h) for j, h in backward_at}
            train_roles = S.Roles(len(chain), remote)
        except (TypeError, ValueError) as e:
            raise ProtocolError("malformed", f"backward_at: {e}") from None
        n_layers = len(self.shapes) - 1
        if not all(isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) and
                   0 <= r[0] <= r[1] <= n_layers for r in ranges.values()):
            raise ProtocolError("malformed", f"ranges must be [first, end) layer pairs within the model's {n_layers}")
        a, b = ranges.get(self.me, (0, 0))
        if self.rotation < 0 and not self.restored:  # first assignment: build own layers from (spec, seed, i)
            self.stage = Stage.build(self.cfg, a, b)
        else:   # the layers given away are freed first (the last commit's checkpoint has them): the stage never
            received = self.pending.pop(rotation, {})   # holds old and new at once beyond what the swap did
            for i in [i for i in self.stage.layers if not a <= i < b]:
                self.stage.remove(i)
            self.stage.install({i: state for i, state in received.items() if state is not None})
            for i in [i for i, state in received.items() if state is None]:
                self.stage.install({i: self.state_dir.load_pending(self.job, rotation, self.attempt, i)})
        owner = self.me in chain and chain.index(self.me) in remote
        used = self.stage.memory_bytes(gradients=not owner)   # a remote backward's owner keeps no gradients
        self.peak_swap = max(self.peak_swap, used) if self.memory_budget is not None else self.peak_swap
        if self.memory_budget is not None and used > self.memory_budget:
            raise JobError(f"peer {self.me} would hold {used} bytes for layers [{a},{b}), over its memory budget of "
                           f"{self.memory_budget}")
        missing = sorted(set(range(a, b)) - set(self.stage.layers))   # (layers outside [a, b) are gone by now)
        if missing:
            raise JobError(f"peer {self.me} should own layers [{a},{b}) for rotation {rotation} but holds "
                           f"{sorted(self.stage.layers)}: layers {missing} never arrived (a transfer is missing)")
        self.rotation, self.version, self.epoch, self.chain = rotation, version, epoch, list(chain)
        self.roles_of = {"train": train_roles, "eval": S.Roles(len(chain))}
        self.ranges = {p: tuple(r) for p, r in ranges.items()}
        self.head_samples, self.head_test_samples = head_samples, head_test_samples
        self.pending = {r: v for r, v in self.pending.items() if r > rotation}
        self.mailbox.new_rotation(rotation)
        _, digest = self.checkpoint()
        return {"layers": [a, b], "checksum": digest}

    def status(self) -> dict:
        return {"job": self.job, "scheme": self.cfg.scheme, "rotation": self.rotation, "layers": list(self.stage.range),
                "position": self.position, "progress": self.progress, "peak_memory_bytes": self.peak_memory,
                "peak_swap_bytes": self.peak_swap, "swap_spills": self.spilled}

    def layers(self) -> dict[int, dict]:
        """{layer: state dict} of the layers this peer holds now."""
        return self.stage.weights()

    def checkpoint(self) -> tuple:
        """(path, sha256) of this peer's checkpoint of the commit just made."""
        return self.state_dir.save_checkpoint(self.job, self.version, self.attempt, {
            "job": self.job, "version": self.version, "rotation": self.rotation, "config": self.cfg.to_dict(),
            "layers": self.stage.export()})

    async def replicate(self, digest: str) -> None:
        """Send this peer's checkpoint of the current commit, byte for byte (as uint8 tensors: frames' raw
        payloads, REPLICA_PART bytes at a time), to its successor in ring order, which keeps it (verified by
        checksum) so that the layers outlive this peer."""
        if len(self.ring) < 2:
            return
        succ = self.ring[(self.ring.index(self.me) + 1) % len(self.ring)]
        path = self.state_dir.checkpoint_path(self.job, self.version, self.attempt)
        with open(path, "rb") as f:
            size, offset = os.fstat(f.fileno()).st_size, 0
            buf = bytearray(min(size, REPLICA_PART))
            while offset < size:
                n = await asyncio.to_thread(f.readinto, buf)
                reply = await self.client.call({"peer": succ, "url": self.urls[succ]}, "replica_put",
                                               timeout=TRANSFER_S, job=self.job, owner=self.me, version=self.version,
                                               attempt=self.attempt, offset=offset, size=size,
                                               data=torch.frombuffer(buf, dtype=torch.uint8)[:n], checksum=digest)
                offset += n
        if reply["checksum"] != digest:
            raise JobError(f"the replica of {self.me}'s checkpoint on {succ} failed verification")

    # --- swap ---------------------------------------------------------------------------------
    async def swap_send(self, rotation: int, moves: list[list]) -> dict:
        """Phase 1: send each moving layer (parameters + optimizer state) to its new owner, which
        verifies the checksum. Nothing is freed here: that waits for the commit."""
        by_dest: dict[str, list[int]] = {}
        for layer, src, dst in moves:
            if src == self.me:
                if layer not in self.stage.layers:
                    raise JobError(f"asked to send layer {layer} which {self.me} does not hold")
                by_dest.setdefault(dst, []).append(layer)
        sent = 0
        for dst, layers in by_dest.items():
            for layer in layers:   # a layer at a time: neither end holds more than one extra layer's copy
                state = self.stage.export([layer])
                digest = await self._compute(checksum, state)
                reply = await self.client.call({"peer": dst, "url": self.urls[dst]}, "swap_receive",
                                               timeout=TRANSFER_S, job=self.job, rotation=rotation,
                                               attempt=self.attempt, layers=state, checksum=digest)
                if reply["checksum"] != digest:
                    raise JobError(f"layer transfer to {dst} failed verification")
                del state
                sent += 1
        return {"sent": sent}

    def receive_layers(self, rotation: int, attempt: int, layers: dict, digest: str) -> str:
        if rotation <= self.rotation or attempt != self.attempt:
            raise ProtocolError("stale", f"layers for rotation {rotation} of attempt {attempt}; this stage is at "
                                         f"rotation {self.rotation} of attempt {self.attempt}")
        layers = {int(k): v for k, v in layers.items()}
        got = checksum(layers)   # answered as computed here, so that the sender's check of it is real
        if got != digest:
            raise ProtocolError("checksum", f"layer state does not match its checksum (sha256 {got[:12]}..., "
                                            f"sent as {digest[:12]}...): corrupted in transit")
        pending = self.pending.setdefault(rotation, {})
        if self.memory_budget is not None:
            held = self.stage.memory_bytes() + state_bytes(layers.values())
            if held > self.memory_budget:   # (the plan checked this; a peer that misjudged is refused here)
                raise JobError(f"peer {self.me} would hold {held} bytes with layers {sorted(layers)} received for "
                               f"rotation {rotation}, over its memory budget of {self.memory_budget}")
            self.peak_swap = max(self.peak_swap, held)
            if held + state_bytes(pending.values()) > self.memory_budget:   # kept on disk until the commit
                for i, state in layers.items():
                    self.state_dir.save_pending(self.job, rotation, self.attempt, i, state)
                pending.update({i: None for i in layers})   # (None: on disk)
                self.spilled += len(layers)
                return got
            self.peak_swap = max(self.peak_swap, held + state_bytes(pending.values()))
        pending.update(layers)
        return got

    # --- data plane input ---------------------------------------------------------------------
    def roles(self, mode: str) -> S.Roles:
        """Who runs what in this rotation's chain: a middle stage's backward may run on another peer
        (fast-async, backward_at); evaluation is forward only, on the owners."""
        return self.roles_of[mode]

    async def deliver(self, sender: str, msg: dict) -> None:
        """A neighbour's stage message, delivered once its box has room (meanwhile the data plane reads no
        more from that neighbour: backpressure) if this peer expects it from that sender (pipeline.admission)."""
        await self.mailbox.room(box_of(msg["type"], msg.get("stage", self.position)))
        self.mailbox.deliver(*self.admission().admit(sender, msg))
        if self.memory_budget is not None:
            try:
                self.check_budget(f"a message from {sender} received")
            except JobError as e:
                self.mailbox.fail(e)

    def check_budget(self, where: str) -> None:
        """Peak accounting and the budget's enforcement: what the stages hold and the messages waiting unread."""
        used = self.stage_bytes + self.mailbox.unread_bytes
        self.peak_memory = max(self.peak_memory, used)
        if used > self.memory_budget:
            raise JobError(f"peer {self.me} holds {used} bytes during the pass (rotation {self.rotation}, {where}; "
                           f"{self.mailbox.unread_bytes} of them in messages waiting unread), over its memory budget "
                           f"of {self.memory_budget} by {used - self.memory_budget}: the job stops before the kernel "
                           f"runs out of memory (restarted with a larger --memory-budget, this agent lets it resume)")

    def admission(self) -> Admission:
        """What this peer expects in the current rotation, as plain facts."""
        cfg = self.cfg
        return Admission(self.me, self.rotation, self.attempt, self.chain, self.ranges,
                         {"train": Mode(self.roles("train"), self.head_samples, cfg.batch_size, cfg.microbatches),
                          "eval": Mode(self.roles("eval"), self.head_test_samples, cfg.eval_batch, 1)},
                         self.shapes, self._layer_shapes)

    def _layer_shapes(self, i: int, state: bool) -> dict[str, tuple]:
        """Parameter (or, with state, state-dict) shapes and dtypes of layer i, from the model spec, once."""
        key = (i, state)
        if key not in self._shapes_of:
            module = build_layer(self.cfg.model, self.cfg.seed, i)
            tensors = module.state_dict() if state else dict(module.named_parameters())
            self._shapes_of[key] = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        return self._shapes_of[key]

    # --- running a pass -----------------------------------------------------------------------
    async def _drive(self, gen, owner: Stage, mode: str, on_step, roles: S.Roles, program: int) -> None:
        """Step one program's generator (running on `owner`) on the compute thread; do its receives and
        sends here. While a message it waits for in a drain (Recv.slack) is not there yet, the stage works
        ahead."""
        stage = roles.stage(program)

        def account():
            """Peak accounting, for /status and tests, and the budget's enforcement: after every change of
            what this peer's stages hold (Stage.on_change: each state between two actions, not only those
            at a receive or send), all of them together, with the messages waiting unread (check_budget). The
            planner refused a split whose predicted memory (pipeline.planner.model) and the room kept for those
            messages (pipeline.jobplan.kept_room) exceed the budget; going over means the model missed something
            (its docstring says what it cannot see). A remote backward's owner keeps no gradients, in any mode."""
            self.stage_bytes = peer_memory(self.stage, self.backward_roles.values(),
                                           self.position in self.roles_of["train"].remote)
            self.peak_stage = max(self.peak_stage, self.stage_bytes)
            self.check_budget(f"stage {stage}")

        def advance(value):
            try:
                return False, gen.send(value)
            except StopIteration:
                return True, None

        trace, clock, step, received = self.trace, self.trace.clock, 0, ""

        def traced(kind: str, label: str, since: float) -> None:
            trace.add(kind, label, self.rotation, mode, step, since, clock())

        async def compute(value):
            """A computation, named after what it produced (a message, a step), else what it took in."""
            nonlocal step, received
            t = clock()
            done, req = await self._compute(advance, value)
            step = step if done else req.step
            traced("busy", "step" if isinstance(req, StepDone) else label(req.kind, req.mb) if isinstance(req, Send)
                   else received, t)
            received = ""
            return done, req

        try:
            if self.memory_budget is not None:
                owner.on_change = account
                await self._compute(account)   # what the stage holds as the pass starts
            done, req = await compute(None)
            while not done:
                value = None
                if isinstance(req, Recv):
                    key = MessageKey(self.rotation, mode, req.step, box_of(req.kind, stage), req.mb)
                    t = clock()
                    while req.slack and not self.mailbox.ready(key) and await self._compute(owner.work_ahead):
                        traced("busy", "ahead", t)
                        t = clock()
                    try:
                        value = await self.mailbox.get(key, self.cfg.recv_timeout)
                        received = label(req.kind, req.mb)
                        traced("wait", received, t)
                    except TimeoutError:
                        silent = self.chain[roles.host(roles.sender(program, req.kind))]
                        raise TimeoutError(f"peer {silent} sent nothing for {self.cfg.recv_timeout:.0f} s (peer "
                                           f"{self.me} waited for its {req.kind} of step {req.step}, microbatch "
                                           f"{req.mb})") from None
                elif isinstance(req, StepDone):
                    await on_step(req.step, req.result)
                else:
                    assert isinstance(req, Send)
                    to = roles.to(program, req.kind)
                    dest = self.chain[roles.host(to)]
                    t = clock()
                    if dest == self.me:   # to another program of this peer (a backward role hosted here)
                        key = MessageKey(self.rotation, mode, req.step, box_of(req.kind, roles.stage(to)), req.mb)
                        await self.mailbox.room(key.box)
                        self.mailbox.deliver(key, req.payload)
                    else:
                        msg = message(req.kind, job=self.job, rotation=self.rotation, attempt=self.attempt,
                                      step=req.step, stage=roles.stage(to), **req.payload,
                                      **({} if req.kind in ("weights", "lend", "return") else {"mb": req.mb}))
                        if req.kind == "fwd":
                            msg["mode"] = mode
                        await self.links.send(self.urls[dest], msg, wire_policy(self.cfg))
                    traced("send", label(req.kind, req.mb), t)
                done, req = await compute(value)
        finally:
            owner.on_change = None

    def _head_batches(self, mode: str):
        if mode == "train":
            order = pass_order(len(self.data), self.cfg.seed, self.epoch, self.cfg.shuffle)
            ds, size, mbs = self.data, self.cfg.batch_size, self.cfg.microbatches
        else:
            ds = Dataset("test", self.data.x_test, self.data.y_test)
            order, size, mbs = torch.arange(len(ds)), self.cfg.eval_batch, 1
        start = 0
        for n in batch_sizes(len(order), size):
            yield make_step_input(ds, order[start:start + n], mbs)
            start += n

    async def run_pass(self, mode: str, on_step) -> dict:
        """This stage's part of the current rotation's pass (mode "train") or evaluation ("eval").
        on_step(step, result, size, stage) is called as each of this peer's programs finishes a step
        (stage: the chain position of the layers the program works on)."""
        pos, n = self.position, len(self.chain)
        if pos < 0:
            return {"steps": 0}
        total = self.head_samples if mode == "train" else self.head_test_samples
        sizes = batch_sizes(total, self.cfg.batch_size if mode == "train" else self.cfg.eval_batch)
        if pos == 0 and mode == "train" and len(self.data) != total:
            raise JobError(f"head {self.me} has {len(self.data)} samples, the coordinator expected {total}")
        roles, k = self.roles(mode), self.cfg.max_staleness
        mbs = [len(microbatch_sizes(b, self.cfg.microbatches)) for b in sizes]
        head_inputs = self._head_batches(mode) if pos == 0 else None
        self.backward_roles = {p: Stage(self.cfg, {}) for p in range(n, roles.programs) if roles.host(p) == pos}
        owner = {p: self.backward_roles.get(p, self.stage) for p in range(roles.programs)}   # program -> Stage
        if mode == "eval":
            gens = {pos: run_program(self.stage, S.evaluation_pass(pos, n, len(sizes)), pos, n, sizes, head_inputs,
                                     train=False)}
        elif roles.remote:   # this peer's programs: its own stage's (or forward role's), and backward roles
            progs = roles.pass_programs(mbs, k)
            gens = {p: run_forward_role(self.stage, progs[p], k) if p in roles.remote else
                    run_backward_role(owner[p], progs[p], k) if p >= n else
                    run_program(self.stage, progs[p], pos, n, sizes, head_inputs)
                    for p in range(roles.programs) if roles.host(p) == pos}
        else:
            program = S.pass_program(self.cfg.scheme, self.cfg.pipeline, pos, n, mbs, k)
            gens = {pos: run_program(self.stage, program, pos, n, sizes, head_inputs)}
        t0 = time.perf_counter()
        self.trace.new_pass()

        def step_done(stage: int):
            async def done(step, result):
                if stage == pos:
                    self.progress = {"rotation": self.rotation, "mode": mode, "step": step + 1, "steps": len(sizes)}
                await on_step(step, result, sizes[step], stage)
            return done

        tasks = [asyncio.create_task(self._drive(g, owner[p], mode, step_done(roles.stage(p)), roles, p))
                 for p, g in gens.items()]
        try:
            await asyncio.gather(*tasks)
        finally:   # one program failed (or the pass was cancelled): stop the others too
            for t in tasks:
                t.cancel()
            self.backward_roles = {}
        return {"steps": len(sizes), "seconds": time.perf_counter() - t0,
                **{f"{kind}_s": s for kind, s in self.trace.totals.items()},
                "peak_memory_bytes": self.peak_memory, "peak_stage_bytes": self.peak_stage,
                "peak_swap_bytes": self.peak_swap, "peak_rss_bytes": peak_rss(), "swap_spills": self.spilled}

    def abort(self, reason: str) -> None:
        self.mailbox.fail(JobError(reason))
        if self.task and not self.task.done():
            self.task.cancel()
