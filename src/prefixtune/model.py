"""`PrefixModel`: a frozen transformers model plus one prefix, with the usual save/load verbs.

Two ways a prefix reaches the model, chosen once at attach time:
- keys/values: method 'prefix' everywhere, and 'prompt'/'text' on decoder-only models, where a soft
  prompt at positions 0..P-1 is exactly equivalent to its own keys/values (causal attention never
  lets the prompt see the input). The attention hook prepends them; nothing else changes.
- input embeddings: 'prompt'/'text' on encoders and encoder-decoders, whose prompt must attend to
  the input. The prompt is joined to the embeddings and the masks are widened to match.

What each method learns, saves and loads lives in its class in `core.prefixes`; this wrapper only
asks the class, so it holds no branch on the method.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixtune import hub, serialization, trl_support
from prefixtune.config import PrefixConfig
from prefixtune.core import attention, batching, hooks, pooling
from prefixtune.core.discovery import Layout, modules_by_slot, probe
from prefixtune.core.prefixes import Site, prefix_class
from prefixtune.errors import PrefixTuneError

# `pooler`: DeBERTa's ContextPooler sits beside the classifier, and checkpoints do not train it
HEAD_NAMES = ("pooler", "classifier", "pre_classifier", "score", "classification_head", "qa_outputs")
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
        method = prefix_class(config)
        # Causal attention never lets a prompt at positions 0..P-1 see the input, so there a prompt is
        # exactly its own keys/values; elsewhere it must sit among the input embeddings.
        self.uses_kv = not method.joins_input or self.layout.is_causal
        offset = config.position_offset if config.position_offset is not None else self.layout.is_causal
        self.offset_positions = bool(offset) and self.uses_kv
        self._enabled = True
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.head_modules = self._find_heads()
        # Each prefix trains its own copy of the head; the base model's stays frozen and shareable.
        self.heads = nn.ModuleDict(
            {n: copy.deepcopy(getattr(base_model, n)).requires_grad_(True) for n in self.head_modules}
        )
        if config.pooling == "auto":  # saved resolved, so a reloaded prefix pools the same way
            self.prefix_config = dataclasses.replace(
                config, pooling=pooling.default_pooling(base_model, self.task, self._encoder)
            )
        hooks.install(base_model, self.head_modules, self._pooled_backbone())
        self.columns = self._columns()
        slot = self.layout.slots[0]
        self.site = Site(
            base_model.get_input_embeddings(), self.columns, slot.kv_heads, slot.head_dim,
            self.layout.hidden_size, self._record_kv,
        )  # fmt: skip
        self.prefix = method.create(self.prefix_config, self.site, tokenizer, _init)
        if self.prefix.length != self.prefix_config.num_virtual_tokens:  # a text prefix is as long as its text
            self.prefix_config = dataclasses.replace(self.prefix_config, num_virtual_tokens=self.prefix.length)

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
        if self.task != "classification" or not pooling.mean_poolable(self.base_model, self._encoder):
            raise PrefixTuneError(
                f"pooling 'mean' stands in for the pooled output or first token that an encoder's classifier "
                f"reads, and {type(self.base_model).__name__} (task {self.task}) is no encoder classifier; "
                "use pooling 'model'"
            )
        return self.base_model.base_model

    @property
    def _encoder(self) -> bool:
        return not self.layout.is_causal and not self.layout.is_encoder_decoder

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
        return self.prefix.kv(self.site)

    def inputs(self) -> batching.PrefixInputs:
        """What this prefix hands a forward pass: plain tensors and modules, for `core.batching`."""
        heads = [(getattr(self.base_model, name), head) for name, head in self.heads.items()]
        return batching.PrefixInputs(
            kv=self.prefix_kv() if self.uses_kv else None,
            prompt=None if self.uses_kv else self.prefix.prompt(),
            offset=self.prefix_length if self.offset_positions else 0,
            heads=heads,
            mean_pool=self.prefix_config.pooling == "mean",
        )

    @property
    def prefix_length(self) -> int:
        return self.prefix_config.num_virtual_tokens

    @contextlib.contextmanager
    def _prefixed(self, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not self._enabled:
            yield kwargs
            return
        groups = [(None, self.inputs())]
        kwargs = batching.join_prompts(kwargs, groups, self.get_input_embeddings(), self.prompt_position)
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

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Non-reentrant checkpointing, with the prefix restored while activations are recomputed.

        `transformers.Trainer` (5.x) calls this name; forwarded to the base model as it is, the
        recomputation would run without the prefix and differ from the forward pass."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        kwargs.update(use_reentrant=False, context_fn=_checkpoint_contexts)
        self.base_model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of `activation_checkpointing_enable`, which PEFT users and TRL still call."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

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

    def __setattr__(self, name: str, value: Any) -> None:
        # TRL's SFTTrainer swaps in a forward that expects `base_model` to be a backbone: it goes one level down
        if name == "forward" and trl_support.redirect_forward_patch(self, value):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---------------------------------------------------------------------------------- save and load
    def state_tensors(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        """What a prefix file holds: the method's own tensors, then each head's."""
        tensors = dict(self.prefix.saved(keep_reparam))
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

    def push_to_hub(self, repo_id: str, **options: Any) -> str:
        """Upload this prefix (its two files and a generated model card) to a hub repository; the commit URL.

        `options` are those of `hub.push_to_hub`: private, token, revision, commit_message, info."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return hub.push_to_hub(folder, repo_id, **options)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        directory: str | Path,
        is_trainable: bool = False,
        tokenizer: Any = None,
        revision: str | None = None,
    ) -> PrefixModel:
        """Attach a saved prefix (a folder, or a hub id at `revision`) to `base_model`; refuse it when it was made
        for another model."""
        directory = hub.resolve(directory, revision)
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
        config = prefix_class(config).loading_config(config, tensors, is_trainable)
        model = cls(base_model, config, tokenizer, _init=False)
        model.load_tensors(tensors, source=str(directory))
        if not is_trainable:
            model.requires_grad_(False)
            model.eval()
        return model

    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str = "prefix file") -> None:
        """Copy saved tensors in after checking every name, shape and dtype against this model."""
        tensors = self.prefix.loadable(tensors)
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
        self.prefix.load(tensors, self.site)
        with torch.no_grad():
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
