"""The prefix path for flex attention: the model's own block mask, widened by the prefix columns.

Flex attention takes a `BlockMask` built from a `mask_mod(b, h, q, kv)`. A prefix of P keys in front
needs one that answers "visible" for every query at key columns 0..P-1 (or, in a mixed batch, for
the columns that row's prefix fills) and asks the model's own `mask_mod` about column kv - P for
the rest. That new mask is built once per call and mask (every layer reuses it), and the stock
`flex_attention` function runs unchanged on `[prefix; keys]`. A position bias reaches flex through
its `score_mod`, with the zero prefix columns the prefix function already put in front.
"""

from __future__ import annotations

import torch

BASE = "flex_attention"


def widen(mask, query: torch.Tensor, kv_len: int, prefix_len: int, visible: torch.Tensor | None, causal: bool,
          built: dict):  # fmt: skip
    """The block mask over `[prefix; keys]`; None where the call's mask is not a block mask (a tensor mask is
    widened like SDPA's by the caller)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if mask is not None and not isinstance(mask, BlockMask):
        return None
    batch, q_len = query.shape[0], query.shape[2]
    # `built` outlives a call (a whole `generate`), so the key holds the shapes (a missing mask is the same
    # None at every step) and the entry holds the mask and `visible` themselves: while they are pinned
    # here, no later tensor can take their ids.
    key = (id(mask), id(visible), prefix_len, batch, q_len, kv_len)
    if key in built:
        return built[key][-1]
    if mask is not None:
        inner = mask.mask_mod
    elif causal:  # no mask given: the model's causal pattern, bottom-right aligned as a cache needs

        def inner(b, h, q, kv):
            return kv <= q + (kv_len - q_len)
    else:

        def inner(b, h, q, kv):
            return kv >= 0

    def mask_mod(b, h, q, kv):
        body = inner(b, h, q, (kv - prefix_len).clamp(min=0))
        head = visible[b, kv.clamp(max=prefix_len - 1)] if visible is not None else kv >= 0
        return torch.where(kv < prefix_len, head, body)

    widened = create_block_mask(mask_mod, B=batch, H=None, Q_LEN=q_len, KV_LEN=kv_len + prefix_len,
                                device=query.device)  # fmt: skip
    built[key] = (mask, visible, widened)
    return widened
