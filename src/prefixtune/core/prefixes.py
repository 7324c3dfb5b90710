"""The prefix methods, one class each: how a method starts, what it feeds the model, what it saves.

- `PrefixTable`: keys/values in every selected attention slot, learned directly (Li & Liang's
  prefix, P-tuning v2's deep prompt);
- `PrefixMLP`: the same keys/values produced by Li & Liang's MLP from P embeddings; a training
  device only, so it saves the collapsed table beside what resuming needs;
- `SoftPrompt`: P vectors at the input embeddings (Lester et al.);
- `TextPrefix`: a fixed text's token embeddings, nothing learned (the article's discrete prefix).

A prefix table has shape `[P, S, 2, kv_heads, head_dim]`, i.e. per virtual token, per attention
slot, keys then values. Its memory layout equals PEFT's `[P, layers * 2 * token_dim]`, which keeps
import and export a reshape.

What a method needs of the model it sits on comes in a `Site`, so the classes never see
`PrefixModel` and the model never asks which method it holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from prefixtune.config import PrefixConfig
from prefixtune.errors import PrefixTuneError

KV = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Site:
    """The frozen model as a prefix sees it. A plain object, not a module: nothing in it is saved."""

    embeddings: nn.Embedding
    columns: list[int | None]  # table column of every attention slot; None: that slot gets no prefix
    kv_heads: int
    head_dim: int
    hidden_size: int
    # The model's own per-slot keys/values on `inputs` (token ids, or embeddings when the flag is set).
    record: Callable[[torch.Tensor, bool], list[KV]]

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device


def token_ids(config: PrefixConfig, site: Site, tokenizer: Any, length: int | None) -> torch.Tensor:
    """Token ids of the configured text (repeated to `length`), or sampled vocabulary for 'vocab' init."""
    if config.method == "text" or config.resolved_init == "text":
        if tokenizer is None:
            raise PrefixTuneError("a text prefix or init 'text' needs the tokenizer: pass tokenizer=...")
        ids = tokenizer(config.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PrefixTuneError(f"the text {config.text!r} tokenizes to nothing")
        if length is not None:
            ids = (ids * math.ceil(length / len(ids)))[:length]
    else:
        gen = torch.Generator().manual_seed(config.seed)
        ids = torch.randint(0, site.embeddings.num_embeddings, (length,), generator=gen).tolist()
    return torch.tensor(ids, dtype=torch.long, device=site.device)


def table_shape(length: int, site: Site) -> tuple[int, int, int, int, int]:
    """`[P, S, 2, kv_heads, head_dim]` over the slots that get a prefix."""
    return (length, sum(c is not None for c in site.columns), 2, site.kv_heads, site.head_dim)


class Prefix(nn.Module):
    """What every method offers the wrapper. Subclasses set the class attributes and the hooks below."""

    joins_input: ClassVar[bool] = False  # True: on a model whose inputs attend forward, it sits among them
    tensor_key: ClassVar[str]  # its main tensor's name in a prefix file
    reparameterised: ClassVar[bool] = False

    @classmethod
    def create(cls, config: PrefixConfig, site: Site, tokenizer: Any, init: bool) -> Prefix:
        """A new prefix; `init=False` leaves placeholders that loading fills."""
        raise NotImplementedError

    @property
    def length(self) -> int:
        raise NotImplementedError

    def kv(self, site: Site) -> list[KV | None]:
        """Per-slot `(keys, values)`, `[1, kv_heads, P, head_dim]` each."""
        raise NotImplementedError

    def prompt(self) -> torch.Tensor:
        """`[P, hidden]` embeddings, for methods that join the input."""
        raise PrefixTuneError(f"{type(self).__name__} has no input embeddings")

    def saved(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        """The tensors a prefix file holds for this method."""
        raise NotImplementedError

    def loadable(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` less what a file may carry that this prefix has no use for."""
        return tensors

    def load(self, tensors: dict[str, torch.Tensor], site: Site) -> None:
        """Copy checked tensors (names, shapes and dtypes already match `saved`) in."""
        raise NotImplementedError

    @classmethod
    def loading_config(cls, config: PrefixConfig, tensors: dict[str, torch.Tensor], trainable: bool) -> PrefixConfig:
        """The config a saved prefix is rebuilt with (a method may load in a lighter form)."""
        return config


