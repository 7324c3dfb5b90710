"""`PrefixModel`: a frozen transformers model plus one prefix, with the usual save/load verbs.

Two ways a prefix reaches the model, chosen once at attach time:
- keys/values: method 'prefix' everywhere, and 'prompt'/'text' on decoder-only models, where a soft
  prompt at positions 0..P-1 is exactly equivalent to its own keys/values (causal attention never
  lets the prompt see the input). The attention hook prepends them; nothing else changes.
- input embeddings: 'prompt'/'text' on encoders and encoder-decoders, whose prompt must attend to
  the input. The prompt is joined to the embeddings and the masks are widened to match.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixtune import serialization
from prefixtune.config import PrefixConfig
from prefixtune.core import attention, batching, hooks, pooling
from prefixtune.core.discovery import Layout, modules_by_slot, probe
from prefixtune.core.prefixes import PrefixKV, SoftPrompt, kv_to_table, table_to_kv
from prefixtune.errors import PrefixTuneError

HEAD_NAMES = ("classifier", "pre_classifier", "score", "classification_head", "qa_outputs")
IDENTITY_KEYS = ("model_type", "hidden_size", "num_layers", "num_slots", "kv_heads", "head_dim", "roles")


def _task_of(model: nn.Module, layout: Layout, requested: str) -> str:
    if requested != "auto":
        return requested
    name = type(model).__name__
    if "SequenceClassification" in name:
        return "classification"
    if layout.is_encoder_decoder and hasattr(model, "generate"):
        return "seq2seq_lm"
    if "CausalLM" in name or "LMHead" in name:
        return "causal_lm"
    return "base"


def _checkpoint_contexts() -> tuple[Any, Any]:
    """Give activation-checkpoint recomputation the prefix that was active in the forward pass."""
    state = attention.current_state()
    recompute = attention.activate(state) if state is not None else contextlib.nullcontext()
    return contextlib.nullcontext(), recompute


class PrefixModel(nn.Module):
    """A frozen base model with a prefix. Call it and `generate` with it exactly like the base model."""

    def __init__(self, base_model: nn.Module, config: PrefixConfig, tokenizer: Any = None, *, _init: bool = True):
        super().__init__()
        self.base_model = base_model
        self.prefix_config = config
        self.layout = probe(base_model)
        self.task = _task_of(base_model, self.layout, config.task)
        self.slots = modules_by_slot(base_model, self.layout)  # attention module -> slot: what PrefixState keys on
        self.uses_kv = config.method == "prefix" or self.layout.is_causal
        offset = config.position_offset if config.position_offset is not None else self.layout.is_causal
        self.offset_positions = bool(offset) and self.uses_kv
        self._enabled = True
        self._frozen_kv: tuple[torch.device, list] | None = None
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.head_modules = self._find_heads()
        # Each prefix trains its own copy of the head; the base model's stays frozen and shareable.
        self.heads = nn.ModuleDict(
            {n: copy.deepcopy(getattr(base_model, n)).requires_grad_(True) for n in self.head_modules}
        )
        if config.pooling == "auto":  # saved resolved, so a reloaded prefix pools the same way
            self.prefix_config = dataclasses.replace(config, pooling=pooling.default_pooling(base_model, self.task))
        hooks.install(base_model, self.head_modules, self._pooled_backbone())
        self.columns = self._columns()
        self.prefix = self._build(tokenizer, _init)

    # ----------------------------------------------------------------------------------------- setup
    def _find_heads(self) -> list[str]:
        if self.prefix_config.head_modules is not None:
            missing = [n for n in self.prefix_config.head_modules if not hasattr(self.base_model, n)]
            if missing:
                raise PrefixTuneError(f"head module(s) {missing} not found on {type(self.base_model).__name__}")
            return list(self.prefix_config.head_modules)
        if self.task != "classification":
            return []
        heads = [n for n in HEAD_NAMES if isinstance(getattr(self.base_model, n, None), nn.Module)]
        if not heads:
            raise PrefixTuneError(
                f"no classification head found on {type(self.base_model).__name__}; name it with head_modules"
            )
        return heads

    def _pooled_backbone(self) -> nn.Module | None:
        """The backbone whose pooled output mean pooling replaces; None for the model's own pooling."""
        if self.prefix_config.pooling == "model":
            return None
        if self.task != "classification" or pooling.backbone_pooler(self.base_model) is None:
            raise PrefixTuneError(
                f"pooling 'mean' replaces the pooled output that a BERT-style classifier reads, and "
                f"{type(self.base_model).__name__} (task {self.task}) has no pooler; use pooling 'model'"
            )
        return self.base_model.base_model

    def _columns(self) -> list[int | None]:
        """Table column of every model slot (None: that layer gets no prefix)."""
        layers = self.prefix_config.layers
        if layers is None:
            return list(range(len(self.layout.slots)))
        bad = [i for i in layers if not 0 <= i < self.layout.num_layers]
        if bad:
            raise PrefixTuneError(f"layer indices {bad} out of range: the model has {self.layout.num_layers} layers")
        columns, n = [], 0
        for slot in self.layout.slots:
            columns.append(n if slot.layer in layers else None)
            n += slot.layer in layers
        return columns

    def _embeddings(self) -> nn.Embedding:
        return self.base_model.get_input_embeddings()

    def _token_ids(self, tokenizer: Any, length: int | None) -> torch.Tensor:
        """Token ids of the configured text (repeated to `length`) or of sampled vocabulary."""
        cfg = self.prefix_config
        if cfg.method == "text" or cfg.resolved_init == "text":
            if tokenizer is None:
                raise PrefixTuneError("a text prefix or init 'text' needs the tokenizer: pass tokenizer=...")
            ids = tokenizer(cfg.text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise PrefixTuneError(f"the text {cfg.text!r} tokenizes to nothing")
            if length is not None:
                ids = (ids * math.ceil(length / len(ids)))[:length]
        else:
            vocab = self._embeddings().num_embeddings
            gen = torch.Generator().manual_seed(cfg.seed)
            ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        return torch.tensor(ids, dtype=torch.long, device=self._embeddings().weight.device)

    def _build(self, tokenizer: Any, init: bool) -> nn.Module:
        cfg, layout = self.prefix_config, self.layout
        if cfg.method == "text":
            ids = self._token_ids(tokenizer, None) if init else torch.zeros(cfg.num_virtual_tokens, dtype=torch.long)
            cfg.num_virtual_tokens = len(ids)
            self.register_buffer("text_ids", ids.to(self._embeddings().weight.device))
            return SoftPrompt(self._embeddings()(self.text_ids).detach(), trainable=False)
        length, how = cfg.num_virtual_tokens, cfg.resolved_init
        if cfg.method == "prompt":
            weight = self._embeddings().weight
            prompt = torch.zeros(length, weight.shape[1], dtype=torch.float32, device=weight.device)
            if init and how in ("text", "vocab"):
                prompt = self._embeddings()(self._token_ids(tokenizer, length)).detach().float()
            elif init and how == "random":
                gen = torch.Generator().manual_seed(cfg.seed)
                prompt = torch.randn(prompt.shape, generator=gen).to(weight.device) * weight.float().std()
            return SoftPrompt(prompt, trainable=True)
        slot = layout.slots[0]
        n_cols = sum(c is not None for c in self.columns)
        module = PrefixKV(
            length, n_cols, slot.kv_heads, slot.head_dim, layout.hidden_size, cfg.reparam, cfg.reparam_hidden
        )
        module.to(self._embeddings().weight.device)
        if not init or how == "zero":
            if module.reparameterised:
                nn.init.zeros_(module.embedding)
            return module
        gen = torch.Generator().manual_seed(cfg.seed)
        if module.reparameterised:
            if how == "random":
                module.embedding.data.normal_(std=0.02, generator=gen)
            else:
                module.embedding.data.copy_(self._embeddings()(self._token_ids(tokenizer, length)).float())
        elif how == "random":
            module.table.data.copy_(torch.randn(module.shape, generator=gen))
        else:
            pairs = self._record_kv(self._token_ids(tokenizer, length)[None], embeds=False)
            module.table.data.copy_(
                kv_to_table([p for p, c in zip(pairs, self.columns, strict=True) if c is not None]).float()
            )
        return module

    # ------------------------------------------------------------------------------------ prefix values
    def _record_kv(self, inputs: torch.Tensor, embeds: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every slot's own keys/values on `inputs` (token ids, or embeddings with `embeds`)."""
        state = attention.PrefixState(slots=self.slots, record={})
        key = "inputs_embeds" if embeds else "input_ids"
        kwargs: dict[str, Any] = {key: inputs}
        model = self.base_model
        if self.layout.is_encoder_decoder:
            kwargs["decoder_" + key] = inputs
        else:  # the backbone alone: no head, no logits over the vocabulary
            model = getattr(model, model.base_model_prefix, model)
        grad = torch.enable_grad() if embeds and inputs.requires_grad else torch.no_grad()
        with grad, attention.activate(state):
            model(**kwargs)
        if len(state.record) != len(self.slots):
            raise PrefixTuneError("recording the prefix activations missed some attention layers")
        return [state.record[i][1:] for i in range(len(self.slots))]

    def prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per-slot `(keys, values)` for the current prefix, `[1, kv_heads, P, head_dim]` each."""
        if self.prefix_config.method == "prefix":
            return table_to_kv(self.prefix(), self.columns)
        if self.prefix_config.method == "text":  # frozen: compute once per device
            device = self.prefix.embedding.device
            if self._frozen_kv is None or self._frozen_kv[0] != device:
                self._frozen_kv = (device, self._record_kv(self.text_ids[None], embeds=False))
            return self._frozen_kv[1]
        prompt = self.prefix().to(self._embeddings().weight.dtype)[None]
        return self._record_kv(prompt, embeds=True)

    @property
    def prefix_length(self) -> int:
        return self.prefix_config.num_virtual_tokens

    @contextlib.contextmanager
    def _prefixed(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not self._enabled:
            yield kwargs
            return
        groups = [(None, self)]
        kwargs = batching.join_prompts(kwargs, groups, self._embeddings(), self.prompt_position)
        batch = next((v.shape[0] for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds")), 1)
        with attention.activate(batching.build_state(self.slots, groups, batch)):
            yield kwargs

    @property
    def prompt_position(self) -> int:
        """Where an input-level prompt goes: after [CLS] on encoders, in front on encoder-decoders."""
        return 0 if self.layout.is_encoder_decoder else 1

    # ------------------------------------------------------------------------------------- public API
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        named = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
        )
        kwargs.update({k: v for k, v in named.items() if v is not None})
        with self._prefixed(kwargs) as kwargs:
            return self.base_model(**kwargs)

    @torch.no_grad()
    def generate(self, **kwargs: Any) -> torch.Tensor:
        """`base_model.generate` with the prefix: greedy, sampling and beam search all work."""
        with self._prefixed(kwargs) as kwargs:
            return self.base_model.generate(**kwargs)

    @contextlib.contextmanager
    def disable_prefix(self) -> Iterator[None]:
        """Run the untouched base model inside the block."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Non-reentrant checkpointing, with the prefix restored while activations are recomputed."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.update(use_reentrant=False, context_fn=_checkpoint_contexts)
        self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def positions_used(self) -> int:
        """Position slots the prefix takes from the model: inputs must fit in max_positions - this."""
        if self.offset_positions or not self.uses_kv:
            return self.prefix_config.num_virtual_tokens
        return 0

    def trainable_parameters(self) -> dict[str, float]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters()) + sum(p.numel() for p in self.prefix.parameters())
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    def print_trainable_parameters(self) -> None:
        r = self.trainable_parameters()
        print(f"trainable params: {r['trainable']:,} || all params: {r['total']:,} || trainable%: {r['percent']:.4f}")

    @property
    def config(self) -> Any:
        """The base model's config, which Trainer and generate look up."""
        return self.base_model.config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------------------------- save and load
    def state_tensors(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        """What a prefix file holds: the collapsed prefix, the head, and optionally the MLP to resume."""
        cfg = self.prefix_config
        tensors: dict[str, torch.Tensor] = {}
        if cfg.method == "prefix":
            tensors["prefix"] = self.prefix.collapsed()
            if self.prefix.reparameterised and keep_reparam:
                tensors.update({f"reparam.{k}": v for k, v in self.prefix.state_dict().items()})
        elif cfg.method == "prompt":
            tensors["prompt"] = self.prefix.embedding.detach()
        else:
            tensors["text_ids"] = self.text_ids
        for name, head in self.heads.items():
            for key, value in head.state_dict().items():
                tensors[f"head.{name}.{key}"] = value
        return tensors

    def save_pretrained(self, save_directory: str | Path, keep_reparam: bool = True) -> None:
        """Write only the prefix (and head): a few KB to a few MB, never the base model."""
        record = {
            "prefix": self.prefix_config.to_dict(),
            "task": self.task,
            "base_model": self.layout.identity(),
        }
        serialization.save_prefix(save_directory, record, self.state_tensors(keep_reparam))

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str | Path, is_trainable: bool = False, tokenizer: Any = None
    ) -> PrefixModel:
        """Attach a saved prefix to `base_model`; refuse it when it was made for another model."""
        record = serialization.read_config(directory)
        unknown = sorted(set(record) - {"prefix", "task", "base_model"})
        if unknown or not isinstance(record.get("base_model"), dict):
            raise PrefixTuneError(f"{directory}: malformed prefixtune config (unknown keys {unknown})")
        config = PrefixConfig.from_dict(record["prefix"])
        layout = probe(base_model)
        expected, found = record["base_model"], layout.identity()
        diff = [k for k in IDENTITY_KEYS if expected.get(k) != found.get(k)]
        if diff:
            raise PrefixTuneError(
                f"the prefix in {directory} was made for {expected.get('architecture')} "
                f"({expected.get('name_or_path') or 'unnamed'}) but is being loaded onto {found['architecture']} "
                f"({found['name_or_path'] or 'unnamed'}): they differ in {', '.join(diff)} "
                f"({ {k: expected.get(k) for k in diff} } vs { {k: found.get(k) for k in diff} })"
            )
        tensors = serialization.read_tensors(directory)
        if config.reparam == "mlp" and not (is_trainable and "reparam.mlp.0.weight" in tensors):
            config = dataclasses.replace(config, reparam="none")  # inference needs the collapsed table only
        model = cls(base_model, config, tokenizer, _init=False)
        model.load_tensors(tensors, source=str(directory))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "prefix file") -> None:
        """Copy saved tensors in after checking every name, shape and dtype against this model."""
        if self.prefix_config.method == "prefix" and not self.prefix.reparameterised:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("reparam.")}  # resume-only extras
        own = self.state_tensors(keep_reparam=True)
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise PrefixTuneError(f"{source}: missing tensors {missing}, unexpected tensors {extra}")
        for key, value in tensors.items():
            same_kind = value.dtype.is_floating_point == own[key].dtype.is_floating_point
            if tuple(value.shape) != tuple(own[key].shape) or not same_kind:
                raise PrefixTuneError(
                    f"{source}: tensor {key!r} has shape {tuple(value.shape)} {value.dtype}, "
                    f"expected {tuple(own[key].shape)} {own[key].dtype}"
                )
            if not torch.isfinite(value.float()).all():
                raise PrefixTuneError(f"{source}: tensor {key!r} holds NaN or infinite values")
        with torch.no_grad():
            if "prefix" in tensors and not self.prefix.reparameterised:
                self.prefix.table.copy_(tensors["prefix"])
            if any(k.startswith("reparam.") for k in tensors):
                self.prefix.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("reparam.")})
            if "prompt" in tensors:
                self.prefix.embedding.copy_(tensors["prompt"])
            if "text_ids" in tensors:
                self.text_ids.copy_(tensors["text_ids"])
                self.prefix.embedding.copy_(self._embeddings()(self.text_ids))
                self._frozen_kv = None
            for name, head in self.heads.items():
                head.load_state_dict(
                    {k[len(name) + 6 :]: v for k, v in tensors.items() if k.startswith(f"head.{name}.")}
                )


def attach(model: nn.Module, config: PrefixConfig | None = None, tokenizer: Any = None, **options: Any) -> PrefixModel:
    """Freeze `model` and give it a new prefix. `options` are PrefixConfig fields."""
    if config is None:
        config = PrefixConfig(**options)
    elif options:
        raise PrefixTuneError("pass either a PrefixConfig or keyword options, not both")
    return PrefixModel(model, config, tokenizer)
