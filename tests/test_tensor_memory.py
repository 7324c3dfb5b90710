"""The benchmarks' memory ruler counts what a block creates, once per storage, and nothing that existed."""

from __future__ import annotations

import torch

from benchmarks.tensor_memory import TensorPeak

MIB = 2**20


def test_peak_and_live_bytes_follow_allocations_and_frees():
    weight = torch.zeros(MIB // 4)  # 1 MiB that existed before the block
    with TensorPeak([weight]) as meter:
        view = weight.view(-1, 2).t()  # a view of an existing tensor is not new memory
        a = torch.ones(MIB // 4) + 1  # 1 MiB (the `ones` temporary is freed at once)
        b = torch.ones(2 * MIB // 4) * 2  # 2 MiB
        b.mul_(3)  # in place: no new storage
        del a
        c = b[: MIB // 8]  # a view: shares b's storage
        peak_inside = meter.peak_bytes
    assert view.numel() == weight.numel()
    # ones(1 MiB) + result(1 MiB) live together before the temporary goes: 2 MiB; then ones(2) + result(2)
    # while `a` (1 MiB) lives: 5 MiB.
    assert peak_inside == 5 * MIB
    assert meter.live_bytes == 2 * MIB  # only b is left
    del b, c
    assert meter.live_bytes == 0


def test_backward_memory_is_counted_and_released():
    x = torch.randn(256, 256, requires_grad=True)
    with TensorPeak([x]) as meter:
        y = (x @ x).relu().sum()
        y.backward()
    assert meter.peak_bytes >= 2 * 256 * 256 * 4  # the product and its gradient at least
    del y
    x.grad = None
    assert meter.live_bytes == 0
