"""A generating model's linear layers with their weights packed once for oneDNN, for decoding on CPU.

Why: a decoding step multiplies one hidden state per running row by every weight of the model,
`[rows, in] x [in, out]` products with few rows. torch's default CPU path for them (MKL's sgemm) is
slow for a handful of rows; oneDNN with the weight reordered once into its blocked layout
(`mkldnn._reorder_linear_weight`) is not. On SmolLM2's output projection (576 x 49152) on 2 cores a
product of 8-15 rows took 19-27 ms the default way against 7-8 ms packed. For the whole model, a
decoding step from a worker thread on 2 cores took 144-155 ms with only the output projection
packed against 114-116 ms with every linear layer packed at 13 rows, and 116-126 against 75-87 ms at
4 rows; in the server under 16 clients, 133-148 ms against 115-135 ms (the host's speed moves these
by a fifth from minute to minute). One row is left to the default path, which is as fast there.
Beyond a few rows a packed product's time grows with its rows (SmolLM2's 576 x 1536 MLP weight: 0.11 ms
for 4 rows, 0.21 for 8, 0.25 for 16, 0.43 for 32 on 2 cores), so a step of a dozen rows is bound by
arithmetic, not by reading the weights: every row a step carries costs about the same.

The cost is one more copy of the linear weights (513 MiB for SmolLM2 in float32). The modules, their
weights and the state dict stay as they are (tied weights, saving and the prefix code see plain
`nn.Linear`s); only each module's `forward` is replaced on the instance. Rows that need gradients,
other devices or dtypes take the default path. Packing runs torch on the calling thread, so it
belongs before the server hands the OpenMP threads to its worker (`openmp.release_thread_pool`).
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


def _pack(layer: nn.Linear) -> bool:
    try:
        with torch.no_grad():
            layer.packed_weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
    except RuntimeError as exc:  # a oneDNN build that cannot pack this shape: the default path serves
        log.info("linear layer %s left unpacked: %s", tuple(layer.weight.shape), exc)
        return False
    layer.forward = types.MethodType(_packed_forward, layer)
    return True


def pack_linear_layers(model: Any) -> int:
    """Give every plain `nn.Linear` of a generating `model` a oneDNN-packed copy of its weight for inference
    on CPU; the number packed. A no-op (0) for a model without a plain `nn.Linear` output projection onto a
    vocabulary (a classifier's requests come whole, many rows at once), off CPU, without oneDNN, or for
    dtypes other than float32 and bfloat16."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return 0
    if head.weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return 0
    layers = [m for m in model.modules() if type(m) is nn.Linear and not hasattr(m, "packed_weight")]
    return sum(_pack(layer) for layer in layers)
