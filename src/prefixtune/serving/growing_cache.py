"""A `DynamicCache` whose layers grow in place, for the continuous scheduler's running batch.

Why: `DynamicLayer.update` concatenates, so every decoding step copies the whole cache of every
layer to add one column. On SmolLM2 with 16 rows of about 80 positions on 2 cores, those copies were
21% of a step (`aten::cat`, 25 ms of 122 ms in torch's profiler). Here each layer keeps its keys and
values in a buffer with spare rows and columns: a step writes its column into them, dropping the
padding no row needs moves a start index, a joining row is written into a spare row, a leaving row's
place is taken by the last row, and `keys`/`values` are views of the rows and columns in use. Only
outgrowing the buffer copies it, into a fresh one with room to grow.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from prefixtune.core.ragged import RaggedPlan

_MIN_ROOM = 64  # spare columns at least; else a quarter of those in use, so growing costs O(1) per step
_MIN_SPARE_ROWS = 4


def _capacity(width: int) -> int:
    return width + max(_MIN_ROOM, width // 4)


def _buffer(like: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """An empty buffer for `rows` rows of `width` columns like `like`, with spare rows and columns."""
    return like.new_empty(rows + max(_MIN_SPARE_ROWS, rows // 2), like.shape[1], _capacity(width), like.shape[3])


def fill_order(keep: list[int], rows: int) -> list[int]:
    """The row order after keeping `keep` (ascending) of `rows` rows when each gap is filled by a kept row
    from the end: entry j is the old index of the row now at j. Only rows past the gaps move."""
    kept, count = set(keep), len(keep)
    movers = [i for i in range(rows - 1, count - 1, -1) if i in kept]
    return [i if i in kept else movers.pop() for i in range(count)]


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer over `[row capacity, heads, column capacity, head_dim]` buffers;
    rows `:rows` and columns `start:end` are in use."""

    def __init__(self, **kwargs: Any):
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self.rows = self.start = self.end = 0
        self.plan: RaggedPlan | None = None  # set for a ragged step: where its packed keys/values go
        super().__init__(**kwargs)

    # Whole assignments (DynamicLayer's own methods, `lazy_initialization`) land in a fresh buffer.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[: self.rows, :, self.start : self.end]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys = self._copy(tensor)
        self.rows, self.start, self.end = (0, 0, 0) if self._keys is None else (tensor.shape[0], 0, tensor.shape[2])

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[: self.rows, :, self.start : self.end]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values = self._copy(tensor)  # assigned with `keys`, after it: the two share the extents

    @staticmethod
    def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or tensor.dim() != 4:  # unset, or DynamicLayer's empty placeholder
            return None
        buffer = _buffer(tensor, tensor.shape[0], tensor.shape[2])
        buffer[: tensor.shape[0], :, : tensor.shape[2]] = tensor
        return buffer

    def get_seq_length(self) -> int:
        return self.end - self.start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.plan is not None:
            return self._scatter(key_states, value_states)
        if self._keys is None:
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        self.reserve(self.get_seq_length() + key_states.shape[2])
        end = self.end + key_states.shape[2]
        self._keys[: self.rows, :, self.end : end] = key_states
        self._values[: self.rows, :, self.end : end] = value_states
        self.end = end
        return self.keys, self.values

    def _scatter(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A ragged step's packed `[1, kv_heads, N, head_dim]` keys/values, each to its row and column; the
        columns in use then end after the plan's last column (`reserve` made room for it)."""
        columns = self.start + self.plan.columns
        self._keys[self.plan.rows, :, columns] = key_states[0].transpose(0, 1)
        self._values[self.plan.rows, :, columns] = value_states[0].transpose(0, 1)
        self.end = self.start + self.plan.width
        return self.keys, self.values

    def reserve(self, width: int) -> None:
        """Room for `width` columns in use (from `start`): a step, or a ragged step's scatter, then writes in place."""
        if self.start + width > self._keys.shape[2]:
            self._keys, self._values = self._shifted(self._keys, 0, width), self._shifted(self._values, 0, width)
            self.start, self.end = 0, self.end - self.start

    # The running batch's layout changes.
    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Any selection and order of rows, into a fresh buffer (`move_rows` is the in-place way)."""
        if self._keys is not None:
            self.keys, self.values = self.keys[indices], self.values[indices]

    def move_rows(self, order: list[int]) -> None:
        """Keep rows `order` (from `fill_order`: every row that moves goes to a lower index) in place."""
        for j, i in enumerate(order):
            if i != j:
                self._keys[j, :, self.start : self.end] = self._keys[i, :, self.start : self.end]
                self._values[j, :, self.start : self.end] = self._values[i, :, self.start : self.end]
        self.rows = len(order)

    def drop_front(self, n: int) -> None:
        """Forget the first `n` columns in use (padding no row needs any more)."""
        self.start = min(self.start + n, self.end)

    def prepend(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put `keys`/`values` (`[rows, heads, n, head_dim]`) before the columns in use."""
        n = keys.shape[2]
        if self.start < n:
            self._keys, self._values = self._shifted(self._keys, n), self._shifted(self._values, n)
            self.start, self.end = n, n + self.end - self.start
        self.start -= n
        self._keys[: self.rows, :, self.start : self.start + n] = keys
        self._values[: self.rows, :, self.start : self.start + n] = values

    def _shifted(self, buffer: torch.Tensor, front: int, width: int = 0) -> torch.Tensor:
        """A fresh buffer with the columns in use after `front` free ones, and room for `width` columns."""
        used = self.end - self.start
        fresh = _buffer(buffer, self.rows, max(front + used, width))
        fresh[: self.rows, :, front : front + used] = buffer[: self.rows, :, self.start : self.end]
        return fresh

    def pad_front(self, n: int) -> None:
        """`n` zero columns before those in use."""
        if n:
            shape = (self.rows, self._keys.shape[1], n, self._keys.shape[3])
            self.prepend(self._keys.new_zeros(shape), self._values.new_zeros(shape))

    def stack(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows (`[rows, kv_heads, width, head_dim]`, as wide as these) below these: into spare rows
        when there are enough."""
        theirs, mine = keys.shape[2], self.get_seq_length()
        if theirs != mine:
            raise ValueError(f"rows of width {theirs} cannot join rows of width {mine}")
        rows = self.rows + keys.shape[0]
        if rows > self._keys.shape[0]:
            self._keys, self._values = self._grown(self._keys, rows), self._grown(self._values, rows)
        self._keys[self.rows : rows, :, self.start : self.end] = keys
        self._values[self.rows : rows, :, self.start : self.end] = values
        self.rows = rows

    def _grown(self, buffer: torch.Tensor, rows: int) -> torch.Tensor:
        """A fresh buffer with room for `rows` rows, holding the rows and columns in use at the same places."""
        fresh = _buffer(buffer, rows, self.end)
        fresh[: self.rows, :, self.start : self.end] = buffer[: self.rows, :, self.start : self.end]
        return fresh


def growing_cache(config: Any) -> DynamicCache:
    """A cache for `config`'s model whose layers grow in place (full attention only, as the scheduler)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache
