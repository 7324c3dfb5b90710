"""The prefix path for flash attention kernels: no mask tensor at all, or a 2-D one.

A flash kernel takes no `[B, 1, q, P+k]` mask, and needs none for a prefix. Its causal mask is
aligned bottom-right when there are more keys than queries (flash-attn 2.1 and later), so a query at
position i sees keys 0..i+P: every prefix key and its own past. Padded batches go through the
kernel's variable-length entry, which transformers reaches from a 2-D key padding mask; widening
that mask by the prefix's visible columns puts each row's prefix in front of its own keys, and the
queries are the last columns, exactly as transformers unpads them. So the stock `flash_attention_*`
function runs unchanged, on `[prefix; keys]` and the widened 2-D mask.

Where that would change the meaning, the call goes to SDPA with the full mask instead, and says so
once: flash-attn older than 2.1 aligns causal masks top-left (the prefix would hide later keys), a
sliding window would let the prefix slide out of view (SDPA keeps it visible, as for every model), and
a position bias or attention weights are not something a flash kernel takes.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

BASES = ("flash_attention_2", "flash_attention_3")
_log = logging.getLogger("prefixtune")
_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Log which attention path runs, once per distinct reason (a server would log it per token)."""
    if message not in _SAID:
        _SAID.add(message)
        _log.info(message)


def top_left_causal() -> bool:
    """Whether the installed flash kernel aligns causal masks top-left (flash-attn before 2.1)."""
    from transformers.integrations import flash_attention

    return bool(flash_attention._use_top_left_mask)


def why_not(kwargs: dict) -> str | None:
    """Why this call cannot take the flash path with a prefix, or None when it can."""
    if top_left_causal():
        return "flash-attn before 2.1 aligns causal masks top-left, which would hide keys behind the prefix"
    if kwargs.get("cu_seq_lens_q") is not None:
        return "packed documents would share one prefix copy in the variable-length layout"
    for name in ("position_bias", "sliding_window", "s_aux"):
        if kwargs.get(name) is not None:
            return f"a flash kernel cannot keep the prefix visible with {name}"
    if kwargs.get("output_attentions"):
        return "a flash kernel returns no attention weights"
    return None


class _AsBase:
    """`module` as the stock flash function must see it: a config naming the stock implementation.

    The function loads its kernels by `module.config._attn_implementation`, and prefixtune's own name
    there would send it looking for a kernel of that name."""

    def __init__(self, module: nn.Module, config) -> None:
        self._module = module
        self.config = config

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def as_base(module: nn.Module, base: str) -> _AsBase:
    views = module.__dict__.setdefault("_prefixtune_stock_configs", {})  # made once per module and base
    if base not in views:
        views[base] = copy.copy(module.config)
        views[base]._attn_implementation = base
    return _AsBase(module, views[base])


def call(base: str, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """The stock flash function of `base`, with no prefix involved."""
    return ALL_ATTENTION_FUNCTIONS[base](as_base(module, base), query, key, value, attention_mask, *args, **kwargs)


def widen(mask: torch.Tensor | None, batch: int, kv_len: int, prefix_len: int, visible: torch.Tensor | None):
    """The 2-D key mask over `[prefix; keys]`, or None where no row hides anything."""
    if mask is None and visible is None:
        return None
    device = (mask if mask is not None else visible).device
    cols = visible if visible is not None else torch.ones(1, prefix_len, dtype=torch.bool, device=device)
    cols = cols.expand(batch, -1) if cols.shape[0] == 1 else cols
    body = mask[:, -kv_len:].bool() if mask is not None else torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    return torch.cat([cols.to(body.device), body], dim=1).to(torch.int32)


def to_full(mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, window: int | None = None):
    """A flash call's 2-D key mask (and window) as the `[B, 1, q, k]` boolean mask SDPA takes, or None."""
    if mask is None and not window:
        return None  # SDPA's own causal flag (and the widened prefix columns) do the rest
    if mask is None:
        mask = torch.ones(1, kv_len, dtype=torch.bool)
    keys = mask[:, None, None, -kv_len:].bool()
    q_pos = torch.arange(kv_len - q_len, kv_len, device=mask.device)[:, None]
    k_pos = torch.arange(kv_len, device=mask.device)[None, :]
    if causal:
        keys = keys & (k_pos <= q_pos)[None, None]
    if window:
        keys = keys & (k_pos > q_pos - window)[None, None]
    return keys.expand(mask.shape[0], 1, q_len, kv_len)
