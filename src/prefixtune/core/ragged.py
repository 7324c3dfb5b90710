"""One forward for the running rows' next tokens and the joining rows' whole prompts (a ragged step).

Why: a joining row's prompt fed in a forward of its own costs a pass over the weights (85 ms for a
6-token SmolLM2 prompt on 2 cores) during which every running row waits; inside the decoding step it
costs only its tokens. The step's tokens are packed into one sequence, so the weight matrices see
each token once, and only attention, which is cheap beside them, is laid out per row: each row's
queries are right-aligned in a `[rows, heads, longest, head_dim]` block against its own cache row,
behind a mask that gives each query its row's visible columns up to its own.

The plan travels in the prefix state (`PrefixState.ragged`), so the model's own forward, rotary
embeddings and cache update run unchanged: `GrowingLayer.update` scatters the packed keys/values to
their rows and columns, and prefixtune's registered attention function calls `attend` instead of the
stock kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RaggedPlan:
    """Where each packed token goes: its cache row and column, and its query slot in its row's block."""

    rows: torch.Tensor  # [N] cache row of each packed token
    columns: torch.Tensor  # [N] cache column (within the columns in use after the step)
    slots: torch.Tensor  # [N] query slot, right-aligned: slot s of every row is column width - longest + s
    mask: torch.Tensor  # [rows, 1, longest, width] bool: the key columns each query slot sees

    @classmethod
    def build(cls, lengths: list[int], visible: torch.Tensor) -> RaggedPlan:
        """A plan for rows feeding `lengths[r]` tokens each, ending at the last of `visible`'s columns."""
        device = visible.device
        width, longest = visible.shape[1], max(lengths)
        counts = torch.tensor(lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum()), device=device) - starts[rows]  # token index within its row
        slots = longest - counts[rows] + within
        columns = width - longest + slots
        slot_columns = width - longest + torch.arange(longest, device=device)
        causal = torch.arange(width, device=device)[None, :] <= slot_columns[:, None]  # [longest, width]
        mask = visible[:, None, :] & causal[None]
        padding = torch.arange(longest, device=device)[None, :] < (longest - counts)[:, None]  # no query there
        mask = torch.where(padding[..., None], visible[:, None, :], mask)  # never an all-masked query row
        return cls(rows, columns, slots, mask[:, None])


def attend(plan: RaggedPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scale: float | None) -> torch.Tensor:  # fmt: skip
    """Packed queries `[1, heads, N, dim]` against per-row keys/values `[rows, kv_heads, width, dim]`:
    the output as attention functions return it, `[1, N, heads, dim]`."""
    rows, longest = plan.mask.shape[0], plan.mask.shape[2]
    block = query.new_zeros(rows, query.shape[1], longest, query.shape[3])
    block[plan.rows, :, plan.slots] = query[0].transpose(0, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        block, key, value, attn_mask=plan.mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1]
    )
    return out[plan.rows, :, plan.slots][None]
