"""Exact peak tensor memory of a block of work, counted storage by storage.

Resident memory (RSS) is a poor ruler for comparing two training steps on CPU: the allocator keeps
freed pages, and sampling misses short peaks, so the same step reads tens of MiB apart between
runs. Instead, this mode sees every tensor that an operator returns inside the block, adds its
storage's bytes once, and takes them away when the storage is freed. The peak of that running sum
is the same on every run, so two methods can be compared to the MiB.

Tensors that existed before the block (weights, the batch) are registered first and never counted;
views and in-place results share a storage and are counted once. Scratch memory that a kernel
allocates internally and never returns as a tensor is not seen, alike for every method compared.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class TensorPeak(TorchDispatchMode):
    """`with TensorPeak(existing) as m: work()`, then `m.peak_bytes` and `m.live_bytes`."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        for tensor in existing:
            self._seen[tensor.untyped_storage()] = 0

    def _free(self, nbytes: int, _ref: weakref.ref) -> None:
        self.live_bytes -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self._refs.append(weakref.ref(storage, lambda ref, n=nbytes: self._free(n, ref)))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._track(leaf)
        return out


def existing_tensors(model: torch.nn.Module, batch: dict[str, Any]) -> list[torch.Tensor]:
    """What a step finds already in memory: the model's parameters and buffers, and the batch."""
    tensors = [*model.parameters(), *model.buffers()]
    return tensors + [v for v in batch.values() if isinstance(v, torch.Tensor)]
