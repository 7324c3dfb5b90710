"""The second way in: attention modules that compute attention themselves instead of calling the registry.

DeBERTa, DeBERTa-v2/v3, MPNet, BLOOM and Falcon (before transformers 5.25) write their attention
inline, so the function that `attention.py` registers never sees them. For each such class an
adapter below re-expresses the module's forward in the registry's terms: the module's own
projections give queries, keys, values and the family's score bias, the attention step goes to the
same registered function every other family uses (and so to the same `PrefixState`, slots, masks
and mixed-prefix batches), and the module's own output projection finishes. The adapters know
nothing about prefixes; a family's terms only decide what bias the prefix columns get:

- DeBERTa's content-to-position and position-to-content scores, and MPNet's relative-position bias,
  are position terms between two tokens of the input. A prefix key has no position, so its columns
  get no such term: the same choice as T5's zero bias for prefix columns.
- ALiBi (BLOOM) penalises a key by its distance. The prefix sits where PEFT and the paper put it,
  immediately before the first token: prefix key k of P is at position k - P. So a BLOOM prefix means
  what a PEFT prefix means on BLOOM, and a position is never shared by two keys.
- Falcon's multi-query layout keeps one key/value head, and its prefix has one head too; the new
  decoder layout broadcasts its groups to every query head before the cache, so its prefix has as many
  heads as the cache. Both come out of the probe, which records the keys each module really uses.

An adapter replaces the `forward` of one module instance (never the class), so other models in the
process are untouched. Refused, with the reason: DeBERTa's talking heads (they mix the scores of all
heads, which no attention function takes) and Falcon-RW's ALiBi (it arrives folded into the mask).
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefixtune.errors import PrefixTuneError

_IMPLEMENTATION = "_prefixtune_attention"  # the attention function an adapted module calls


def _attend(module: nn.Module, query, key, value, mask, *, scaling: float, **kwargs) -> torch.Tensor:
    """The attention step through the model's registered function: `[B, T, heads * head_dim]` out."""
    fn = ALL_ATTENTION_FUNCTIONS[getattr(module, _IMPLEMENTATION)]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    out, _ = fn(module, query, key, value, mask, scaling=scaling, is_causal=module.is_causal, **kwargs)
    return out.reshape(*out.shape[:2], -1)


def _dropout(module: nn.Module, p: float) -> float:
    return p if module.training else 0.0


# ---------------------------------------------------------------------------------------- encoders
def _mpnet(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q, self.k, self.v))
    out = _attend(self, q, k, v, attention_mask, scaling=self.attention_head_size**-0.5,
                  position_bias=position_bias, dropout=_dropout(self, self.dropout.p))  # fmt: skip
    out = self.o(out)
    return (out, None) if output_attentions else (out,)


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """DeBERTa's `[B * heads, T, d]` layout (or `[B, heads, T, d]`) as `[B, heads, T, d]`."""
    return x.reshape(batch, heads, *x.shape[-2:])


def _deberta_v2(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                relative_pos=None, rel_embeddings=None):  # fmt: skip
    heads, batch = self.num_attention_heads, hidden_states.shape[0]
    query_states = hidden_states if query_states is None else query_states
    query = self.transpose_for_scores(self.query_proj(query_states), heads)
    key = self.transpose_for_scores(self.key_proj(hidden_states), heads)
    value = self.transpose_for_scores(self.value_proj(hidden_states), heads)
    factor = 1 + sum(t in self.pos_att_type for t in ("c2p", "p2c"))
    bias = None
    if self.relative_attention:
        rel = self.pos_dropout(rel_embeddings)
        bias = _heads(self.disentangled_attention_bias(query, key, relative_pos, rel, factor), batch, heads)
    out = _attend(self, _heads(query, batch, heads), _heads(key, batch, heads), _heads(value, batch, heads),
                  attention_mask.bool(), scaling=(query.shape[-1] * factor) ** -0.5, position_bias=bias,
                  dropout=_dropout(self, self.dropout.p))  # fmt: skip
    return out, None


def _deberta(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
             relative_pos=None, rel_embeddings=None):  # fmt: skip
    if query_states is None:
        query, key, value = self.transpose_for_scores(self.in_proj(hidden_states)).chunk(3, dim=-1)
    else:  # the enhanced mask decoder's queries come from other states (DeBERTa's own weight split)
        w = self.in_proj.weight.chunk(self.num_attention_heads * 3, dim=0)
        qkv = [torch.cat([w[i * 3 + j] for i in range(self.num_attention_heads)], dim=0) for j in range(3)]
        query, key, value = (self.transpose_for_scores(s @ m.t()) for s, m in
                             zip((query_states, hidden_states, hidden_states), qkv, strict=True))  # fmt: skip
    query = query + self.transpose_for_scores(self.q_bias[None, None, :])
    value = value + self.transpose_for_scores(self.v_bias[None, None, :])
    factor = 1 + len(self.pos_att_type)
    query = query / math.sqrt(query.shape[-1] * factor)
    bias = None
    if self.relative_attention and rel_embeddings is not None and relative_pos is not None:
        rel = self.pos_dropout(rel_embeddings)
        bias = self.disentangled_att_bias(query, key, relative_pos, rel, factor)
    out = _attend(self, query, key, value, attention_mask.bool(), scaling=1.0, position_bias=bias,
                  dropout=_dropout(self, self.dropout.p))  # fmt: skip
    return out, None


