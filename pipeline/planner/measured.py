"""Layer costs and devices from the profiled CSVs (pipeline.profiles).

Conversions: KiB -> bytes (x 1024, rounded), ms -> s. Optimizer state is `optimizer_state` x the
parameter bytes (1: SGD with momentum, the default; 2: Adam; 0: plain SGD). A profile row is one
microbatch. The profiles' `update_ms` (the optimizer step, a few percent of a step) is left out: the
cost model has no per-step term.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.planner.model import Device, LayerCost
from pipeline.device_profiles import load_compute, load_memory


def layers_from_profile(name: str, reference: str = "VM", optimizer_state: float = 1.0,
                        directory: Path | None = None) -> list[LayerCost]:
    """The model's layers, with `reference`'s times as the reference times (see `Device.speed`)."""
    compute, memory = load_compute(name, directory), load_memory(name, directory)
    if reference not in compute:
        raise ValueError(f"profile {name} has no device {reference!r} (known: {', '.join(compute)})")
    ref = compute[reference]
    return [LayerCost(f / 1000, b / 1000, round(w * 1024), round(w * 1024 * optimizer_state), round(a * 1024))
            for f, b, w, a in zip(ref.forward_ms, ref.backward_ms, memory.weights_kb, memory.activation_kb)]


def devices_from_profile(name: str, device_names: list[str], directory: Path | None = None) -> list[Device]:
    """Devices with their own measured times, default links and no memory limit (set those with
    dataclasses.replace). A name given twice becomes 'd1', 'd1#2', ... so that peers stay distinct."""
    compute = load_compute(name, directory)
    devices = []
    for i, dev in enumerate(device_names):
        if dev not in compute:
            raise ValueError(f"profile {name} has no device {dev!r} (known: {', '.join(compute)})")
        p = compute[dev]
        if sum(p.forward_ms) + sum(p.backward_ms) <= 0:
            raise ValueError(f"device {dev} has no measurements in profile {name} (all times are zero)")
        count = device_names[:i + 1].count(dev)
        devices.append(Device(dev if count == 1 else f"{dev}#{count}",
                              forward_s=tuple(t / 1000 for t in p.forward_ms),
                              backward_s=tuple(t / 1000 for t in p.backward_ms)))
    return devices
