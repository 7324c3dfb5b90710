"""What TRL's `SFTTrainer` needs of a `PrefixModel`: its fused LM head, placed where the prefix stays active.

`SFTTrainer` replaces the forward of the model it trains with one that runs `model.base_model` as a
backbone (expecting `last_hidden_state`) and computes log-probabilities chunk by chunk from the LM
head, without the full logits. On a `PrefixModel`, `base_model` is the whole wrapped model, and a
replaced forward would skip the prefix. So the same patch goes one level down, onto the wrapped
model, with the same settings; the wrapper keeps its forward, which activates the prefix and then
calls the patched model with `fused_lm_head=True` passed through.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn


def _trl_fused_forward(value: Any, owner: nn.Module) -> dict[str, Any] | None:
    """The settings of TRL's fused-LM-head forward if `value` is one bound to `owner`, else None."""
    fn = getattr(value, "__func__", None)
    if fn is None or getattr(value, "__self__", None) is not owner:
        return None
    code = getattr(fn, "__code__", None)
    if code is None or "/trl/" not in code.co_filename.replace("\\", "/"):
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()), strict=True))
    return cells if "original_forward" in cells else None


def redirect_forward_patch(model: nn.Module, value: Any) -> bool:
    """Apply TRL's fused LM head to `model.base_model` instead of `model`; False when `value` is something else."""
    cells = _trl_fused_forward(value, model)
    if cells is None:
        return False
    from trl.trainer.utils import add_fused_lm_head

    settings = [p for p in inspect.signature(add_fused_lm_head).parameters if p != "model"]
    add_fused_lm_head(model.base_model, **{p: cells[p] for p in settings if p in cells})
    return True