# ---------------------------------------------------------------------------------------- decoders
def _alibi_prefix_bias(build: Callable, heads: int, scale: float = 1.0) -> Callable[[int], torch.Tensor]:
    """ALiBi bias of the prefix columns, prefix key k of P at position k - P: `[1, heads, 1, P]`."""

    def bias(plen: int) -> torch.Tensor:
        alibi = build(torch.ones(1, plen + 1, dtype=torch.long), heads, torch.float32).view(1, heads, 1, -1)
        return (alibi[..., :plen] - alibi[..., plen:]) * scale  # relative to the first real token

    return bias


def _bloom(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
           output_attentions=False, **kwargs):  # fmt: skip
    bloom = sys.modules[type(self).__module__]  # its own helpers, beside its modules (as eager functions are)
    batch = hidden_states.shape[0]
    query, key, value = self._reshape(self.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    bias = alibi.view(batch, self.num_heads, 1, -1)
    prefix_bias = _alibi_prefix_bias(bloom.build_alibi_tensor, self.num_heads)
    out = _attend(self, query, key, value, attention_mask, scaling=self.inv_norm_factor, position_bias=bias,
                  prefix_bias=prefix_bias,
                  dropout=_dropout(self, self.attention_dropout.p))  # fmt: skip
    out = bloom.dropout_add(self.dense(out), residual, self.hidden_dropout, self.training)
    return out, None


def _falcon(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
            output_attentions=False, position_embeddings=None, **kwargs):  # fmt: skip
    falcon = sys.modules[type(self).__module__]
    query, key, value = (t.transpose(1, 2) for t in self._split_heads(self.query_key_value(hidden_states)))
    cos, sin = position_embeddings
    query, key = falcon.apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out = _attend(self, query, key, value, attention_mask, scaling=self.inv_norm_factor)
    return self.dense(out), None


def _no_talking_heads(module: nn.Module) -> str | None:
    if module.head_logits_proj is not None:
        return "DeBERTa with talking heads mixes the scores of all heads, which no attention function takes"
    return None


def _no_alibi_falcon(module: nn.Module) -> str | None:
    if getattr(module.config, "alibi", False):
        return "Falcon with ALiBi (Falcon-RW) folds its position bias into the mask, where a prefix cannot be placed"
    return None


def _inline_falcon(module: nn.Module) -> bool:
    """Falcon before transformers 5.25 attends inline (its forward takes `alibi`); from 5.25 on it calls the
    registry itself, so it needs no adapter, only the ALiBi refusal."""
    return "alibi" in inspect.signature(type(module).forward).parameters


@dataclass(frozen=True)
class Adapter:
    forward: Callable  # the module's forward in the registry's terms
    causal: bool  # a decoder's self-attention (it decides how a prompt is placed, and masks without a mask)
    refuse: Callable[[nn.Module], str | None] | None = None  # why a module of this class cannot take a prefix
    needed: Callable[[nn.Module], bool] | None = None  # False: this version of the class calls the registry


# keyed by (module path, class name), so no family's module is imported until a model of it is seen
ADAPTERS: dict[tuple[str, str], Adapter] = {
    ("transformers.models.mpnet.modeling_mpnet", "MPNetSelfAttention"): Adapter(_mpnet, False),
    ("transformers.models.deberta_v2.modeling_deberta_v2", "DisentangledSelfAttention"): Adapter(_deberta_v2, False),
    ("transformers.models.deberta.modeling_deberta", "DisentangledSelfAttention"): Adapter(
        _deberta, False, _no_talking_heads
    ),
    ("transformers.models.bloom.modeling_bloom", "BloomAttention"): Adapter(_bloom, True),
    ("transformers.models.falcon.modeling_falcon", "FalconAttention"): Adapter(
        _falcon, True, _no_alibi_falcon, _inline_falcon
    ),
}


def install(model: nn.Module, implementation: str) -> int:
    """Give every module of an adapted class its adapter, attending through `implementation`.

    Returns how many modules were adapted (0: the model goes through the registry as it is)."""
    count = 0
    for module in model.modules():
        adapter = ADAPTERS.get((type(module).__module__, type(module).__name__))
        if adapter is None:
            continue
        reason = adapter.refuse(module) if adapter.refuse else None
        if reason:
            raise PrefixTuneError(f"{type(model).__name__}: {reason}")
        if adapter.needed and not adapter.needed(module):
            continue
        setattr(module, _IMPLEMENTATION, implementation)
        module.is_causal = adapter.causal
        heads = getattr(module, "num_heads", 0)
        kv_heads = getattr(module, "num_kv_heads", heads)
        if heads and kv_heads and not getattr(module, "new_decoder_architecture", False):
            module.num_key_value_groups = heads // kv_heads  # Falcon multi-query: SDPA reads groups in place
        module.forward = types.MethodType(adapter.forward, module)
        count += 1
    return count
