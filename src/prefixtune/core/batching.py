"""Turn "row i uses prefix m_i" into what one forward pass needs; one path for one prefix or many.

A prefix hands this module plain data, a `PrefixInputs`: its keys/values or its input embeddings,
how far it shifts positions, its own heads and its pooling. A group is `(rows, inputs)`: `rows` a
LongTensor of batch rows, or None for the whole batch. Rows in no group run the bare base model.
Prefixes of different lengths are padded and masked, never padded with values that attend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from prefixtune.core import attention
from prefixtune.errors import PrefixTuneError


@dataclasses.dataclass
class PrefixInputs:
    """What one prefix contributes to a forward pass: exactly one of `kv` and `prompt` is set."""

    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None  # per slot, `[1, kv_heads, P, head_dim]`
    prompt: torch.Tensor | None  # `[P, hidden]`, joined to the input embeddings
    offset: int  # positions the real tokens are shifted by (0: none)
    heads: list[tuple[nn.Module, nn.Module]]  # (the base model's head, this prefix's own copy)
    mean_pool: bool


Group = tuple["torch.Tensor | None", PrefixInputs]


def build_state(slots: dict, groups: list[Group], batch: int) -> attention.PrefixState:
    """The attention state for key/value prefixes, with per-row offsets, heads and pooling."""
    kv_groups = [(rows, part, part.kv) for rows, part in groups if part.kv is not None]
    heads: dict = {}
    for rows, part in groups:
        for base_head, head in part.heads:
            heads.setdefault(base_head, []).append((rows, head))
    mean_pool = [rows for rows, part in groups if part.mean_pool] or None
    if len(kv_groups) == 1 and kv_groups[0][0] is None:  # one prefix for all rows: no copies
        _, part, kv = kv_groups[0]
        kv = [None if p is None else (p[0], p[1], None) for p in kv]
        offset = part.offset or None
        return attention.PrefixState(slots=slots, kv=kv, offset=offset, heads=heads or None, mean_pool=mean_pool)
    table: list = []
    for slot in range(len(slots)):
        present = [(rows, p[slot]) for rows, _, p in kv_groups if p[slot] is not None]
        if not present:
            table.append(None)
            continue
        k0 = present[0][1][0]
        plen = max(p[0].shape[2] for _, p in present)
        keys = k0.new_zeros(batch, k0.shape[1], plen, k0.shape[3])
        values = torch.zeros_like(keys)
        visible = torch.zeros(batch, plen, dtype=torch.bool, device=k0.device)
        for rows, (k, v) in present:  # right-aligned: every prefix ends where its row's tokens begin,
            n = k.shape[2]  # which is what a distance-based bias (ALiBi) measures from
            index = slice(None) if rows is None else rows
            keys[index, :, plen - n :] = k[0]
            values[index, :, plen - n :] = v[0]
            visible[index, plen - n :] = True
        table.append((keys, values, visible))
    offset = torch.zeros(batch, dtype=torch.long)
    for rows, part, _ in kv_groups:
        offset[slice(None) if rows is None else rows] = part.offset
    uses_offset = any(part.offset for _, part, _ in kv_groups)
    return attention.PrefixState(
        slots=slots, kv=table, offset=offset if uses_offset else None, heads=heads or None, mean_pool=mean_pool
    )


def join_prompts(kwargs: dict[str, Any], groups: list[Group], embeddings: torch.nn.Module, at: int) -> dict[str, Any]:
    """Insert each row's soft prompt into its input embeddings at position `at`, then right-pad.

    Every row is laid out exactly as it would be alone (`[:at] prompt [at:] padding`), so a row's
    output does not depend on the prompts of its neighbours.
    """
    prompt_groups = [(rows, part) for rows, part in groups if part.prompt is not None]
    if not prompt_groups:
        return kwargs
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        if ids is None:
            raise PrefixTuneError("pass input_ids or inputs_embeds")
        embeds = embeddings(ids)
    batch, length = embeds.shape[:2]
    at = min(at, length)
    prompts: list[torch.Tensor | None] = [None] * batch
    for rows, part in prompt_groups:
        prompt = part.prompt.to(embeds.dtype)
        for r in range(batch) if rows is None else rows.tolist():
            prompts[r] = prompt
    widest = max(0 if p is None else p.shape[0] for p in prompts)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    columns = {"attention_mask": (mask, 1)}
    if kwargs.get("token_type_ids") is not None:
        columns["token_type_ids"] = (kwargs["token_type_ids"], 0)
    out_embeds, out_cols = [], {name: [] for name in columns}
    for r, prompt in enumerate(prompts):
        n = 0 if prompt is None else prompt.shape[0]
        pieces = (
            [embeds[r, :at]] + ([prompt] if n else []) + [embeds[r, at:], embeds.new_zeros(widest - n, embeds.shape[2])]
        )
        out_embeds.append(torch.cat(pieces))
        for name, (value, fill) in columns.items():
            row = value[r]
            out_cols[name].append(torch.cat([row[:at], row.new_full((n,), fill), row[at:], row.new_zeros(widest - n)]))
    kwargs["inputs_embeds"] = torch.stack(out_embeds)
    for name, rows in out_cols.items():
        kwargs[name] = torch.stack(rows)
    kwargs.pop("position_ids", None)
    return kwargs
