"""Find where a model's attention happens by watching one tiny forward pass, not by reading class names.

Every module that calls the attention interface during a probe becomes a *slot*. The probe runs
different encoder and decoder lengths, so the shapes alone tell encoder self-attention, decoder
self-attention and cross-attention apart. An architecture whose attention bypasses the interface
produces no slots and is refused by name: it is never a silent no-op.
"""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from prefixtune.core import attention, flash, own_attention
from prefixtune.errors import PrefixTuneError

ENC_LEN, DEC_LEN = 5, 3


@dataclass(frozen=True)
class Slot:
    name: str  # module path inside the base model
    role: str  # "self" (encoder-only / decoder-only), "encoder", "decoder" or "cross"
    layer: int  # index within its stack
    kv_heads: int
    head_dim: int


@dataclass
class Layout:
    """What a prefix must match: the model's identity and its attention slots, in call order."""

    architecture: str
    model_type: str
    name_or_path: str
    hidden_size: int
    is_encoder_decoder: bool
    is_causal: bool  # decoder-only
    slots: list[Slot]

    @property
    def num_layers(self) -> int:
        return 1 + max(s.layer for s in self.slots)

    def identity(self) -> dict:
        kinds = sorted({(s.kv_heads, s.head_dim) for s in self.slots})
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "name_or_path": self.name_or_path,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_slots": len(self.slots),
            "kv_heads": kinds[0][0],
            "head_dim": kinds[0][1],
            "roles": sorted({s.role for s in self.slots}),
        }

    def to_dict(self) -> dict:
        return asdict(self)


class _NewSlots(dict):
    """Hands out a slot number to every module that asks, in call order."""

    def get(self, module, default=None):  # noqa: D401 - dict protocol
        if module not in self:
            self[module] = len(self)
        return self[module]


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else 0


def use_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through prefixtune's registered function (idempotent).

    Modules that compute attention themselves get an adapter that calls the function over SDPA (they
    have no eager function of their own to hand over to); every other model switches implementation."""
    current = getattr(model.config, "_attn_implementation", None)
    name = attention.register(attention.base_of(current))
    if current == name:
        return
    over_sdpa = attention.register("sdpa")
    if own_attention.install(model, over_sdpa):
        model.config._attn_implementation = over_sdpa
        return
    if attention.base_of(current) in flash.BASES:  # checked when the model loaded; transformers would now
        for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
            config._attn_implementation = name  # look for a kernel named after prefixtune's function
        return
    try:
        model.set_attn_implementation(name)
    except Exception as exc:  # transformers raises several types here
        raise PrefixTuneError(
            f"{type(model).__name__} cannot use a registered attention function ({exc}); prefixtune needs "
            "an architecture whose attention goes through transformers' AttentionInterface"
        ) from exc


# The layouts already probed, per model object, with the module objects they were probed on.
_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Layout]] = weakref.WeakKeyDictionary()


def probe(model: nn.Module) -> Layout:
    """Run one tiny forward pass and record every attention call.

    A model object is probed once: loading a thousand prefixes onto one served model would otherwise
    run a thousand forward passes (95% of a prefix's load time on SmolLM2). The result is reused
    while the model has the same modules and attention implementation."""
    use_prefix_attention(model)
    seen = (getattr(model.config, "_attn_implementation", None), tuple(map(id, model.modules())))
    cached = _PROBED.get(model)
    if cached is not None and cached[0] == seen:
        return copy.deepcopy(cached[1])
    layout = _probe(model)
    _PROBED[model] = (seen, layout)
    return copy.deepcopy(layout)


def _probe(model: nn.Module) -> Layout:
    config = model.config
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    ids = torch.ones(1, ENC_LEN, dtype=torch.long, device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if enc_dec:
        kwargs["decoder_input_ids"] = torch.ones(1, DEC_LEN, dtype=torch.long, device=device)
    state = attention.PrefixState(slots=_NewSlots(), record={})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), attention.activate(state):
            model(**kwargs)
    finally:
        model.train(was_training)
    if not state.slots:
        raise PrefixTuneError(
            f"{type(model).__name__} ({getattr(config, 'model_type', '?')}) does not send its attention through "
            "transformers' AttentionInterface and prefixtune has no adapter for its attention module, so a prefix "
            "cannot be attached; use an architecture such as BERT, RoBERTa, DeBERTa-v3, MPNet, GPT-2, Llama, Qwen2, "
            "Gemma 3, Falcon, BLOOM, BART or T5"
        )
    names = {m: n for n, m in model.named_modules()}
    causal = not enc_dec and any(getattr(m, "is_causal", False) for m in state.slots)
    slots = []
    for module, index in sorted(state.slots.items(), key=lambda kv: kv[1]):
        q_len, key, value = state.record[index]
        if key.shape[-1] != value.shape[-1]:
            raise PrefixTuneError(f"{names[module]}: keys and values of different widths are not supported")
        if not enc_dec:
            role = "self"
        elif q_len == ENC_LEN:
            role = "encoder"
        else:
            role = "cross" if key.shape[2] == ENC_LEN else "decoder"
        slots.append(Slot(names[module], role, _layer_index(names[module]), key.shape[1], key.shape[-1]))
    if len({(s.kv_heads, s.head_dim) for s in slots}) != 1:
        raise PrefixTuneError(f"{type(model).__name__}: attention layers of different shapes are not supported yet")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return Layout(
        architecture=type(model).__name__,
        model_type=str(getattr(config, "model_type", "")),
        name_or_path=str(getattr(config, "_name_or_path", "") or ""),
        hidden_size=int(getattr(text_config, "hidden_size", 0) or getattr(text_config, "d_model", 0)),
        is_encoder_decoder=enc_dec,
        is_causal=causal,
        slots=slots,
    )


def modules_by_slot(model: nn.Module, layout: Layout) -> dict[nn.Module, int]:
    named = dict(model.named_modules())
    return {named[s.name]: i for i, s in enumerate(layout.slots)}
