"""The one place where prefixes enter a model: a function in transformers' attention registry.

transformers 5 routes the attention of nearly every architecture through `AttentionInterface`. We
register `prefixtune_<base>` there; it prepends the active prefix keys/values of the calling module,
widens the mask by P always-visible columns (P zero columns of T5's position bias), and hands over
to the stock `sdpa` or `eager` function. No cache, no `past_key_values`, no per-family code.

Modules that do their own attention (DeBERTa, MPNet, Falcon, BLOOM) reach this same function
through the adapters of `own_attention.py`.

Which prefix is active is held in a `ContextVar` for the length of one call, so concurrent threads
(a server) never see each other's prefixes, and a model with no active prefix is untouched.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefixtune.core import flash, flex, ragged

NAME_PREFIX = "prefixtune_"
SUPPORTED_BASES = ("sdpa", "eager", *flash.BASES, flex.BASE)


@dataclass
class PrefixState:
    """The prefix of one forward/generate call.

    `kv[slot]` is `(keys, values, visible)`: keys and values of shape `[B or 1, kv_heads, P, head_dim]`,
    where a batch of B divides the query batch (beam search and `num_return_sequences` repeat rows),
    and `visible`, None or a `[B, P]` bool mask for rows whose prefix is shorter than P or absent.
    `record`, when a dict, receives each slot's `(query_len, keys, values)`: that is how the probe finds
    slots and how prefixes are initialised from the model's own activations on real words.
    `offset` is added to decoder position ids (PEFT's and the paper's convention); `heads` maps a
    head module to the modules that replace it, per group of rows (see `hooks.py`); `mean_pool` lists
    the groups of rows (None: all) whose pooled output is the mean of the last hidden states.
    """

    slots: dict[nn.Module, int]
    kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None] | None = None
    record: dict[int, tuple[int, torch.Tensor, torch.Tensor]] | None = field(default=None)
    offset: torch.Tensor | int | None = None
    heads: dict[nn.Module, list[tuple[torch.Tensor | None, nn.Module]]] | None = None
    mean_pool: list[torch.Tensor | None] | None = None
    built: dict = field(default_factory=dict)  # masks made once per call and reused by every layer (flex)
    ragged: ragged.RaggedPlan | None = None  # a serving step that packs several rows' tokens (see ragged.py)


_ACTIVE: ContextVar[PrefixState | None] = ContextVar("prefixtune_active", default=None)


def current_state() -> PrefixState | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def activate(state: PrefixState) -> Iterator[PrefixState]:
    """Make `state` the prefix of every attention call inside the block (this thread/task only)."""
    token = _ACTIVE.set(state)
    try:
        yield state
    finally:
        _ACTIVE.reset(token)


def match_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Match a prefix tensor's batch to the query batch (shared prefix, or rows repeated by beams)."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % t.shape[0]:
        raise ValueError(f"prefix batch {t.shape[0]} does not divide the attention batch {batch}")
    return t.repeat_interleave(batch // t.shape[0], dim=0)


def _widen_mask(
    mask: torch.Tensor | None,
    module: nn.Module,
    query: torch.Tensor,
    kv_len: int,
    prefix_len: int,
    visible: torch.Tensor | None,
    is_causal: bool | None,
) -> torch.Tensor | None:
    """Return the mask over `[prefix; keys]`, or None where no mask is needed at all."""
    batch, q_len = query.shape[0], query.shape[2]
    device = query.device
    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", False)) and q_len > 1
    if mask is None and visible is None and not causal:
        return None
    cols = visible if visible is not None else torch.ones(1, prefix_len, dtype=torch.bool, device=device)
    cols = match_rows(cols, batch)[:, None, None, :]  # [B, 1, 1, P]
    if mask is None:
        if causal:  # bottom-right aligned: query i sits at absolute position kv_len - q_len + i
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
            body = (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
        else:
            body = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        body = body.expand(batch, 1, q_len, kv_len)
        return torch.cat([cols.expand(batch, 1, q_len, prefix_len), body], dim=-1)
    mask = mask[..., :kv_len]
    shape = (max(mask.shape[0], batch), mask.shape[1], mask.shape[2], prefix_len)
    if mask.dtype == torch.bool:
        head = cols.expand(*shape)
        mask = mask.expand(shape[0], *mask.shape[1:])
    else:
        neg = torch.finfo(mask.dtype).min
        head = torch.where(cols, 0.0, neg).to(mask.dtype).expand(*shape)
        mask = mask.expand(shape[0], *mask.shape[1:])
    return torch.cat([head, mask], dim=-1)


def _packed_mask(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int, kwargs: dict) -> torch.Tensor | None:
    """A packed row (documents laid end to end, `cu_seq_lens_q` giving their bounds, as TRL packs them): each
    document attends causally to itself only, so that, with the prefix columns in front, every document sees
    the prefix and nothing of its neighbours, as it would alone. Other calls keep their mask."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1 or query.shape[2] != kv_len or int(bounds[-1]) != kv_len:
        return mask
    doc = torch.bucketize(torch.arange(kv_len, device=query.device), bounds[1:].to(query.device), right=True)
    pos = torch.arange(kv_len, device=query.device)
    body = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    body = body[None, None]
    if mask is None:
        return body
    if mask.dtype == torch.bool:
        return mask[..., :kv_len] & body
    return mask[..., :kv_len].masked_fill(~body, torch.finfo(mask.dtype).min)


