"""Model specs: an ordered list of L layers, layer i built from (spec, seed, i) alone.

A spec is a JSON-able dict: {"name": "mlp", ...options}, {"name": "cnn"} or
{"name": "package.module:function", ...options} where function(**options) returns a list of
zero-argument callables, one per layer, each building that layer's nn.Module. The code is importable
on every peer; its source is part of the spec hash, so peers running different code are refused.
"""
from __future__ import annotations

import fnmatch
import hashlib
import importlib
import inspect
import json
import re
from typing import Callable, Iterable

import torch
from torch import nn
from protocols.errors import SplitringError

LayerFactory = Callable[[], nn.Module]


class SpecError(SplitringError, ValueError):
    """A model spec this peer cannot build."""


def mlp(in_features: int = 64, depth: int = 2, width: int = 128, classes: int = 10) -> list[LayerFactory]:
    """`depth` hidden Linear+ReLU layers of `width`, then a Linear classifier: depth+1 layers."""
    sizes = [in_features] + [width] * depth
    hidden = [lambda i=i, o=o: nn.Sequential(nn.Linear(i, o), nn.ReLU()) for i, o in zip(sizes, sizes[1:])]
    return hidden + [lambda: nn.Linear(sizes[-1], classes)]


def cnn(channels: int = 16, classes: int = 10) -> list[LayerFactory]:
    """A small CNN for flattened 8x8 images (digits): 4 layers."""
    c = channels
    return [
        lambda: nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, c, 3, padding=1), nn.ReLU()),
        lambda: nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(2 * c * 16, 64), nn.ReLU()),
        lambda: nn.Linear(64, classes),
    ]


def _more() -> None:
    """The larger built-ins, in modules of their own."""
    from pipeline.gpt import gpt, gpt_input
    from pipeline.resnet import resnet, resnet_input_shape

    BUILTIN["gpt"], INPUT_SHAPES["gpt"], INPUT_DTYPES["gpt"] = gpt, gpt_input, torch.int64
    BUILTIN["resnet"], INPUT_SHAPES["resnet"] = resnet, resnet_input_shape


BUILTIN: dict[str, Callable[..., list[LayerFactory]]] = {"mlp": mlp, "cnn": cnn}
INPUT_SHAPES = {"mlp": lambda o: (o.get("in_features", 64),), "cnn": lambda o: (64,)}
INPUT_DTYPES: dict[str, torch.dtype] = {}   # a model's input dtype where it is not float32 (token ids)
_more()


CUSTOM_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def check_allowed(spec: dict, allowed: Iterable[str]) -> None:
    """Refuse, before anything is imported, a spec naming code that is neither built in nor matched by one
    of `allowed` (fnmatch patterns over "package.module:function", the agent owner's --allow-model)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise SpecError(f"a model spec is a map with a 'name', got {spec!r}")
    name = spec["name"]
    if name in BUILTIN:
        return
    if not CUSTOM_NAME.fullmatch(name):
        raise SpecError(f"unknown model {name[:100]!r}: built-ins are {sorted(BUILTIN)}, or 'package.module:function'")
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
        raise SpecError(f"model {name!r} is custom code, and this agent runs only built-in models ({', '.join(sorted(BUILTIN))}) "
                        f"and those its owner allows: start the agent with --allow-model {name} (or a pattern such as "
                        f"'{name.split(':')[0]}:*') on every peer that should run it")


def _resolve(spec: dict) -> Callable[..., list[LayerFactory]]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise SpecError(f"a model spec is a map with a 'name', got {spec!r}")
    name = spec["name"]
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise SpecError(f"unknown model {name!r}: built-ins are {sorted(BUILTIN)}, or use 'module:function'")
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"model {name!r} is not importable on this peer: {e}") from None
    return func


def options(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("name", "input_shape", "input_dtype")}


def layer_factories(spec: dict) -> list[LayerFactory]:
    try:
        factories = _resolve(spec)(**options(spec))
    except TypeError as e:
        raise SpecError(f"bad options for model {spec['name']!r}: {e}") from None
    if not factories:
        raise SpecError(f"model {spec['name']!r} has no layers")
    return list(factories)


def num_layers(spec: dict) -> int:
    return len(layer_factories(spec))


def input_shape(spec: dict) -> tuple[int, ...]:
    """Shape of one input sample (without the batch dimension)."""
    if "input_shape" in spec:
        return tuple(spec["input_shape"])
    if spec["name"] in INPUT_SHAPES:
        return INPUT_SHAPES[spec["name"]](options(spec))
    raise SpecError(f"model {spec['name']!r} needs an 'input_shape' option")


def input_dtype(spec: dict) -> torch.dtype:
    """The dtype of the model's input: float32, int64 for token ids (a spec may say "input_dtype": "int64")."""
    if spec.get("input_dtype") == "int64":
        return torch.int64
    return INPUT_DTYPES.get(spec["name"], torch.float32)


