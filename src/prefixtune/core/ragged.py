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
    """Where each packed token goes: its cache row and column, and how its query attends.

    The leading rows that feed one token each (the running rows: the scheduler packs them first) attend
    as in a plain decoding step, one query each; only the rows after them (the joining prompts) are laid
    out in a block as long as the longest of them. Padding every running row's single query to that
    length multiplied their attention by it: a SmolLM2 step of 13 running rows took 116 ms with one
    11-token prompt riding against 76 ms without, a quarter of the difference in attention.
    """

    rows: torch.Tensor  # [N] cache row of each packed token
    columns: torch.Tensor  # [N] cache column (within the columns in use after the step)
    single: int  # the leading rows that feed one token: packed tokens 0..single-1, one each
    single_mask: torch.Tensor  # [single, 1, 1, width] bool: the key columns each of their queries sees
    block_rows: torch.Tensor  # [N - single] the other tokens' rows within the block (cache row - single)
    slots: torch.Tensor  # [N - single] their query slots, right-aligned in their row's block
    mask: torch.Tensor  # [rows - single, 1, longest, width] bool: the key columns each query slot sees

    @property
    def width(self) -> int:
        return self.single_mask.shape[-1]

    @classmethod
    def build(cls, lengths: list[int], visible: torch.Tensor) -> RaggedPlan:
        """A plan for rows feeding `lengths[r]` tokens each, ending at the last of `visible`'s columns."""
        device = visible.device
        width = visible.shape[1]
        single = next((r for r, n in enumerate(lengths) if n != 1), len(lengths))
        counts = torch.tensor(lengths, device=device)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), counts)
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum()), device=device) - starts[rows]  # token index within its row
        longest = max(lengths[single:], default=1)
        slots = (longest - counts[rows] + within)[single:]
        columns = torch.cat([torch.full((single,), width - 1, device=device), width - longest + slots])
        slot_columns = width - longest + torch.arange(longest, device=device)
        causal = torch.arange(width, device=device)[None, :] <= slot_columns[:, None]  # [longest, width]
        rest = visible[single:]
        mask = rest[:, None, :] & causal[None]
        padding = torch.arange(longest, device=device)[None, :] < (longest - counts[single:])[:, None]  # no query
        mask = torch.where(padding[..., None], rest[:, None, :], mask)  # never an all-masked query row
        return cls(rows, columns, single, visible[:single, None, None, :], rows[single:] - single, slots, mask[:, None])


def attend(plan: RaggedPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           scale: float | None) -> torch.Tensor:  # fmt: skip
    """Packed queries `[1, heads, N, dim]` against per-row keys/values `[rows, kv_heads, width, dim]`:
    the output as attention functions return it, `[1, N, heads, dim]`."""
    gqa = key.shape[1] != query.shape[1]
    single = plan.single
    parts = []
    if single:
        out = torch.nn.functional.scaled_dot_product_attention(
            query[0, :, :single].transpose(0, 1)[:, :, None], key[:single], value[:single],
            attn_mask=plan.single_mask, scale=scale, enable_gqa=gqa)  # fmt: skip
        parts.append(out[:, :, 0])
    if plan.mask.shape[0]:
        rows, longest = plan.mask.shape[0], plan.mask.shape[2]
        block = query.new_zeros(rows, query.shape[1], longest, query.shape[3])
        block[plan.block_rows, :, plan.slots] = query[0, :, single:].transpose(0, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            block, key[single:], value[single:], attn_mask=plan.mask, scale=scale, enable_gqa=gqa
        )
        parts.append(out[plan.block_rows, :, plan.slots])
    return torch.cat(parts)[None] if len(parts) > 1 else parts[0][None]
