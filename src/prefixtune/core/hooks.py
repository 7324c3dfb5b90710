"""What a prefix changes outside attention, as hooks that act only while a prefix is active.

- Decoder position ids: with a prefix of length P the real tokens sit at P..P+n-1 (PEFT and the
  paper). `generate` computes position ids inside the base model, so this must be a pre-hook there.
- Task heads: each prefix trains its own copy of the classification head; the base model's head stays
  frozen and shared. A forward hook on the head swaps in the copy, per group of rows in a mixed batch.
- Mean pooling: an encoder's classifier reads the backbone's `pooler_output` (BERT) or the first
  token's last state (RoBERTa, DeBERTa, MPNet, DistilBERT); a forward hook on the backbone puts the
  masked mean of the last hidden states there, for the rows that ask for it.

Hooks are installed once per base model and read everything from the active `PrefixState`, so any
number of prefixes (and threads) can share one base model.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from prefixtune.core import attention, pooling

_INSTALLED = "_prefixtune_hooks"


def _shift_positions(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    state = attention.current_state()
    if state is None or state.offset is None or state.record is not None:
        return None
    ref = args[0] if args else kwargs.get("input_ids")
    if ref is None:
        ref = kwargs["inputs_embeds"]
    batch, q_len = ref.shape[:2]
    positions = kwargs.get("position_ids")
    if positions is None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:  # left padding: count real tokens, as generate does
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 renamed it `cache`
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + q_len, device=ref.device)[None].expand(batch, -1)
    offset = state.offset
    if isinstance(offset, torch.Tensor):
        offset = attention.match_rows(offset.view(-1, 1), positions.shape[0])
    kwargs["position_ids"] = positions + offset
    return args, kwargs


def _swap_head(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    state = attention.current_state()
    groups = state.heads.get(module) if state is not None and state.heads else None
    if not groups:
        return None
    if len(groups) == 1 and groups[0][0] is None:
        return groups[0][1](*args, **kwargs)
    output = output.clone()
    for rows, head in groups:
        output[rows] = head(*(a[rows] for a in args), **kwargs)
    return output


def _mean_pool(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state = attention.current_state()
    groups = state.mean_pool if state is not None else None
    if not groups:
        return None
    hidden = output.last_hidden_state
    mask = kwargs.get("attention_mask")
    if mask is None or mask.shape != hidden.shape[:2]:
        mask = torch.ones(hidden.shape[:2], device=hidden.device)
    mean = pooling.masked_mean(hidden, mask)
    pooler = getattr(output, "pooler_output", None)
    target = pooler if pooler is not None else hidden[:, 0]
    if not (len(groups) == 1 and groups[0] is None):  # rows of several prefixes: pool only theirs
        pooled = target.clone()
        for rows in groups:
            pooled[rows] = mean[rows]
        mean = pooled
    if pooler is not None:
        output.pooler_output = mean
    else:  # the head reads the first token: the mean takes its place there
        output.last_hidden_state = torch.cat([mean[:, None], hidden[:, 1:]], dim=1)
    return output


def install(base_model: nn.Module, head_names: list[str], pooled_backbone: nn.Module | None = None) -> None:
    """Install the position, head and (given the backbone) mean-pooling hooks on `base_model` (idempotent)."""
    installed = base_model.__dict__.setdefault(_INSTALLED, set())
    if "positions" not in installed and "position_ids" in inspect.signature(base_model.forward).parameters:
        base_model.register_forward_pre_hook(_shift_positions, with_kwargs=True)
        installed.add("positions")
    for name in head_names:
        if name not in installed:
            getattr(base_model, name).register_forward_hook(_swap_head, with_kwargs=True)
            installed.add(name)
    if pooled_backbone is not None and "mean_pool" not in installed:
        pooled_backbone.register_forward_hook(_mean_pool, with_kwargs=True)
        installed.add("mean_pool")
