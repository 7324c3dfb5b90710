"""A decoder's output projection with its weight packed once for oneDNN, for decoding steps on CPU.

Why: a decoding step projects one hidden state per running row onto the whole vocabulary, a
`[rows, hidden] x [hidden, vocab]` product with few rows and a very wide weight. torch's default CPU
path for it (MKL's sgemm) is slow for a handful of rows: on SmolLM2's head (576 x 49152) on 2 cores
it took 19-27 ms for 8-15 rows against 7-8 ms with the weight reordered once into oneDNN's blocked
layout (`mkldnn._reorder_linear_weight`). In the server under load, with the variants taking turns
in one process, the mean decoding step fell from 148 to 131 ms at 16 clients and from 90 to 83 ms at
4. One row is left to the default path, which is as fast there. Packing every linear layer as well
gained more at 16 clients (119 ms) but nothing at 4, and would double the weights' memory, so only
the head is packed: it costs one more copy of the head (113 MB for SmolLM2).

The module, its weight and its state dict stay as they are (tied weights, saving and the prefix code
see a plain `nn.Linear`); only its `forward` is replaced on the instance. Rows that need gradients,
other devices or dtypes take the default path.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

log = logging.getLogger("prefixtune.server")

MIN_ROWS = 2  # fewer rows than this go the default way: a single row is as fast there


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(x.shape[-1], 1)
    usable = x.device.type == "cpu" and x.dtype == self.packed_weight.dtype == self.weight.dtype
    if rows < MIN_ROWS or not usable or torch.is_grad_enabled():
        return nn.functional.linear(x, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_output_projection(model: Any) -> bool:
    """Give `model`'s output projection (`get_output_embeddings()`) a oneDNN-packed copy of its weight
    for inference on CPU; True when packed. A no-op (False) off CPU, without oneDNN, for dtypes other
    than float32 and bfloat16, or for a model without a plain `nn.Linear` head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return False
    if head.weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            head.packed_weight = torch.ops.mkldnn._reorder_linear_weight(head.weight.detach(), None)
    except RuntimeError as exc:  # a oneDNN build that cannot pack this shape: the default path serves
        log.info("output projection left unpacked: %s", exc)
        return False
    head.forward = types.MethodType(_packed_forward, head)
    return True
