"""The learned tensors themselves: prefix keys/values (plain or through an MLP) and soft prompts.

A prefix table has shape `[P, S, 2, kv_heads, head_dim]`, i.e. per virtual token, per attention slot,
keys then values. Its memory layout equals PEFT's `[P, layers * 2 * token_dim]`, which keeps import
and export a reshape.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixKV(nn.Module):
    """Keys/values for the selected slots, learned directly or through Li & Liang's MLP."""

    def __init__(
        self, length: int, slots: int, kv_heads: int, head_dim: int, hidden_size: int, reparam: str, hidden: int
    ) -> None:
        super().__init__()
        self.shape = (length, slots, 2, kv_heads, head_dim)
        if reparam == "mlp":
            self.embedding = nn.Parameter(torch.empty(length, hidden_size).normal_(std=0.02))
            self.mlp = nn.Sequential(
                nn.Linear(hidden_size, hidden), nn.Tanh(), nn.Linear(hidden, slots * 2 * kv_heads * head_dim)
            )
        else:
            self.table = nn.Parameter(torch.zeros(self.shape))

    @property
    def reparameterised(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self) -> torch.Tensor:
        if self.reparameterised:
            return self.mlp(self.embedding).view(self.shape)
        return self.table

    def collapsed(self) -> torch.Tensor:
        """The plain table an inference user needs; the MLP is a training device only."""
        with torch.no_grad():
            return self().detach().clone()


class SoftPrompt(nn.Module):
    """P vectors joined to the input embeddings. Frozen when it is a discrete text's embeddings."""

    def __init__(self, embeddings: torch.Tensor, trainable: bool) -> None:
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().clone(), requires_grad=trainable)

    def forward(self) -> torch.Tensor:
        return self.embedding


def table_to_kv(table: torch.Tensor, slot_of: list[int | None]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Split `[B?, P, S, 2, H, D]` into per-model-slot `(keys, values)` of `[B or 1, H, P, D]`.

    `slot_of[i]` is the table column of model slot i, or None for a slot left without a prefix.
    """
    if table.dim() == 5:
        table = table.unsqueeze(0)
    kv = table.permute(2, 3, 0, 4, 1, 5)  # [S, 2, B, H, P, D]
    return [None if col is None else (kv[col, 0], kv[col, 1]) for col in slot_of]


def kv_to_table(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of `table_to_kv` for batch-1 recordings: `[1, H, P, D]` pairs -> `[P, S, 2, H, D]`."""
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])  # [S, 2, H, P, D]
    return stacked.permute(3, 0, 1, 2, 4).contiguous()