def _base_function(base: str, module: nn.Module):
    if base == "eager":  # each family keeps its own eager function beside its modules
        return sys.modules[type(module).__module__].eager_attention_forward
    if base in flash.BASES:
        return functools.partial(flash.call, base)
    return ALL_ATTENTION_FUNCTIONS[base]


_NOT_FOR_GROUPED = ("position_bias", "softcap", "s_aux", "sinks")


def _grouped_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """SDPA that reads grouped keys/values in place, or None where the stock function must run.

    Stock `sdpa` copies every key/value head to each query head it serves (`repeat_kv`) whenever a
    mask is given, and with a prefix there always is one. PyTorch's CPU kernels take the groups as
    they are (`enable_gqa`), which keeps those copies out of the saved activations: 7% less peak
    memory for a SmolLM2 training step, same numbers. On GPUs a masked `enable_gqa` falls back to
    the slow math kernel, so there the stock path stays. A decoding step gains too: one query per row
    against 70 cached positions (13 rows, SmolLM2's 9 query and 3 key/value heads) took 229 us the
    stock way and 105 us grouped on 2 cores, 3 ms of a 79 ms step over 30 layers.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    if query.device.type != "cpu" or groups <= 1 or args:
        return None
    if any(kwargs.get(k) is not None for k in _NOT_FOR_GROUPED) or kwargs.get("output_attentions"):
        return None
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=kwargs.get("dropout", 0.0),
        scale=kwargs.get("scaling"),
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def _plain(base: str, fn, module, query, key, value, attention_mask, *args, **kwargs):
    """The base function, with SDPA's grouped keys/values read in place where `_grouped_sdpa` can."""
    if base == "sdpa" and attention_mask is not None:
        grouped = _grouped_sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        if grouped is not None:
            return grouped
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


def _make_attention(base: str):
    def prefix_attention(module, query, key, value, attention_mask, *args, prefix_bias=None, **kwargs):
        fn = _base_function(base, module)
        state = _ACTIVE.get()
        if state is not None and state.ragged is not None:
            unsupported = [k for k in _NOT_FOR_GROUPED if kwargs.get(k) is not None]
            if unsupported or args:
                raise RuntimeError(f"a ragged step cannot apply {unsupported or 'positional extras'}")
            return ragged.attend(state.ragged, query, key, value, kwargs.get("scaling")), None
        slot = state.slots.get(module) if state is not None else None
        if slot is None:
            return _plain(base, fn, module, query, key, value, attention_mask, *args, **kwargs)
        if state.record is not None:
            state.record[slot] = (query.shape[2], key, value)
        entry = state.kv[slot] if state.kv is not None else None
        if entry is None:
            return _plain(base, fn, module, query, key, value, attention_mask, *args, **kwargs)
        batch, kv_len = query.shape[0], key.shape[2]
        pk, pv = (match_rows(t, batch).to(key.dtype) for t in entry[:2])
        plen = pk.shape[2]
        key = torch.cat([pk, key], dim=2)
        value = torch.cat([pv, value], dim=2)
        attention_mask = _packed_mask(attention_mask, query, kv_len, kwargs)
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5 and others: no relative-position bias for the prefix columns, unless
            head = bias.new_zeros(*bias.shape[:-1], plen)  # the family places the prefix (ALiBi)
            if prefix_bias is not None:
                head = head + prefix_bias(plen).to(head)
            kwargs["position_bias"] = torch.cat([head, bias[..., :kv_len]], dim=-1)
        causal = kwargs.get("is_causal", getattr(module, "is_causal", False))
        if base == flex.BASE:
            visible = None if entry[2] is None else match_rows(entry[2], batch)
            mask = flex.widen(attention_mask, query, kv_len, plen, visible, causal, state.built)
            if mask is not None:
                flash.say_once(f"prefix attention: {base}, its block mask widened by the prefix columns")
                return fn(module, query, key, value, mask, *args, **kwargs)
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]  # a tensor mask: widened as for SDPA below
        if base in flash.BASES:
            reason = flash.why_not(kwargs)
            if reason is None:
                flash.say_once(f"prefix attention: {base}, the prefix as leading keys (bottom-right causal mask)")
                mask = flash.widen(attention_mask, batch, kv_len, plen, entry[2])
                return fn(module, query, key, value, mask, *args, **kwargs)
            flash.say_once(f"prefix attention: sdpa instead of {base}, because {reason}")
            window = kwargs.pop("sliding_window", None)
            attention_mask = flash.to_full(attention_mask, query.shape[2], kv_len, causal, window)
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        attention_mask = _widen_mask(attention_mask, module, query, kv_len, plen, entry[2], kwargs.get("is_causal"))
        if attention_mask is not None:
            kwargs.pop("is_causal", None)
        return _plain(base, fn, module, query, key, value, attention_mask, *args, **kwargs)

    prefix_attention.__name__ = f"prefix_attention_{base}"
    return prefix_attention


def register(base: str) -> str:
    """Register `prefixtune_<base>` (attention and mask) and return its name."""
    if base not in SUPPORTED_BASES:
        flash.say_once(f"prefix attention: sdpa instead of {base}, which has no prefix path here")
        base = "sdpa"  # other kernels: sdpa with the widened mask gives the same numbers
    name = NAME_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_of(name: str | None) -> str:
    """The stock implementation behind a (possibly already prefixtune) implementation name."""
    name = name or "sdpa"
    return name[len(NAME_PREFIX) :] if name.startswith(NAME_PREFIX) else name
