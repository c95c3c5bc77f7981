"""Aten decompositions of the ``mesa::`` ops for the standard-op ONNX graphs.

``decompositions(cg)`` maps each op to a function of the same signature for
``ExportedProgram.run_decompositions``:

- ``fixed``: ``ops.reference`` as it is; while tracing, its CG keeps the fixed trip count
  (unrolled, ~17 ONNX nodes per step) and converged rows are frozen by masks, so ``cg_tol``
  still gives the early-exit results, only not the early-exit time.
- ``loop``: the same arithmetic with the CG iterations in ``torch._higher_order_ops.while_loop``,
  which becomes an ONNX ``Loop`` that stops once every row has ``||r|| <= cg_tol ||r0||``. The
  loop also returns its iteration count, which the exporter exposes as a graph output.

Prefill with a dynamic T: the chunkwise reference reshapes (T + pad) tokens into chunks, and
torch.export cannot prove ``(T + (-T mod C)) mod C == 0`` for a symbolic T, so it pins T to the
example size. Here the whole prompt is ONE chunk (C = T): the same algorithm and code, exact for
any T without padding, at O(B H T^2) memory for the decay mask (fine for prompts of a few thousand
tokens; longer prompts belong to the plugin graph, whose chunk node is opaque).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch._higher_order_ops import while_loop

from mesa_compile.ops import reference
from mesa_compile.ops.reference import (  # the chunkwise building blocks, shared with the op
    _chunk,
    _compute_dtype,
    _from_chunks,
    _readout,
    _state_diag,
    _state_matvec,
    _to_chunks,
)

__all__ = ["CG_FORMS", "decompositions", "cg_solve_loop", "chunk_fwd_whole", "chunk_fwd_loop", "decode_step_loop"]

CG_FORMS = ("fixed", "loop", "plugin")
Solver = Callable[..., tuple[Tensor, ...]]


def cg_solve_loop(
    matvec: Callable[[Tensor], Tensor],
    rhs: Tensor,  # (..., K)
    diag: Tensor,  # (..., K)
    cg_steps: int,
    cg_tol: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.cg_solve`` with the iterations in a ``while_loop``; returns (x, steps, iters).

    Same x0, updates, breakdown guards and stopping rule as the reference (the results agree to
    rounding); the loop ends after ``cg_steps`` iterations or once no row is active.
    ``iters`` is the int64 scalar number of iterations the loop ran.
    """
    x = rhs / diag
    r = rhs - matvec(x)
    d = r.square().sum(-1)
    stop = d * (cg_tol * cg_tol)
    active = d > stop
    steps = torch.zeros_like(d, dtype=torch.int32)
    it = torch.zeros((), dtype=torch.int64, device=rhs.device)

    def cond(it, x, r, p, d, steps, active):
        return (it < cg_steps) & active.any()

    def body(it, x, r, p, d, steps, active):
        w = matvec(p)
        pw = (p * w).sum(-1)
        ok = active & (pw > 0) & torch.isfinite(pw)
        alpha = torch.where(ok, d / torch.where(ok, pw, torch.ones_like(pw)), torch.zeros_like(pw))
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * w
        d_new = r.square().sum(-1)
        ratio = torch.where(ok, d_new / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(d))
        p = torch.where(ok[..., None], r + ratio[..., None] * p, p)
        d = torch.where(ok, d_new, d)
        return it + 1, x, r, p, d, steps + ok.to(torch.int32), ok & (d_new > stop)

    # NOTE: while_loop rejects carried values that alias each other: p starts as a copy of r.
    it, x, _, _, _, steps, _ = while_loop(cond, body, (it, x, r, r.clone(), d.clone(), steps, active))
    return x, steps, it


def chunk_fwd_whole(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size: int, cg_steps: int, cg_tol: float):
    """``reference.chunk_fwd`` with the whole sequence as one chunk (any symbolic T; fixed CG)."""
    return reference.chunk_fwd(q, k, v, g, beta, lamb, h_kk, h_kv, q.shape[1], cg_steps, cg_tol)


def chunk_fwd_loop(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size: int, cg_steps: int, cg_tol: float):
    """``chunk_fwd_whole`` with the CG of all tokens in one early-exit ``while_loop``.

    Returns the op's five outputs plus the loop's iteration count.
    """
    T = chunk_size = q.shape[1]  # (the whole sequence is one chunk, see the module docstring)
    dtype = _compute_dtype(q, k, v, h_kk)
    c = _chunk(k, v, g, beta, lamb, h_kk, h_kv, chunk_size, dtype)
    x, steps, iters = cg_solve_loop(
        lambda p: _state_matvec(c, p) + c.lamb * p,
        _to_chunks(q, chunk_size, dtype),  # (B, H, N, C, K)
        _state_diag(c) + c.lamb,
        cg_steps,
        cg_tol,
    )
    o = _readout(c, x)  # (B, H, N, C, V)
    out = (_from_chunks(o, T).to(v.dtype), _from_chunks(x, T), c.h_kk_end, c.h_kv_end, _from_chunks(steps, T))
    return out, iters


def decode_step_loop(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps: int, cg_tol: float):
    """``reference.decode_step`` with the early-exit ``while_loop`` CG.

    Returns the op's five outputs plus the loop's iteration count.
    """
    dtype = _compute_dtype(q, k, v, h_kk)
    q, k, v, g, beta, lamb = (t.to(dtype) for t in (q, k, v, g, beta, lamb))
    gamma = g.exp()[..., None, None]  # (B, H, 1, 1)
    bt = beta[..., None, None]
    h_kk = gamma * h_kk.to(dtype) + bt * k[..., :, None] * k[..., None, :]  # (B, H, K, K)
    h_kv = gamma * h_kv.to(dtype) + bt * k[..., :, None] * v[..., None, :]  # (B, H, K, V)
    x, steps, iters = cg_solve_loop(
        lambda p: (h_kk @ p[..., None])[..., 0] + lamb * p,
        q,
        h_kk.diagonal(dim1=-2, dim2=-1) + lamb,
        cg_steps,
        cg_tol,
    )
    o = torch.einsum("bhkv,bhk->bhv", h_kv, x)  # (B, H, V)
    return (o.to(v.dtype), x, h_kk, h_kv, steps), iters


def _drop_iters(fn: Solver) -> Solver:
    """The op contract has five outputs; the loop count survives as the Loop node's first output."""

    def op_outputs(*args):
        return fn(*args)[0]

    return op_outputs


def decompositions(cg: str) -> dict:
    """``{torch op overload: aten implementation}`` for ``run_decompositions`` (cg: fixed | loop)."""
    if cg == "fixed":
        return {
            torch.ops.mesa.chunk_fwd.default: chunk_fwd_whole,
            torch.ops.mesa.decode_step.default: reference.decode_step,
        }
    if cg == "loop":
        return {
            torch.ops.mesa.chunk_fwd.default: _drop_iters(chunk_fwd_loop),
            torch.ops.mesa.decode_step.default: _drop_iters(decode_step_loop),
        }
    raise ValueError(f"decompositions exist for cg='fixed' and cg='loop', got cg={cg!r}")
