"""A stage: the contiguous layers [a, b) one peer owns, each with its own optimizer.

One optimizer per layer makes a layer's whole training state self-contained, so a swap moves
(parameters, optimizer state) per layer; SGD and Adam update each parameter independently, so this
equals one optimizer over all layers. Forward buffers keep, per microbatch, what backward needs.

Under `fast-async` the backward of some microbatches comes after an optimizer step that followed their
forward (the schedule says which: `schedule.lags`). Such a "stale" forward runs on a copy of the weights
(`forward_weights`), replaced, not modified, at each step: its graph keeps the version its forward used
(weight stashing, as in PipeDream), its gradient is taken at that version and applied to the current
weights. Other forwards use the weights themselves. `version` counts the steps; `lag` says how many
steps old a microbatch's weights are.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Hashable

import torch
from torch import nn
from torch.func import functional_call

from pipeline import direct
from pipeline.config import JobConfig
from pipeline.loss import summed as summed_loss
from pipeline.models import build_layer, layer_factories
from pipeline.wgrad import Deferred


def make_optimizer(cfg: JobConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class Stage:
    def __init__(self, cfg: JobConfig, layers: dict[int, nn.Module]):
        self.cfg = cfg
        self.layers: dict[int, nn.Module] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.deferred: dict[int, Deferred] = {}
        # key -> (input, output, version, forward weights used, direct.Tape or None for autograd's graph)
        self.buffers: dict[Hashable, tuple] = {}
        # key -> {storage: bytes} of what autograd saved for that microbatch's backward (inside a layer: a
        # block's intermediate activations), until its backward
        self.saved: dict[Hashable, dict[int, int]] = {}
        self.forward_weights: dict[int, dict[str, torch.Tensor]] = {}   # copies for stale forwards, this version
        # a remote backward role's weights per version, layer, name (execute.run_backward_role), until unused
        self.versions: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.version = 0
        self._held: tuple | None = None   # (parameter, optimizer state) bytes and parameter storages, until they change
        self._ops: list | None = None   # direct.ops_of the layers ([]: not such a stage), until they change
        self.autograd_only = False      # True: never pipeline.direct (tests compare the two)
        # storage -> tensor: the inputs of forwards that need no input gradient (the head's data, see
        # memory_bytes), until the step after which no buffer or deferred pair holds them
        self._data: dict[int, torch.Tensor] = {}
        # called after every change of what the stage holds (forward, backward, step, layers added): a pass's
        # memory accounting (peer.worker), which sees every state between two actions of a program
        self.on_change: Callable[[], None] | None = None
        for i, module in layers.items():
            self.add(i, module)

    @classmethod
    def build(cls, cfg: JobConfig, start: int, stop: int) -> "Stage":
        factories = layer_factories(cfg.model)
        return cls(cfg, {i: build_layer(cfg.model, cfg.seed, i, factories) for i in range(start, stop)})

    # ownership -------------------------------------------------------------------------------
    def add(self, index: int, module: nn.Module, optim_state: dict | None = None) -> None:
        if self.cfg.scheme in ("fast", "fast-async"):  # pipelined: weight gradients batched over the step's microbatches
            self.deferred[index] = Deferred(module)   # before the optimizer: it may re-home the weights
        opt = make_optimizer(self.cfg, module.parameters())
        if optim_state:
            opt.load_state_dict({"state": optim_state, "param_groups": opt.state_dict()["param_groups"]})
        self.layers[index] = module
        self.optimizers[index] = opt
        self.layers = dict(sorted(self.layers.items()))
        self._held = self._ops = None
        self.notify()

    def remove(self, index: int) -> None:
        del self.layers[index], self.optimizers[index]
        self.deferred.pop(index, None)
        self._held = self._ops = None

    @property
    def range(self) -> tuple[int, int]:
        keys = list(self.layers)
        return (keys[0], keys[-1] + 1) if keys else (0, 0)

    def contiguous(self) -> bool:
        keys = list(self.layers)
        return keys == list(range(keys[0], keys[-1] + 1)) if keys else True

    def notify(self) -> None:
        """Tell the memory accounting (on_change), if any, that what the stage holds changed."""
        hook = self.on_change   # (read once: the pass may clear it meanwhile)
        if hook is not None:
            hook()

    # compute ---------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, weights: dict[int, dict] | None = None) -> torch.Tensor:
        for i, module in self.layers.items():
            x = module(x) if weights is None else functional_call(module, weights[i], (x,))
        return x

    def _weights(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.forward_weights:
            self.forward_weights[i] = {name: p.detach().clone().requires_grad_(p.requires_grad)
                                       for name, p in self.layers[i].named_parameters()}
        return self.forward_weights[i]

    def _stale(self) -> dict[int, dict]:
        return {i: self._weights(i) for i in self.layers}

    def _direct(self, x: torch.Tensor, weights: dict | None) -> list | None:
        """The ops to run this forward with pipeline.direct, or None for autograd: direct needs Linear/ReLU
        layers with deferred weight gradients, on the stage's own weights, and 2-D inputs."""
        if weights is not None or not self.deferred or self.autograd_only or x.dim() != 2:
            return None
        if self._ops is None:
            pending = {m: d.pending[m] for d in self.deferred.values() for m in d.linears}
            self._ops = direct.ops_of(self.layers, pending) or []
        return self._ops or None

    def forward(self, key: Hashable, x: torch.Tensor, needs_input_grad: bool, stale: bool = False,
                weights: dict[int, dict] | None = None) -> torch.Tensor:
        """Forward one microbatch, keeping its buffer for backward; returns the detached output. `stale`:
        a step will come before its backward, so it runs on a copy of the weights. `weights`: run on
        these instead (per layer, name -> tensor), as a remote backward role recomputing a forward."""
        weights = self._stale() if stale else weights
        x = x.detach()
        if ops := self._direct(x, weights):
            y, tape = direct.forward(ops, x, needs_input_grad)
            self._keep(key, x, y, weights, tape)
            return y
        x.requires_grad_(needs_input_grad)
        with self._saving(key):
            y = self._run(x, weights)
        self._keep(key, x, y, weights)
        return y.detach()

    def _saving(self, key: Hashable):
        """Record the storages autograd saves for this microbatch's backward (see memory_bytes)."""
        kept = self.saved[key] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.is_floating_point() and t.dim():   # (integer ones are data: labels, token ids; scalars, noise)
                storage = t.untyped_storage()
                kept[storage.data_ptr()] = storage.nbytes()
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def _keep(self, key: Hashable, x: torch.Tensor, y: torch.Tensor, weights: dict[int, dict] | None,
              tape: direct.Tape | None = None) -> None:
        """The forward buffer: input, output (or scaled loss), version, the weight copies it ran on, and
        direct's tape (None: autograd's graph hangs on the output)."""
        self.buffers[key] = (x, y, self.version, weights or {}, tape)
        if not (x.requires_grad or tape and tape.input_grad):   # no input gradient: the head's data
            self._data[x.untyped_storage().data_ptr()] = x
        self.notify()

    def lag(self, key: Hashable) -> int:
        """How many optimizer steps this stage took since the microbatch's forward."""
        return self.version - self.buffers[key][2]

    def forward_loss(self, key: Hashable, x: torch.Tensor, labels: torch.Tensor, batch: int,
                     needs_input_grad: bool, stale: bool = False) -> tuple[float, int]:
        """Tail forward: loss of one microbatch, scaled so that microbatch gradients sum to the
        batch-mean gradient. Returns (summed loss, correct predictions)."""
        x = x.detach()
        weights = self._stale() if stale else None
        if ops := self._direct(x, weights):   # kept: the logits' gradient, for backward
            logits, tape = direct.forward(ops, x, needs_input_grad)
            loss, correct, grad = direct.cross_entropy(logits, labels, batch)
            self._keep(key, x, grad, weights, tape)
            return loss, correct
        with self._saving(key):
            logits = self._run(x.requires_grad_(needs_input_grad), weights)
            loss_sum, correct = summed_loss(logits, labels)
        self._keep(key, x, loss_sum / batch, weights)
        return loss_sum.item(), correct

    def backward(self, key: Hashable, grad: torch.Tensor | None) -> torch.Tensor | None:
        """Backward one microbatch (grad of its output; None at the tail), freeing its buffer.
        Returns the gradient of its input (None at the head)."""
        x, y, _, used, tape = self.buffers.pop(key)
        self.saved.pop(key, None)
        if tape is not None:   # at the last stage, y is the logits' gradient
            grad_in = direct.backward(tape, y if grad is None else grad)
            del x, y, tape   # what the deferred pairs do not keep is freed before the accounting
            self.notify()
            return grad_in
        if grad is not None and grad.stride() != y.stride():   # received gradients are contiguous; see wgrad
            grad = torch.empty_like(y).copy_(grad)
        y.backward(grad)
        for i, weights in used.items():   # gradients that landed on copies (parameters without deferred grads)
            for name, p in self.layers[i].named_parameters():
                g, weights[name].grad = weights[name].grad, None
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        grad_in, x.grad = x.grad, None   # x itself may stay referenced (deferred weight gradients)
        del x, y, used
        self.notify()
        return grad_in

    def update(self, x: torch.Tensor, loss_fn) -> float:
        """One optimizer step on a loss of this stage's output (no buffer kept): loss_fn(output) -> scalar."""
        loss = loss_fn(self._run(x.detach()))
        loss.backward()
        self.notify()
        self.step()
        return float(loss)

    def sum_weight_gradients_by_step(self, whole_step: bool) -> None:
        """For a pass whose program never waits in a step's drain (nothing to do ahead): each step's
        deferred weight gradients in one group (see wgrad.Deferred). Fixed per program, so exact."""
        for d in self.deferred.values():
            d.whole_step = whole_step

    def work_ahead(self) -> bool:
        """Some of this step's deferred weight-gradient work (wgrad.Deferred), if any is ready: what
        to do while waiting for a neighbour. Says whether there was any."""
        return any(d.work_ahead() for d in self.deferred.values())

    def step(self) -> None:
        for i, opt in self.optimizers.items():
            if i in self.deferred:
                self.deferred[i].flush()
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.forward_weights = {}   # new copies for the next forwards; graphs in flight keep theirs
        self.version += 1
        self._held = None   # an optimizer's state appears at its first step
        inputs = {x.untyped_storage().data_ptr() for x, *_ in self.buffers.values()}
        self._data = {p: x for p, x in self._data.items() if p in inputs}   # the flush freed the pairs
        self.notify()

    def drop_optimizer_state(self) -> None:
        for opt in self.optimizers.values():
            opt.state.clear()
        self._held = None

    def memory_bytes(self, gradients: bool = True) -> int:
        """Parameters, gradients (same size; not for a stage whose backward runs elsewhere), optimizer
        state, the forward buffers (input, output, pipeline.direct's tape, and what autograd saved for each
        microbatch's backward: a layer's intermediate activations), the deferred weight-gradient pairs (wgrad.Deferred), the weight copies of stale
        forwards held now (a copy lives while a microbatch that ran on it is in flight) and a remote
        backward role's weight versions: what pipeline.planner.model's memory model bounds. Each tensor
        once, however many views of it are held. Not counted, as in that model: the head's input (its
        data, also held by the head's batch until the step) and an optimizer's scalar state (Adam's step
        count, 4 bytes per parameter tensor)."""
        if self._held is None:   # cached: this runs after every action of a pass
            self._held = (sum(p.numel() * p.element_size() for m in self.layers.values() for p in m.parameters()),
                          sum(v.numel() * v.element_size() for o in self.optimizers.values()
                              for s in o.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()),
                          {p.untyped_storage().data_ptr() for m in self.layers.values() for p in m.parameters()})
        params, state, param_storages = self._held
        pairs = (t for d in self.deferred.values() for kept in d.pending.values() for pair in kept for t in pair)
        held = {(t.data_ptr(), t.numel()): t for x, y, _, _, tape in self.buffers.values()   # views once
                for t in (x, y, *(tape.saved if tape else ()))}
        held.update({(t.data_ptr(), t.numel()): t for t in pairs})
        data = self._data
        buffers = sum(t.numel() * t.element_size() for t in held.values()   # (the tail's y: a scalar, left out)
                      if t.dim() and (not data or t.untyped_storage().data_ptr() not in data))
        copies = {id(w): w for used in [self.forward_weights, *(kept[3] for kept in self.buffers.values()),
                                        *self.versions.values()] for w in used.values()}
        buffers += sum(t.numel() * t.element_size() for w in copies.values() for t in w.values())
        if self.saved:   # what autograd saved that is held nowhere else: not a parameter, buffer, copy or data
            counted = {t.untyped_storage().data_ptr() for t in held.values()} | param_storages | set(data) | \
                {t.untyped_storage().data_ptr() for w in copies.values() for t in w.values()}
            saved = {ptr: n for kept in self.saved.values() for ptr, n in kept.items() if ptr not in counted}
            buffers += sum(saved.values())
        return (2 if gradients else 1) * params + state + buffers

    def weights(self) -> dict[int, dict[str, torch.Tensor]]:
        """{layer: its state dict}, detached (what a coordinator collects at the end of a job)."""
        return {i: {k: v.detach() for k, v in m.state_dict().items()} for i, m in self.layers.items()}

    @torch.no_grad()
    def forward_only(self, x: torch.Tensor) -> torch.Tensor:
        """A training-mode forward that keeps nothing (a remote backward's forward role: BatchNorm normalises
        with the batch's statistics, as the backward role's recomputation does)."""
        return self._run(x)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' output in evaluation mode (BatchNorm with its running statistics, which stay as they were)."""
        for m in self.layers.values():
            m.eval()
        try:
            return self._run(x)
        finally:
            for m in self.layers.values():
                m.train()

    def snapshot(self, ahead: int = 0) -> dict[int, dict[str, torch.Tensor]]:
        """A copy of the current weights, per layer. With `ahead`, extrapolated that many steps along SGD's
        momentum, W - lr * ahead * buffer (weight prediction, as SpecTrain): what a remote backward's
        forward role runs on, so that its gradients are taken near the weights they are applied to."""
        out = {}
        for i, m in self.layers.items():
            opt = self.optimizers[i]
            lr = opt.param_groups[0]["lr"]
            out[i] = {}
            for name, p in m.named_parameters():
                w = p.detach().clone()
                buf = opt.state.get(p, {}).get("momentum_buffer") if ahead else None
                if buf is not None:
                    w.sub_(buf, alpha=lr * ahead)
                out[i][name] = w.requires_grad_(p.requires_grad)
        return out

    @torch.no_grad()
    def load(self, weights: dict[int, dict[str, torch.Tensor]]) -> None:
        """Take weights sent by the backward role (a forward role's copy; optimizer state stays there)."""
        for i, named in weights.items():
            for name, p in self.layers[i].named_parameters():
                p.copy_(named[name])

    # state -----------------------------------------------------------------------------------
    def export(self, indices=None) -> dict[int, dict]:
        """Per layer: parameters/buffers and optimizer state, as plain tensors (copies)."""
        out = {}
        for i in (self.layers if indices is None else indices):
            params = {k: v.detach().clone() for k, v in self.layers[i].state_dict().items()}
            state = {int(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for p, s in self.optimizers[i].state_dict()["state"].items()}
            out[int(i)] = {"params": params, "optim": state}
        return out

    def install(self, layers: dict[int, dict]) -> None:
        """Add layers exported by another stage (tensors are copied, never aliased)."""
        factories = layer_factories(self.cfg.model)
        for i, entry in layers.items():
            module = build_layer(self.cfg.model, self.cfg.seed, i, factories)
            module.load_state_dict({k: v.clone() for k, v in entry["params"].items()})
            optim = {int(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for p, s in entry["optim"].items()}
            self.add(int(i), module, optim)


def peer_memory(own: Stage, hosted, remote_owner: bool) -> int:
    """What one peer holds in a pass: its own stage (without gradients when its backward runs elsewhere)
    and the backward roles it hosts (peer.worker and pipeline.local account alike)."""
    return own.memory_bytes(gradients=not remote_owner) + sum(st.memory_bytes() for st in hosted)


def checksum(layers: dict[int, dict]) -> str:
    """sha256 over every tensor of exported layers, in a canonical order."""
    h = hashlib.sha256()

    def walk(obj, path: str):
        if torch.is_tensor(obj):
            t = obj.detach().contiguous()
            h.update(f"{path}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{path}/{k}")
        else:
            h.update(f"{path}={obj!r}".encode())

    walk({int(k): v for k, v in layers.items()}, "")
    return h.hexdigest()