class PrefixTable(Prefix):
    """Keys/values for the selected slots, learned directly."""

    tensor_key = "prefix"

    def __init__(self, length: int, site: Site) -> None:
        super().__init__()
        self.shape = table_shape(length, site)
        self.table = nn.Parameter(torch.zeros(self.shape, device=site.device))

    @classmethod
    def create(cls, config: PrefixConfig, site: Site, tokenizer: Any, init: bool) -> Prefix:
        module = cls(config.num_virtual_tokens, site)
        how = config.resolved_init
        if not init or how == "zero":
            return module
        if how == "random":
            gen = torch.Generator().manual_seed(config.seed)
            module.table.data.copy_(torch.randn(module.shape, generator=gen))
        else:  # the model's own keys/values on real words: a prefix that starts as a plausible context
            pairs = site.record(token_ids(config, site, tokenizer, config.num_virtual_tokens)[None], False)
            chosen = [p for p, c in zip(pairs, site.columns, strict=True) if c is not None]
            module.table.data.copy_(kv_to_table(chosen).float())
        return module

    @property
    def length(self) -> int:
        return self.shape[0]

    def forward(self) -> torch.Tensor:
        return self.table

    def kv(self, site: Site) -> list[KV | None]:
        return table_to_kv(self(), site.columns)

    def saved(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        return {"prefix": self.collapsed()}

    def collapsed(self) -> torch.Tensor:
        """The plain table an inference user needs."""
        with torch.no_grad():
            return self().detach().clone()

    def loadable(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in tensors.items() if not k.startswith("reparam.")}  # resume-only extras

    def load(self, tensors: dict[str, torch.Tensor], site: Site) -> None:
        with torch.no_grad():
            self.table.copy_(tensors["prefix"])


class PrefixMLP(PrefixTable):
    """The table produced by Li & Liang's MLP (embedding -> Linear -> Tanh -> Linear), for stabler training."""

    reparameterised = True

    def __init__(self, length: int, site: Site, hidden: int) -> None:
        nn.Module.__init__(self)
        n_cols = sum(c is not None for c in site.columns)
        self.shape = (length, n_cols, 2, site.kv_heads, site.head_dim)
        self.embedding = nn.Parameter(torch.empty(length, site.hidden_size).normal_(std=0.02))
        self.mlp = nn.Sequential(
            nn.Linear(site.hidden_size, hidden),
            nn.Tanh(),
            nn.Linear(hidden, n_cols * 2 * site.kv_heads * site.head_dim),
        )
        self.to(site.device)

    @classmethod
    def create(cls, config: PrefixConfig, site: Site, tokenizer: Any, init: bool) -> Prefix:
        module = cls(config.num_virtual_tokens, site, config.reparam_hidden)
        how = config.resolved_init
        if not init or how == "zero":
            nn.init.zeros_(module.embedding)
        elif how == "random":
            module.embedding.data.normal_(std=0.02, generator=torch.Generator().manual_seed(config.seed))
        else:
            ids = token_ids(config, site, tokenizer, config.num_virtual_tokens)
            module.embedding.data.copy_(site.embeddings(ids).float())
        return module

    def forward(self) -> torch.Tensor:
        return self.mlp(self.embedding).view(self.shape)

    def saved(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        tensors = {"prefix": self.collapsed()}
        if keep_reparam:
            tensors.update({f"reparam.{k}": v for k, v in self.state_dict().items()})
        return tensors

    def loadable(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors

    def load(self, tensors: dict[str, torch.Tensor], site: Site) -> None:
        self.load_state_dict({k[len("reparam.") :]: v for k, v in tensors.items() if k.startswith("reparam.")})

    @classmethod
    def loading_config(cls, config: PrefixConfig, tensors: dict[str, torch.Tensor], trainable: bool) -> PrefixConfig:
        if trainable and "reparam.mlp.0.weight" in tensors:
            return config
        return dataclasses.replace(config, reparam="none")  # inference needs the collapsed table only


class SoftPrompt(Prefix):
    """P vectors joined to the input embeddings (on decoders, equivalently their keys/values)."""

    joins_input = True
    tensor_key = "prompt"

    def __init__(self, embeddings: torch.Tensor, trainable: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Parameter(embeddings.detach().clone(), requires_grad=trainable)

    @classmethod
    def create(cls, config: PrefixConfig, site: Site, tokenizer: Any, init: bool) -> Prefix:
        weight, how = site.embeddings.weight, config.resolved_init
        prompt = torch.zeros(config.num_virtual_tokens, weight.shape[1], dtype=torch.float32, device=weight.device)
        if init and how in ("text", "vocab"):
            prompt = site.embeddings(token_ids(config, site, tokenizer, config.num_virtual_tokens)).detach().float()
        elif init and how == "random":
            gen = torch.Generator().manual_seed(config.seed)
            prompt = torch.randn(prompt.shape, generator=gen).to(weight.device) * weight.float().std()
        return cls(prompt)

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def forward(self) -> torch.Tensor:
        return self.embedding

    def prompt(self) -> torch.Tensor:
        return self.embedding

    def kv(self, site: Site) -> list[KV | None]:
        return site.record(self.embedding.to(site.embeddings.weight.dtype)[None], True)

    def saved(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        return {"prompt": self.embedding.detach()}

    def load(self, tensors: dict[str, torch.Tensor], site: Site) -> None:
        with torch.no_grad():
            self.embedding.copy_(tensors["prompt"])


class TextPrefix(SoftPrompt):
    """A fixed text: its token ids are saved, its embeddings (and, on decoders, keys/values) derived."""

    tensor_key = "text_ids"

    def __init__(self, ids: torch.Tensor, site: Site) -> None:
        super().__init__(site.embeddings(ids).detach(), trainable=False)
        self.register_buffer("ids", ids)
        self._kv: tuple[torch.device, list[KV | None]] | None = None  # frozen: computed once per device

    @classmethod
    def create(cls, config: PrefixConfig, site: Site, tokenizer: Any, init: bool) -> Prefix:
        if init:
            return cls(token_ids(config, site, tokenizer, None), site)
        return cls(torch.zeros(config.num_virtual_tokens, dtype=torch.long, device=site.device), site)

    def kv(self, site: Site) -> list[KV | None]:
        device = self.embedding.device
        if self._kv is None or self._kv[0] != device:
            self._kv = (device, site.record(self.ids[None], False))
        return self._kv[1]

    def saved(self, keep_reparam: bool = True) -> dict[str, torch.Tensor]:
        return {"text_ids": self.ids}

    def load(self, tensors: dict[str, torch.Tensor], site: Site) -> None:
        with torch.no_grad():
            self.ids.copy_(tensors["text_ids"])
            self.embedding.copy_(site.embeddings(self.ids))
        self._kv = None


def prefix_class(config: PrefixConfig) -> type[Prefix]:
    """The one place a config's method (and reparameterisation) picks a class."""
    if config.method == "prefix":
        return PrefixMLP if config.reparam == "mlp" else PrefixTable
    return {"prompt": SoftPrompt, "text": TextPrefix}[config.method]


def table_to_kv(table: torch.Tensor, slot_of: list[int | None]) -> list[KV | None]:
    """Split `[B?, P, S, 2, H, D]` into per-model-slot `(keys, values)` of `[B or 1, H, P, D]`.

    `slot_of[i]` is the table column of model slot i, or None for a slot left without a prefix.
    """
    if table.dim() == 5:
        table = table.unsqueeze(0)
    kv = table.permute(2, 3, 0, 4, 1, 5)  # [S, 2, B, H, P, D]
    return [None if col is None else (kv[col, 0], kv[col, 1]) for col in slot_of]


def kv_to_table(pairs: list[KV]) -> torch.Tensor:
    """Inverse of `table_to_kv` for batch-1 recordings: `[1, H, P, D]` pairs -> `[P, S, 2, H, D]`."""
    stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])  # [S, 2, H, P, D]
    return stacked.permute(3, 0, 1, 2, 4).contiguous()
