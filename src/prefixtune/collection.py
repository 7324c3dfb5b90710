"""Many prefixes on one frozen model, and batches whose rows each name their own prefix (or none).

This is the promise of prefix tuning that Li & Liang single out: one frozen model serves many tasks
or users at once. Each member is an ordinary `PrefixModel` sharing the base model; a batch is split
into groups of rows by prefix name and handed to the same batching path a single prefix uses.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prefixtune.core import attention, batching
from prefixtune.errors import PrefixTuneError
from prefixtune.model import PrefixModel


class UnknownPrefixError(PrefixTuneError, KeyError):
    """A row named a prefix that is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PrefixCollection(nn.Module):
    """Named prefixes for one base model. `prefixes=[...]` picks one per row (None: the bare model)."""

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model
        self.members = nn.ModuleDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ membership
    def add(self, name: str, prefix: PrefixModel | str | Path, is_trainable: bool = False) -> PrefixModel:
        """Add a prefix (a `PrefixModel` on this base model, or a saved folder) under `name`."""
        if not name or "." in name:
            raise PrefixTuneError(f"prefix name {name!r} must be non-empty and contain no '.'")
        if not isinstance(prefix, PrefixModel):
            prefix = PrefixModel.from_pretrained(self.base_model, prefix, is_trainable=is_trainable)
        elif prefix.base_model is not self.base_model:
            raise PrefixTuneError(f"prefix {name!r} is attached to a different base model object")
        with self._lock:
            members = dict(self.members.items())
            members[name] = prefix
            self.members = nn.ModuleDict(members)  # swap, so readers never see a half-updated dict
        return prefix

    def remove(self, name: str) -> None:
        with self._lock:
            members = dict(self.members.items())
            if members.pop(name, None) is None:
                raise UnknownPrefixError(f"unknown prefix {name!r}")
            self.members = nn.ModuleDict(members)

    def names(self) -> list[str]:
        return list(self.members.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def __getitem__(self, name: str) -> PrefixModel:
        members = self.members
        if name not in members:
            raise UnknownPrefixError(f"unknown prefix {name!r}; loaded: {sorted(members.keys())}")
        return members[name]

    # ----------------------------------------------------------------------------------- mixed calls
    def groups(self, prefixes: Sequence[str | None]) -> list[batching.Group]:
        """Rows grouped by prefix name, each with what its prefix hands the forward pass; None rows run bare."""
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(prefixes):
            if name is not None:
                rows.setdefault(name, []).append(i)
        device = next(self.base_model.parameters()).device
        if len(rows) == 1 and len(next(iter(rows.values()))) == len(prefixes):
            return [(None, self[next(iter(rows))].inputs())]  # one prefix for the whole batch
        return [(torch.tensor(r, device=device), self[name].inputs()) for name, r in rows.items()]

    def _prepared(self, prefixes: Sequence[str | None], kwargs: dict[str, Any]) -> tuple[dict, Any]:
        batch = next((v.shape[0] for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds")), None)
        if batch is not None and batch != len(prefixes):
            raise PrefixTuneError(f"{len(prefixes)} prefix names for a batch of {batch} rows")
        groups = self.groups(prefixes)
        if not groups:
            return kwargs, None
        member = self[next(name for name in prefixes if name is not None)]  # every member shares these
        kwargs = batching.join_prompts(kwargs, groups, member.get_input_embeddings(), member.prompt_position)
        return kwargs, batching.build_state(member.slots, groups, len(prefixes))

    def forward(self, prefixes: Sequence[str | None], **kwargs: Any) -> Any:
        kwargs, state = self._prepared(prefixes, kwargs)
        if state is None:
            return self.base_model(**kwargs)
        with attention.activate(state):
            return self.base_model(**kwargs)

    @torch.no_grad()
    def generate(self, prefixes: Sequence[str | None], **kwargs: Any) -> torch.Tensor:
        """`generate` for a mixed batch: greedy, sampling and beam search, one prefix per row."""
        kwargs, state = self._prepared(prefixes, kwargs)
        if state is None:
            return self.base_model.generate(**kwargs)
        with attention.activate(state):
            return self.base_model.generate(**kwargs)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.members.parameters() if p.requires_grad)


def per_prefix_loss(logits: torch.Tensor, labels: torch.Tensor, prefixes: Sequence[str | None]) -> torch.Tensor:
    """Sum over prefixes of each prefix's mean cross-entropy on its own rows.

    Prefix parameters are disjoint, so each prefix gets exactly the gradient it would get training
    alone on its rows: multi-task batches change throughput, not results. Token-level labels are
    shifted for causal LMs by the caller when needed; -100 is ignored.
    """
    total = logits.new_zeros(())
    for name in dict.fromkeys(prefixes):
        rows = torch.tensor([i for i, p in enumerate(prefixes) if p == name], device=logits.device)
        total = total + F.cross_entropy(
            logits[rows].reshape(-1, logits.shape[-1]).float(), labels[rows].reshape(-1), ignore_index=-100
        )
    return total
