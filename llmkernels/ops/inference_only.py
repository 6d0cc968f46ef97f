"""Decode ops have no backward (as their peers'): their outputs are made to refuse one by name.

    out = inference_only("flash_attn_with_kvcache", out, q, k, v, train_with="flash_attn_func")
"""

from __future__ import annotations

import torch


class _NotDifferentiable(torch.autograd.Function):
    """Identity on an inference op's output that ties it to the inputs that require grad, so that a backward
    through it fails by name instead of silently leaving those inputs without gradient (torch's fallback for an
    op without autograd only warns)."""

    @staticmethod
    def forward(ctx, fn, train_with, out, *inputs):
        ctx.fn, ctx.train_with = fn, train_with
        return out.clone()  # (a view of an input could not be modified in place, as out + residual often is)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"llmkernels.{ctx.fn} is not differentiable (an inference op, as its peer's): use {ctx.train_with} "
            "for training, or run this call under torch.no_grad()"
        )


def inference_only(fn: str, out: torch.Tensor, *inputs: torch.Tensor | None, train_with: str) -> torch.Tensor:
    """out, made to fail loudly in a backward when any of `inputs` requires grad (else returned as is). Not while
    torch.compile traces: Dynamo traces the Function's backward too, which would fail every compiled decode step
    in grad mode (eval() without no_grad); there torch's own warning is what remains."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return out
    tracked = [t for t in inputs if t is not None and t.requires_grad]
    return _NotDifferentiable.apply(fn, train_with, out, *tracked) if tracked else out
