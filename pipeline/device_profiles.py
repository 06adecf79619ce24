"""Per-layer device profiles: the real ones in shared/data/profiles, and our own measurements.

A profile file pair is `<model>_<dataset>_compute.csv` (device,layer,forward_ms,backward_ms,update_ms)
and `<model>_<dataset>_memory.csv` (layer,activation_kb,weights_kb). Values are kept as published,
outliers included (see the README beside the files).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path


def profiles_dir() -> Path:
    """Where the shared device profiles live: $SPLITRING_PROFILES, else ../shared/data/profiles
    next to the repository checkout."""
    env = os.environ.get("SPLITRING_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "profiles"


@dataclass(frozen=True)
class ComputeProfile:
    """Milliseconds per layer for one training step of one batch on one device."""
    device: str
    forward_ms: tuple[float, ...]
    backward_ms: tuple[float, ...]
    update_ms: tuple[float, ...]


@dataclass(frozen=True)
class MemoryProfile:
    """Per layer: KiB of the activation it outputs and KiB of its weights."""
    activation_kb: tuple[float, ...]
    weights_kb: tuple[float, ...]


def available(directory: Path | None = None) -> list[str]:
    """Names like 'resnet101_cifar' for which both files exist."""
    d = directory or profiles_dir()
    return sorted(p.name[: -len("_compute.csv")] for p in d.glob("*_compute.csv")
                  if (d / p.name.replace("_compute.csv", "_memory.csv")).exists())


def _path(name: str, kind: str, directory: Path | None) -> Path:
    path = (directory or profiles_dir()) / f"{name}_{kind}.csv"
    if not path.exists():
        raise FileNotFoundError(f"no profile {name!r}: {path} does not exist "
                                f"(known: {', '.join(available(directory)) or 'none'})")
    return path


def load_compute(name: str, directory: Path | None = None) -> dict[str, ComputeProfile]:
    """Device name -> its compute profile, layers in order."""
    rows: dict[str, list[tuple[int, float, float, float]]] = {}
    with open(_path(name, "compute", directory), newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["device"], []).append(
                (int(r["layer"]), float(r["forward_ms"]), float(r["backward_ms"]), float(r["update_ms"])))
    out = {}
    for dev, rs in rows.items():
        rs.sort()
        if [r[0] for r in rs] != list(range(len(rs))):
            raise ValueError(f"profile {name}: device {dev} layers are not 0..{len(rs) - 1}")
        out[dev] = ComputeProfile(dev, tuple(r[1] for r in rs), tuple(r[2] for r in rs), tuple(r[3] for r in rs))
    return out


def load_memory(name: str, directory: Path | None = None) -> MemoryProfile:
    with open(_path(name, "memory", directory), newline="") as f:
        rs = sorted((int(r["layer"]), float(r["activation_kb"]), float(r["weights_kb"])) for r in csv.DictReader(f))
    return MemoryProfile(tuple(r[1] for r in rs), tuple(r[2] for r in rs))
