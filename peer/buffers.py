"""Receive buffers, reused. A tensor read off the network is made in a buffer of this pool, and the buffer
goes back to the pool once every tensor sharing its memory is gone. Training moves tensors of the same few
sizes over and over, so a received activation lands in memory that is already mapped instead of fresh
pages, whose faults and zeroing cost about as much as the copy from the socket itself."""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch


class BufferPool:
    def __init__(self, max_free_bytes: int = 256 << 20):
        self.max_free_bytes = max_free_bytes  # free buffers kept beyond this are given back to the allocator
        self.free_bytes = 0
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()  # buffers come back on whichever thread drops the last tensor
        self._lent: dict[int, tuple] = {}   # id of a weak reference -> (it, the buffer it returns)

    def tensor(self, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """An uninitialised writable tensor of `nbytes` bytes (nbytes > 0), and a view of its bytes."""
        with self._lock:
            spare = self._free.get(nbytes)
            buf = spare.pop() if spare else None
            if buf is not None:
                self.free_bytes -= nbytes
        if buf is None:
            buf = bytearray(nbytes)
        # every tensor made from `array` keeps it alive through its storage; when the last one goes, so does
        # `array`, and the callback of its weak reference returns the buffer (a plain weak reference: a
        # finalizer costs several microseconds more a frame)
        array = np.frombuffer(buf, dtype=np.uint8)
        ref = weakref.ref(array, self._release)
        self._lent[id(ref)] = ref, buf
        return torch.from_numpy(array).view(dtype).reshape(shape), memoryview(buf)

    def _release(self, ref: weakref.ref) -> None:
        _, buf = self._lent.pop(id(ref))
        with self._lock:
            if self.free_bytes + len(buf) <= self.max_free_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self.free_bytes += len(buf)
