"""Straight-through estimator shared by the formats' fake-quant functions."""

from __future__ import annotations

import torch


class _StraightThrough(torch.autograd.Function):
    """Returns `quantized` in the forward pass; passes the gradient to `w` unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(w: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(w, quantized)