def sample_input(spec: dict, rows: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Made-up input of `rows` samples (for sizing and profiling): standard normal, or token ids below the
    model's vocab."""
    shape = (rows, *input_shape(spec))
    if input_dtype(spec) == torch.int64:
        if device == "meta":
            return torch.zeros(shape, dtype=torch.int64, device="meta")
        return torch.randint(0, int(spec.get("vocab", 256)), shape, generator=generator)
    return torch.randn(shape, generator=generator, device=device) if device != "meta" else \
        torch.empty(shape, device="meta")


def layer_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"splitring-layer:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_layer(spec: dict, seed: int, index: int, factories: list[LayerFactory] | None = None) -> nn.Module:
    """Layer `index`, its initial weights a function of (spec, seed, index) only."""
    factories = factories or layer_factories(spec)
    if not 0 <= index < len(factories):
        raise SpecError(f"layer {index} out of range: model has {len(factories)} layers")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(layer_seed(seed, index))
        return factories[index]()


def build_model(spec: dict | str, seed: int = 0) -> nn.Sequential:
    """The whole model, built layer by layer exactly as peers build their parts."""
    spec = {"name": spec} if isinstance(spec, str) else spec
    factories = layer_factories(spec)
    return nn.Sequential(*(build_layer(spec, seed, i, factories) for i in range(len(factories))))


def footprint(spec: dict, max_layers: int | None = None) -> list[tuple[tuple[int, ...], int]]:
    """Per layer: the per-sample output shape and the parameter bytes, computed on the meta device (no
    memory, no weights), so a spec can be checked against memory budgets before anything is allocated.
    A model of more than `max_layers` layers is refused before any layer is built."""
    factories = layer_factories(spec)
    if max_layers is not None and len(factories) > max_layers:
        raise SpecError(f"model {spec['name']!r} has {len(factories)} layers, more than the {max_layers} allowed")
    x = sample_input(spec, 1, device="meta")
    out = []
    with torch.device("meta"):
        for i, f in enumerate(factories):
            try:
                layer = f()
                x = layer(x)
            except Exception as e:  # user code: any failure means the spec does not fit its input
                raise SpecError(f"model {spec['name']!r}: layer {i} fails on input of shape "
                                f"{list(x.shape[1:])}: {e}") from None
            out.append((tuple(x.shape[1:]), sum(p.numel() * p.element_size() for p in layer.parameters())))
    return out


def activation_shapes(spec: dict) -> list[tuple[int, ...]]:
    """Per-sample output shape of every layer (on the meta device)."""
    return [shape for shape, _ in footprint(spec)]


def spec_hash(spec: dict) -> str:
    """Hash of the spec and of the source code that builds it."""
    func = _resolve(spec)
    try:
        source = inspect.getsource(inspect.getmodule(func))
    except (OSError, TypeError):
        source = func.__qualname__
    blob = json.dumps(spec, sort_keys=True).encode() + b"\0" + source.encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def parse_spec(name: str, opts: str = "") -> dict:
    """CLI form: --model mlp --model-options depth=4,width=256 (values parsed as JSON where possible)."""
    spec: dict = {"name": name}
    for item in filter(None, (s.strip() for s in opts.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"model option {item!r} is not key=value")
        try:
            spec[key] = json.loads(value)
        except json.JSONDecodeError:
            spec[key] = value
    return spec
