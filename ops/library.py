"""The ``mesa::`` torch ops: one registration module for all of them.

Each op is a ``triton_op`` whose body picks the implementation by device (toolchain.md):
Triton kernels on CUDA, and on CPU tensors when the Triton interpreter is on (eager only);
otherwise the aten implementation in ``reference``. The body is also what torch.compile and
torch.export trace, so it stays free of host syncs while tracing. Autograd is registered with
``register_autograd`` and calls ``mesa::chunk_bwd``, so backward compiles too.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from . import kernels, reference
from .names import CHUNK_BWD, CHUNK_FWD, DECODE_STEP

__all__ = ["chunk_fwd", "chunk_bwd", "decode_step"]

if kernels.HAS_TRITON:
    from torch.library import triton_op as _define_op
else:  # no triton wheel (macOS, Windows): same contract, aten body only
    from torch.library import custom_op as _define_op


def _use_kernels(t: Tensor) -> bool:
    """Triton on CUDA; on CPU only under TRITON_INTERPRET=1 in eager (the interpreter can't trace)."""
    if not kernels.HAS_TRITON:
        return False
    if t.device.type == "cuda":
        return True
    return (
        t.device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET") == "1"
        and not torch.compiler.is_compiling()
        and not isinstance(t, torch._subclasses.FakeTensor)
    )


def _pick(name: str, t: Tensor):
    """The Triton launcher ``kernels.<name>`` when it applies to ``t`` (the keys, or q), else the aten
    reference. The chunk kernels take K <= kernels.CHUNK_K_MAX; decode takes any K."""
    fits = name == "decode_step" or t.shape[-1] <= kernels.CHUNK_K_MAX
    return getattr(kernels if fits and _use_kernels(t) else reference, name)


@_define_op(CHUNK_FWD, mutates_args=())
def chunk_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    h_kk: Tensor,
    h_kv: Tensor,
    chunk_size: int,
    cg_steps: int,
    cg_tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, q_star, h_kk_end, h_kv_end, steps); see ``reference.chunk_fwd``."""
    impl = _pick("chunk_fwd", q)
    return impl(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size, cg_steps, cg_tol)


@_define_op(CHUNK_BWD, mutates_args=())
def chunk_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    h_kk: Tensor,
    h_kv: Tensor,
    q_star: Tensor,
    do: Tensor,
    dh_kk: Tensor,
    dh_kv: Tensor,
    chunk_size: int,
    cg_steps: int,
    cg_tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dg, dbeta, dlamb, dh_kk0, dh_kv0); see ``reference.chunk_bwd``."""
    impl = _pick("chunk_bwd", q)
    return impl(q, k, v, g, beta, lamb, h_kk, h_kv, q_star, do, dh_kk, dh_kv, chunk_size, cg_steps, cg_tol)


@_define_op(DECODE_STEP, mutates_args=())
def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    h_kk: Tensor,
    h_kv: Tensor,
    cg_steps: int,
    cg_tol: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o, q_star, h_kk_new, h_kv_new, steps) for one token; see ``reference.decode_step``."""
    impl = _pick("decode_step", q)
    return impl(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol)


if not kernels.HAS_TRITON:  # custom_op needs explicit fakes; triton_op traces its body instead
    for _op, _ref in ((chunk_fwd, reference.chunk_fwd), (chunk_bwd, reference.chunk_bwd),
                      (decode_step, reference.decode_step)):  # fmt: skip
        _op.register_fake(_ref)


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
def _grad_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    # NOTE: gradients can arrive as expanded stride-0 tensors; kernels assume contiguity.
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _setup_chunk_fwd(ctx, inputs, output) -> None:
    q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size, cg_steps, cg_tol = inputs
    o, q_star, h_kk_end, h_kv_end, steps = output
    ctx.save_for_backward(q, k, v, g, beta, lamb, h_kk, h_kv, q_star)
    ctx.shapes = (o, h_kk_end, h_kv_end)
    ctx.cg = (chunk_size, cg_steps, cg_tol)
    ctx.mark_non_differentiable(q_star, steps)


def _backward_chunk_fwd(ctx, do, _dq_star, dh_kk, dh_kv, _dsteps):
    q, k, v, g, beta, lamb, h_kk, h_kv, q_star = ctx.saved_tensors
    o, h_kk_end, h_kv_end = ctx.shapes
    grads = torch.ops.mesa.chunk_bwd(
        q, k, v, g, beta, lamb, h_kk, h_kv, q_star,
        _grad_or_zeros(do, o), _grad_or_zeros(dh_kk, h_kk_end), _grad_or_zeros(dh_kv, h_kv_end),
        *ctx.cg,
    )  # fmt: skip
    return (*grads, None, None, None)


_DECODE_BWD_CHUNK = 16


def _setup_decode_step(ctx, inputs, output) -> None:
    q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol = inputs
    o, q_star, h_kk_new, h_kv_new, steps = output
    ctx.save_for_backward(q, k, v, g, beta, lamb, h_kk, h_kv, q_star)
    ctx.shapes = (o, h_kk_new, h_kv_new)
    ctx.cg = (cg_steps, cg_tol)
    ctx.mark_non_differentiable(q_star, steps)


def _backward_decode_step(ctx, do, _dq_star, dh_kk, dh_kv, _dsteps):
    # One token is a sequence of length 1: reuse the chunk backward on (B, 1, H, .) views, with
    # chunks of 16 (the smallest tile the GPU's tl.dot takes; the padding is neutral).
    q, k, v, g, beta, lamb, h_kk, h_kv, q_star = ctx.saved_tensors
    o, h_kk_new, h_kv_new = ctx.shapes
    seq = [t.unsqueeze(1) for t in (q, k, v, g, beta)]
    grads = torch.ops.mesa.chunk_bwd(
        *seq, lamb, h_kk, h_kv, q_star.unsqueeze(1), _grad_or_zeros(do, o).unsqueeze(1),
        _grad_or_zeros(dh_kk, h_kk_new), _grad_or_zeros(dh_kv, h_kv_new), _DECODE_BWD_CHUNK, *ctx.cg,
    )  # fmt: skip
    dq, dk, dv, dg, dbeta = (t.squeeze(1) for t in grads[:5])
    return (dq, dk, dv, dg, dbeta, *grads[5:], None, None)


chunk_fwd.register_autograd(_backward_chunk_fwd, setup_context=_setup_chunk_fwd)
decode_step.register_autograd(_backward_decode_step, setup_context=_setup_decode_step)
