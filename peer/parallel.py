"""One client/helper job (sl, splitfed-v1, splitfed-v2) as seen by one peer: a client's parts 1 and 3, or a
helper's part 2 (one copy per client under splitfed-v1), and how it runs a round. Decisions come from the
coordinator (peer/parallel_coordinator.py) and pipeline/parallel.py; the math from pipeline/stage.py."""
from __future__ import annotations

import asyncio
import copy
import logging
import math
import time

import torch
from torch.nn import functional as F

from peer.client import JobError
from peer.dataplane import MAILBOX_LIMIT, Links, Mailbox, wire_policy
from pipeline.admission import MessageKey
from pipeline.config import JobConfig
from pipeline.data import Dataset, batch_sizes
from pipeline.models import input_shape
from pipeline.parallel import (ALL, EVAL_BATCH, LOCAL_LOSS_SCHEMES, RoundFacts, Task, admit, aux_head, box, fedavg,
                               helper_queues, mixed_loss, mixes, parts, round_batches, round_sizes)
from pipeline.stage import Stage, checksum, make_optimizer
from protocols import ProtocolError, message

log = logging.getLogger("splitring.parallel")
AUX = -1   # the auxiliary head's key among a client's layers in a part (local-loss schemes)


class ParallelRuntime:
    def __init__(self, job: str, cfg: JobConfig, me: str, ring: list[dict], coordinator: str, data: Dataset,
                 links: Links, compute, state_dir, memory_budget: int | None, sizes: list,
                 pending_messages: int = MAILBOX_LIMIT):
        self.job, self.cfg, self.me, self.coordinator = job, cfg, me, coordinator
        self.urls = {p["peer"]: p["url"] for p in ring}
        self.data, self.links, self._compute, self.state_dir = data, links, compute, state_dir
        self.memory_budget = memory_budget
        self.shapes = [input_shape(cfg.model)] + [shape for shape, _ in sizes]
        self.parts = parts(cfg, len(sizes))
        self.mailbox = Mailbox(pending_messages)
        self.facts: RoundFacts | None = None
        self.role: str | None = None
        self.stages: list[Stage] = []           # client: [part 1, part 3]; helper: [part 2] (the shared or averaged)
        self.copies: dict[str, Stage] = {}      # splitfed-v1 helper: each client's copy of part 2, this round
        self.aux: tuple | None = None           # local-loss client: (auxiliary head, its optimizer)
        self.trained: dict[str, int] = {}       # samples trained this round, per client (a helper: its clients')
        self.peak_memory = 0
        self.pending_loss: dict[tuple, tuple] = {}   # single-cut helper: (client, step) -> its loss, correct
        self.orders: list = []
        self.patience = 1   # a client's waits last up to this many recv_timeouts (see recv)
        self.progress = {"round": -1, "step": 0}
        self.task: asyncio.Task | None = None
        self.heard = time.monotonic()   # when the coordinator was last heard from (see WorkService.watch)

    # --- what WorkService asks --------------------------------------------------------------------
    @property
    def rotation(self) -> int:
        return self.facts.round if self.facts else -1

    @property
    def peak_stage(self) -> int:
        """Its stages' own peak: all of peak_memory here (messages waiting unread are not counted)."""
        return self.peak_memory

    def status(self) -> dict:
        return {"job": self.job, "scheme": self.cfg.scheme, "role": self.role, "round": self.rotation,
                "layers": [list(s.range) for s in self.stages], "labels": self.parts.labels(),
                "progress": self.progress, "peak_memory_bytes": self.peak_memory}

    def checkpoint(self) -> None:
        if self.stages:
            layers = {i: v for s in self.stages for i, v in s.export().items()}
            self.state_dir.save_checkpoint(self.job, self.rotation, 0, {"job": self.job, "round": self.rotation,
                                                                     "config": self.cfg.to_dict(), "layers": layers})
            self.state_dir.drop_versions(self.job, before=self.rotation)

    def abort(self, reason: str) -> None:
        self.mailbox.fail(JobError(reason))
        if self.task and not self.task.done():
            self.task.cancel()

    def layers(self) -> dict[int, dict]:
        """{layer: state dict} of what this peer holds now (the parts collected for the assembled model)."""
        return {i: w for s in self.stages for i, w in s.weights().items()}

    def part(self) -> dict:
        """This peer's part for averaging or relaying, with the samples it trained on this round: a client's
        layers (with optimizer state under sl, which relays it; weights only otherwise); a helper's part 2
        (splitfed-v1: its clients' copies averaged)."""
        if self.copies:
            layers = fedavg([({i: e["params"] for i, e in c.export().items()}, self.trained[j])
                             for j, c in self.copies.items()])
            out = {i: {"params": p, "optim": {}} for i, p in layers.items()}
        else:
            out = {i: e if self.cfg.scheme == "sl" else {"params": e["params"], "optim": {}}
                   for s in self.stages for i, e in s.export().items()}
        if self.aux is not None:   # the auxiliary head travels as layer AUX, averaged like the others
            out[AUX] = {"params": {k: v.detach().clone() for k, v in self.aux[0].state_dict().items()}, "optim": {}}
        return {"layers": out, "samples": sum(self.trained.values())}

    def set_part(self, rnd: int, layers: dict, digest: str) -> list[int]:
        """Replace this peer's layers with averaged or relayed ones, between rounds: verified against their
        checksum, and every new stage built (shapes checked by load_state_dict) before any old one goes."""
        if rnd != self.rotation:
            raise ProtocolError("stale", f"layers for round {rnd}; this peer is at round {self.rotation}")
        layers = {int(k): v for k, v in layers.items()}
        if checksum(layers) != digest:
            raise ProtocolError("checksum", "layer state does not match its checksum")
        mine = [sorted(s.layers) for s in self.stages]
        if sorted(layers) != sorted([i for m in mine for i in m] + ([AUX] if self.aux else [])):
            raise ProtocolError("unexpected", f"layers {sorted(layers)} sent to peer {self.me}, which holds {mine}")
        try:
            new = []
            for indices in mine:
                stage = Stage(self.cfg, {})
                stage.install({i: layers[i] for i in indices})
                new.append(stage)
            if self.aux:
                head = copy.deepcopy(self.aux[0])
                head.load_state_dict(layers[AUX]["params"])
                aux = (head, make_optimizer(self.cfg, head.parameters()))
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise ProtocolError("bad_shape", f"layer state does not fit the model: {e}") from None
        self.stages, self.copies = new, {}
        self.aux = aux if self.aux else None
        return sorted(layers)

    # --- a round's facts ------------------------------------------------------------------------
    def plan(self, rnd: int, assignment: dict, orders: dict, samples: dict, test_samples: dict) -> dict:
        if rnd <= self.rotation:
            raise ProtocolError("stale", f"round {rnd} is not after the current {self.rotation}")
        cfg, p = self.cfg, self.parts
        role = "client" if self.me in assignment else "helper" if self.me in orders else None
        if role is None or role != (self.role or role):
            raise ProtocolError("unexpected", f"round {rnd} gives peer {self.me} no role or a new one ({role}, was "
                                              f"{self.role})")
        if self.role is None:   # first round: build own layers from (spec, seed, i)
            self.stages = [Stage.build(cfg, a, b) for a, b in (p.client if role == "client" else [p.helper])]
            if role == "client" and cfg.scheme in LOCAL_LOSS_SCHEMES:
                head = aux_head(cfg, math.prod(self.shapes[p.a]), self.shapes[-1][0])
                self.aux = (head, make_optimizer(cfg, head.parameters()))
        self.role = role
        self.facts = RoundFacts(self.me, rnd, p, dict(assignment),
                                {j: round_sizes(n, cfg, rnd) for j, n in samples.items()},
                                {j: batch_sizes(n, EVAL_BATCH) for j, n in test_samples.items()}, self.shapes,
                                cfg.scheme == "blind")
        self.orders = orders.get(self.me, [])
        if role == "client":   # the tasks of this client's helper this round: how long its replies may take
            helper = assignment[self.me]
            queues = helper_queues(cfg, assignment, {helper: orders.get(helper, [])},
                                   {j: len(v) for j, v in self.facts.train_sizes.items()})
            self.patience = max(1, len(queues.get(helper, [])))
        self.trained = {}   # (averaged parts come back without optimizer state: fresh each round)
        if role == "helper" and cfg.scheme == "splitfed-v1":
            state = {i: {"params": e["params"], "optim": {}} for i, e in self.stages[0].export().items()}
            self.copies = {}
            for j, h in assignment.items():
                if h == self.me:
                    self.copies[j] = Stage(cfg, {})
                    self.copies[j].install(state)
        self.check_memory()
        self.mailbox.new_rotation(rnd)
        return {"role": role}

    def held(self) -> int:
        """Bytes held now: the parts (splitfed-v1's averaged part 2 as weights only beside the copies that train)."""
        return sum(s.memory_bytes(gradients=not self.copies) for s in self.stages) + \
            sum(c.memory_bytes() for c in self.copies.values())

    def check_memory(self) -> None:
        used = self.held()
        self.peak_memory = max(self.peak_memory, used)
        if self.memory_budget is not None and used > self.memory_budget:
            raise JobError(f"peer {self.me} would hold {used} bytes as a {self.role} of {self.cfg.scheme}, over its "
                           f"memory budget of {self.memory_budget}")

    # --- the data plane ----------------------------------------------------------------------------
    async def deliver(self, sender: str, msg: dict) -> None:
        if self.facts is None:
            raise ProtocolError("stale", f"job {self.job} has no round yet on peer {self.me}")
        await self.mailbox.room(box(msg["type"], msg["cut"], msg["client"]))
        key, payload = admit(self.facts, sender, msg)
        payload["at"] = time.perf_counter()
        self.mailbox.deliver(key, payload)

    async def recv(self, mode: str, step: int, kind: str, cut: int, client: str, sender: str) -> dict:
        """A message from `sender`. A client waits on its helper, which may run every task of its queue first:
        recv_timeout per task of that queue (patience); a helper waits on one client: recv_timeout."""
        key = MessageKey(self.rotation, mode, step, box(kind, cut, client), 0)
        timeout = self.cfg.recv_timeout * (self.patience if self.role == "client" else 1)
        try:
            return await self.mailbox.get(key, timeout)
        except TimeoutError:
            raise TimeoutError(f"peer {sender} sent nothing for {timeout:.0f} s (peer {self.me} waited "
                               f"for its {kind} at cut {cut} of client {client}, step {step})") from None

    async def send(self, to: str, kind: str, **fields) -> None:
        msg = message(kind, job=self.job, round=self.rotation, **fields)
        await self.links.send(self.urls[to], msg, wire_policy(self.cfg))

    # --- a round -------------------------------------------------------------------------------------
    async def run_round(self, mode: str, on_step) -> dict:
        """This peer's part of the round (mode "train") or of the evaluation ("eval"). on_step(event) is
        called with each client step's report."""
        if self.role == "client":
            return await (self._client_train(on_step) if mode == "train" else self._client_eval())
        if self.role == "helper":
            return await (self._helper_train() if mode == "train" else self._helper_eval())
        return {}

    async def _client_train(self, on_step) -> dict:
        f, cfg, me = self.facts, self.cfg, self.me
        part1, part3 = self.stages[0], (self.stages[1] if self.parts.u_shaped else None)
        helper = f.assignment[me]
        times = []
        for s, idx in enumerate(round_batches(len(self.data), cfg, f.round)):
            t0 = time.perf_counter()
            x, y, n = self.data.x[idx], self.data.y[idx], len(idx)
            if self.aux is not None:   # a local loss: the client steps on its own; the helper learns from act
                act, loss, correct = await self._compute(self._local_step, part1, self.aux, s, x, y)
                t1 = time.perf_counter()
                await self.send(helper, "act", step=s, client=me, cut=1, mode="train", x=act, y=y)
                self.trained[me] = self.trained.get(me, 0) + n
                times.append({"part1_forward": t1 - t0, "part3": 0.0, "part1_backward": 0.0})
                await on_step({"event": "client_step", "client": me, "step": s, "samples": n, "loss": loss,
                               "correct": correct})
                continue
            act = await self._compute(part1.forward, ("t", s), x, False)
            extra = {} if part3 else {"y": y}
            t1 = time.perf_counter()
            await self.send(helper, "act", step=s, client=me, cut=1, mode="train", x=act, **extra)
            loss = correct = None
            t_part3 = 0.0
            if part3:
                out = (await self.recv("train", s, "act", 2, me, helper))["x"]
                t2 = time.perf_counter()
                loss, correct, grad = await self._compute(self._part3_step, part3, s, out, y, n)
                t_part3 = time.perf_counter() - t2
                await self.send(helper, "grad", step=s, client=me, cut=2, mode="train", grad=grad)
            back = await self.recv("train", s, "grad", 1, me, helper)
            t3 = time.perf_counter()
            # blind: the gradient of the helper's averaged loss; this client steps on its own loss's
            grad = back["grad"] * (1 / back["weight"]) if cfg.scheme == "blind" else back["grad"]
            await self._compute(self._part1_step, part1, s, grad)
            t4 = time.perf_counter()
            if part3 is None:
                loss, correct = back["loss"], back["correct"]
            self.trained[me] = self.trained.get(me, 0) + n
            self.check_memory()
            times.append({"part1_forward": t1 - t0, "part3": t_part3, "part1_backward": t4 - t3,
                          "sent": t1, "received": back["at"]})
            self.progress = {"round": f.round, "step": s + 1}
            await on_step({"event": "client_step", "client": me, "step": s, "samples": n, "loss": loss / n,
                           "correct": correct})
        return {"client_times": times}

    @staticmethod
    def _local_step(part1: Stage, aux: tuple, s: int, x, y):
        """A local-loss step: part 1 and the auxiliary head on the head's loss; part 1's output (before the
        step) for the helper, the mean loss and correct predictions."""
        head, opt = aux
        act = part1.forward(("t", s), x, False)
        act_in = act.requires_grad_(True)
        logits = head(act_in)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        part1.backward(("t", s), act_in.grad)
        part1.step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return act.detach(), float(loss), int((logits.argmax(1) == y).sum())

    @staticmethod
    def _part3_step(part3: Stage, s: int, out, y, n: int):
        loss, correct = part3.forward_loss(("t", s), out, y, n, True)
        grad = part3.backward(("t", s), None)
        part3.step()
        return loss, correct, grad

    @staticmethod
    def _part1_step(part1: Stage, s: int, grad) -> None:
        part1.backward(("t", s), grad)
        part1.step()

    async def _client_eval(self) -> dict:
        f, me = self.facts, self.me
        part1, part3 = self.stages[0], (self.stages[1] if self.parts.u_shaped else None)
        helper, start, correct = f.assignment[me], 0, 0
        for s, n in enumerate(f.eval_sizes[me]):
            x, y = self.data.x_test[start:start + n], self.data.y_test[start:start + n]
            start += n
            await self.send(helper, "act", step=s, client=me, cut=1, mode="eval", x=await self._compute(part1.evaluate, x))
            out = (await self.recv("eval", s, "act", 2, me, helper))["x"]
            logits = await self._compute(part3.evaluate, out) if part3 else out
            correct += int((logits.argmax(1) == y).sum())
        return {"correct": correct, "samples": start}

    async def _helper_train(self) -> dict:
        f, cfg = self.facts, self.cfg
        steps = {j: len(v) for j, v in f.train_sizes.items()}
        queue = helper_queues(cfg, f.assignment, {self.me: self.orders}, steps).get(self.me, [])
        t_round, tasks = time.perf_counter(), []
        forwarded: dict[int, list[str]] = {}                    # step -> clients forwarded (blind)
        pool: dict[int, list[tuple[str, dict]]] = {}            # step -> (client, smashed data) (local loss)
        for task in queue:
            j, s, kind = task
            stage = self.copies[j] if cfg.scheme == "splitfed-v1" else self.stages[0]
            t_wait = time.perf_counter()
            msg = None
            if kind in "FU":
                msg = await self.recv("train", s, "act", 1, j, j)
            elif kind == "B" and j != ALL and self.parts.u_shaped:
                msg = await self.recv("train", s, "grad", 2, j, j)
            elif kind == "B" and j == ALL and self.parts.u_shaped:   # blind: every client's gradient first
                grads = {c: await self.recv("train", s, "grad", 2, c, c) for c in forwarded[s]}
            t0 = time.perf_counter()
            ended = [t0]   # when this task's computation ended (its sends are not its compute time)

            async def compute(fn, *args):
                out = await self._compute(fn, *args)
                ended[0] = time.perf_counter()
                return out
            if kind == "F":
                out = await compute(self._helper_forward, stage, task, msg)
                forwarded.setdefault(s, []).append(j)
                if self.parts.u_shaped:
                    await self.send(j, "act", step=s, client=j, cut=2, mode="train", x=out)
                else:
                    self.pending_loss[j, s] = out
            elif kind == "U":
                pool.setdefault(s, []).append((j, msg))
                self.trained[j] = self.trained.get(j, 0) + len(msg["y"])
                await compute(stage.update, msg["x"], lambda out, y=msg["y"]: F.cross_entropy(out, y))
            elif kind == "M":
                got = pool[s]
                done = sum(1 for t in tasks if t["step"] == s and t["kind"] == "M")
                mix = mixes(cfg, f.round, s, self.me, [len(m["y"]) for _, m in got])[done]
                x, loss_fn = mixed_loss(mix, [m["x"] for _, m in got], [m["y"] for _, m in got])
                await compute(stage.update, x, loss_fn)
            elif j == ALL:   # blind: one backward from the clients' losses weighted by their samples
                clients = forwarded.pop(s)
                rows = {c: f.train_sizes[c][s] for c in clients}
                share = {c: rows[c] / sum(rows.values()) for c in clients}
                outer = [share[c] * grads[c]["grad"] for c in clients] if self.parts.u_shaped else \
                    [share[c] for c in clients]
                back = await compute(self._blind_backward, stage, [(c, s) for c in clients], outer)
                for c, g in zip(clients, back):
                    self.trained[c] = self.trained.get(c, 0) + rows[c]
                    await self.send(c, "grad", step=s, client=c, cut=1, mode="train", grad=g, weight=share[c],
                                    **self._loss_of(c, s))
            else:
                g = await compute(self._helper_backward, stage, task, msg["grad"] if msg else None)
                self.trained[j] = self.trained.get(j, 0) + len(g)
                await self.send(j, "grad", step=s, client=j, cut=1, mode="train", grad=g, **self._loss_of(j, s))
            t1 = ended[0]
            self.check_memory()
            tasks.append({"client": j, "step": s, "kind": kind, "waited": t_wait - t_round,
                          "arrived": (msg["at"] if msg else t0) - t_round, "start": t0 - t_round, "end": t1 - t_round})
            if kind == "U" and cfg.scheme == "locsplitfed":
                pool[s].pop()   # nothing mixes: keep no smashed data
        return {"tasks": tasks}

    def _loss_of(self, client: str, step: int) -> dict:
        """Single cut: the batch's loss and correct count (computed at the forward) go back with the gradient."""
        if self.parts.u_shaped:
            return {}
        loss, correct = self.pending_loss.pop((client, step))
        return {"loss": loss, "correct": correct}

    @staticmethod
    def _blind_backward(stage: Stage, keys: list, grads: list) -> list:
        """The backward of the averaged loss, client by client in the order of their forwards: the weight
        gradients sum in that order, as in the reference (under Adam with fresh state each round, another
        order's last-bit differences grow to visible ones: docs/parallel-sl.md)."""
        back = [stage.backward(k, g if torch.is_tensor(g) else torch.tensor(float(g))) for k, g in zip(keys, grads)]
        stage.step()
        return back

    def _helper_forward(self, stage: Stage, task: Task, msg: dict):
        stale = self.cfg.scheme == "splitfed-v2"   # other clients' updates may come before this one's backward
        key = (task.client, task.step)
        if self.parts.u_shaped:
            return stage.forward(key, msg["x"], True, stale=stale)
        loss, correct = stage.forward_loss(key, msg["x"], msg["y"], len(msg["y"]), True, stale=stale)
        return loss, correct

    @staticmethod
    def _helper_backward(stage: Stage, task: Task, grad):
        g = stage.backward((task.client, task.step), grad)
        stage.step()
        return g

    async def _helper_eval(self) -> dict:
        f, stage = self.facts, self.stages[0]

        async def serve(j: str):
            for s in range(len(f.eval_sizes[j])):
                x = (await self.recv("eval", s, "act", 1, j, j))["x"]
                await self.send(j, "act", step=s, client=j, cut=2, mode="eval", x=await self._compute(stage.evaluate, x))
        await asyncio.gather(*(serve(j) for j, h in f.assignment.items() if h == self.me))
        return {}
