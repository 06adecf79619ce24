"""Datasets and the order samples are visited in.

Sources: `digits` (scikit-learn's bundled 8x8 digits, pixels scaled to [0, 1]; a fixed split: a
permutation from numpy's PCG64 seeded with 0, the first 1437 samples train, the last 360 held out),
`FILE.npz` (arrays `x` float32 and `y` int64, optional held-out `x_test`, `y_test`), or none.
`--shard k/n` keeps the k-th of n contiguous, disjoint blocks of the train split.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from protocols.errors import SplitringError

DIGITS_TRAIN = 1437


class DataError(SplitringError, ValueError):
    """Data that cannot be used, with a message saying why."""


@dataclass
class Dataset:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_test(self) -> int:
        return 0 if self.y_test is None else len(self.y_test)

    def for_model(self, spec: dict) -> "Dataset":
        """The samples a job of this model trains on (text is cut into sequences of the model's context)."""
        return self


@dataclass
class Text(Dataset):
    """Byte-level text (`--data text:FILE`): tokens 0..255, the first 90% of the file to train on (this
    peer's shard: a contiguous block of it), the last 10% held out (the same tail on every peer given the
    file). A job cuts both into sequences of its model's context length T: sample i is the tokens
    [i*T, i*T + T) and its labels the next token at each position, [i*T + 1, i*T + T + 1)."""
    tokens: torch.Tensor | None = None
    test_tokens: torch.Tensor | None = None

    def __len__(self) -> int:   # (for an agent's status: it has data, in tokens)
        return len(self.tokens)

    def for_model(self, spec: dict) -> Dataset:
        from pipeline.models import input_shape

        context = input_shape(spec)[0]
        (x, y), (x_test, y_test) = sequences(self.tokens, context), sequences(self.test_tokens, context)
        return Dataset(self.name, x, y, x_test, y_test)


def sequences(tokens: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(0, (len(tokens) - 1) // context)
    return tokens[:n * context].view(n, context), tokens[1:n * context + 1].view(n, context)


def text(path: str, shard: str | None = None) -> Text:
    if not os.path.isfile(path):
        raise DataError(f"text file {path} does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 20:
        raise DataError(f"text file {path} has {len(raw)} bytes: too little to train on and hold out a tail")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    cut = len(tokens) * 9 // 10
    k, n = parse_shard(shard)
    train = tokens[:cut].tensor_split(n)[k]
    return Text(f"text:{os.path.basename(path)}", torch.empty(0, 0), torch.empty(0, dtype=torch.int64),
                tokens=train, test_tokens=tokens[cut:])


def empty() -> Dataset:
    return Dataset("none", torch.empty(0, 0), torch.empty(0, dtype=torch.int64))


def digits_table() -> np.ndarray:
    """scikit-learn's bundled digits as its file holds them: 64 pixels then the label, a row per image.
    Read without importing sklearn, which would cost every agent 0.7 s at start (load_digits reads the same
    file: a test compares the two)."""
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    return np.loadtxt(os.path.join(package, "datasets", "data", "digits.csv.gz"), delimiter=",")


def digits() -> Dataset:
    table = digits_table()
    order = np.random.default_rng(0).permutation(len(table))
    x = torch.from_numpy((table[order, :-1] / 16.0).astype(np.float32))
    y = torch.from_numpy(table[order, -1].astype(np.int64))
    return Dataset("digits", x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])


def _pair(arrays, xk: str, yk: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = arrays[xk], arrays[yk]
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: {xk} must be floating point (float32), got {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {yk} must be integer class labels (int64), got {y.dtype}")
    if y.ndim != 1 or x.ndim < 2 or len(x) != len(y):
        raise DataError(f"{path}: {xk} must be (N, ...) and {yk} (N,); got {x.shape} and {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: {yk} has negative labels (first at sample {int(np.argmax(y < 0))})")
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1) if len(x) else np.zeros(0, bool)
    if bad.any():
        raise DataError(f"{path}: {xk} has {int(bad.sum())} sample(s) with NaN or infinite values (first at sample "
                        f"{int(np.argmax(bad))}); splitring trains on finite inputs only")
    return torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y.astype(np.int64))


def npz(path: str) -> Dataset:
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    missing = {"x", "y"} - arrays.keys()
    if missing:
        raise DataError(f"{path} lacks array(s) {sorted(missing)}: an .npz needs 'x' (float32) and 'y' (int64)")
    x, y = _pair(arrays, "x", "y", path)
    ds = Dataset(os.path.basename(path), x, y)
    if "x_test" in arrays and "y_test" in arrays:
        ds.x_test, ds.y_test = _pair(arrays, "x_test", "y_test", path)
    return ds


def fits_model(ds: Dataset, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> str | None:
    """Why a model with these per-sample input and output shapes cannot train on `ds` (its samples' shape,
    labels beyond the model's classes), or None. Empty data (a compute-only peer) fits anything."""
    classes, positions = output_shape[-1], tuple(output_shape[:-1])   # scores per class, at each position
    for split, x, y in (("train", ds.x, ds.y), ("held-out", ds.x_test, ds.y_test)):
        if y is None or not len(y):
            continue
        if tuple(x.shape[1:]) != tuple(input_shape):
            return (f"its {split} data ({ds.name}) has samples of shape {list(x.shape[1:])}, the model expects "
                    f"{list(input_shape)}")
        if tuple(y.shape[1:]) != positions:
            return (f"its {split} data ({ds.name}) has labels of shape {list(y.shape[1:])} per sample, but the model "
                    f"scores {list(positions) or 'one position'} per sample (its output: {list(output_shape)})")
        top = int(y.max())
        if top >= classes:
            return (f"its {split} data ({ds.name}) has label {top} (sample {int(torch.argmax((y >= classes).int()))}), "
                    f"but the model has {classes} classes (0 to {classes - 1}): give the model more classes "
                    f"(--model-options classes={top + 1}) or fix the labels")
    return None


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    k, sep, n = text.partition("/")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        raise DataError(f"--shard must look like k/n, got {text!r}") from None
    if not sep or n_i < 1 or not 0 <= k_i < n_i:
        raise DataError(f"--shard {text!r}: need 0 <= k < n")
    return k_i, n_i


def parse_partition(text: str) -> tuple[str, float]:
    """--partition: blocks (contiguous), iid, dirichlet:ALPHA or classes:K -> (kind, parameter)."""
    kind, _, arg = text.partition(":")
    try:
        if kind in ("blocks", "iid") and not arg:
            return kind, 0.0
        if kind == "dirichlet" and float(arg) > 0 and np.isfinite(float(arg)):
            return kind, float(arg)
        if kind == "classes" and int(arg) >= 1:
            return kind, int(arg)
    except ValueError:
        pass
    raise DataError(f"--partition must be blocks, iid, dirichlet:ALPHA (ALPHA > 0) or classes:K (K >= 1), got {text!r}")


def partition(y: np.ndarray, n: int, how: str = "blocks", seed: int = 0) -> list[np.ndarray]:
    """The train split's indices for each of n peers, deterministic from the seed: blocks (contiguous
    blocks); iid (a seeded permutation cut in n near-equal parts); dirichlet:ALPHA (each class's samples
    split over the peers in proportions drawn from Dirichlet(ALPHA): small ALPHA, few classes per peer);
    classes:K (peer k holds classes kK, kK+1, ..., kK+K-1 modulo the number of classes, each class split
    evenly over the peers that hold it; with fewer than classes/K peers, the classes no peer holds are left
    out)."""
    kind, arg = parse_partition(how)
    rng = np.random.default_rng(seed)
    if kind == "blocks":
        return np.array_split(np.arange(len(y)), n)
    if kind == "iid":
        return [np.sort(b) for b in np.array_split(rng.permutation(len(y)), n)]
    classes = np.unique(y)
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for i, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(y == c))
        if kind == "dirichlet":
            share = rng.dirichlet(np.full(n, arg))
            cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
            for k, block in enumerate(np.split(members, cuts)):
                parts[k].append(block)
        else:
            holders = [k for k in range(n) if (i - k * arg) % len(classes) < arg]
            for k, block in zip(holders, np.array_split(members, len(holders)) if holders else []):
                parts[k].append(block)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def load(source: str | None, shard: str | None = None, how: str = "blocks", seed: int = 0) -> Dataset:
    """The train split (this peer's shard of it, partitioned `how`: see partition) and held-out split of a
    data source."""
    if not source:
        return empty()
    if source.startswith("text:"):
        if how != "blocks":
            raise DataError(f"--partition {how}: text is split into contiguous blocks (--shard k/n) only")
        return text(source[len("text:"):], shard)
    ds = digits() if source == "digits" else npz(source)
    k, n = parse_shard(shard)
    block = partition(ds.y.numpy(), n, how, seed)[k]
    ds.x, ds.y = ds.x[block], ds.y[block]
    return ds


def pass_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """Indices a head visits its shard in during the pass of `epoch`."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def num_steps(n: int, batch_size: int) -> int:
    """Optimizer steps of an n-sample pass: len(batch_sizes(n, batch_size)), without listing them."""
    return -(-n // batch_size)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches (optimizer steps) of an n-sample pass; the last may be short."""
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def microbatch_sizes(batch: int, microbatches: int) -> list[int]:
    """A batch cut into at most `microbatches` near-equal non-empty parts (as torch.tensor_split: the
    first batch % parts are one larger)."""
    parts = min(microbatches, batch)
    return [batch // parts + (i < batch % parts) for i in range(parts)] if parts > 0 else []
