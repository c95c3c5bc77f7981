"""Aten decompositions of the ``mesa::`` ops for the standard-op ONNX graphs.

``decompositions(cg)`` maps each op to a function of the same signature for
``ExportedProgram.run_decompositions``:

- ``fixed``: ``reference.cg_solve``, which keeps its fixed trip count while tracing (unrolled,
  ~20 ONNX nodes per step) and freezes converged rows with masks, so ``cg_tol`` still gives the
  early-exit results, only not the early-exit time. Decode is ``reference.decode_step``.
- ``loop``: the same arithmetic with the CG iterations in ``torch._higher_order_ops.while_loop``,
  which becomes an ONNX ``Loop`` that stops once every row has ``||r|| <= cg_tol ||r0||``. The
  loop also returns its iteration count, which the exporter exposes as a graph output.

Prefill with a dynamic T: the chunkwise reference pads T to a chunk multiple and reshapes, and
torch.export cannot prove the padded length consistent for a symbolic T, so it pins T to the
example size. Here the whole prompt is ONE chunk (mesanet-math.md section 3 with C = T): the same
CG on the same matvec, exact for any T without padding, at O(B H T^2) memory for the decay mask
(fine for prompts of a few thousand tokens; longer prompts belong to the plugin graph, whose
chunk node is opaque).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from mesa_compile.ops import reference
from torch import Tensor
from torch._higher_order_ops import while_loop

__all__ = [
    "CG_FORMS",
    "cg_solve_loop",
    "chunk_fwd_loop",
    "chunk_fwd_whole",
    "decode_step_loop",
    "decompositions",
]

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
    s, stop = reference.cg_start(matvec, rhs, diag, cg_tol)
    it = torch.zeros((), dtype=torch.int64, device=rhs.device)

    def cond(it, x, r, p, d, steps, active):
        return (it < cg_steps) & active.any()

    def body(it, x, r, p, d, steps, active):
        return it + 1, *reference.cg_iteration(matvec, reference.CGState(x, r, p, d, steps, active), stop)

    # NOTE: while_loop rejects carried values that alias each other or whose strides differ from
    # the body's outputs (which are contiguous); the threshold `stop` is closed over, not carried.
    it, *carried = while_loop(cond, body, (it, *(t.contiguous() for t in s)))
    s = reference.CGState(*carried)
    return s.x, s.steps, it


class _Sequence(NamedTuple):
    """The whole prompt as one chunk, (B, H, T, .) layout, compute dtype."""

    k: Tensor  # (B, H, T, K)
    v: Tensor  # (B, H, T, V)
    mask: Tensor  # (B, H, T, T)  M[t,s] = 1[t>=s] e^{b_t-b_s} beta_s
    decay: Tensor  # (B, H, T, 1)  e^{b_t}, b = cumulative log decay
    lamb: Tensor  # (1, H, 1, K)
    h_kk: Tensor  # (B, H, K, K) initial state
    h_kv: Tensor  # (B, H, K, V)
    h_kk_end: Tensor  # (B, H, K, K) state after the last token
    h_kv_end: Tensor  # (B, H, K, V)


def _sequence(k, v, g, beta, lamb, h_kk, h_kv, dtype: torch.dtype) -> _Sequence:
    k, v, g, beta = (t.to(dtype).transpose(1, 2) for t in (k, v, g, beta))  # (B, H, T, .)
    h_kk, h_kv = h_kk.to(dtype), h_kv.to(dtype)
    b = g.cumsum(-1)  # (B, H, T)
    T = b.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=b.device).tril()
    # NOTE: -inf on the acausal half before exp: e^{b_t-b_s} overflows there for long decays.
    mask = (b[..., :, None] - b[..., None, :]).masked_fill(~causal, float("-inf")).exp() * beta[..., None, :]
    b_end = b[..., -1:]  # (B, H, 1)
    kw_t = (k * ((b_end - b).exp() * beta)[..., None]).transpose(-1, -2)  # (B, H, K, T)
    e_end = b_end.exp()[..., None]  # (B, H, 1, 1)
    return _Sequence(
        k=k, v=v, mask=mask, decay=b.exp()[..., None], lamb=lamb.to(dtype)[None, :, None, :],
        h_kk=h_kk, h_kv=h_kv, h_kk_end=e_end * h_kk + kw_t @ k, h_kv_end=e_end * h_kv + kw_t @ v,
    )  # fmt: skip


def _matvec(s: _Sequence, p: Tensor) -> Tensor:
    """(H_t + diag(lamb)) p_t for every token: ((P K^T) * M) K + (e^b * P) H_0 + lamb * P."""
    return ((p @ s.k.transpose(-1, -2)) * s.mask) @ s.k + (s.decay * p) @ s.h_kk + s.lamb * p


def _diag(s: _Sequence) -> Tensor:
    """diag(H_t) + lamb for every token: e^{b_t} diag(H_0) + M @ (K * K) + lamb."""
    return s.decay * s.h_kk.diagonal(dim1=-2, dim2=-1)[..., None, :] + s.mask @ s.k.square() + s.lamb


def _prefill(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps: int, cg_tol: float, solve) -> tuple:
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    s = _sequence(k, v, g, beta, lamb, h_kk, h_kv, dtype)
    x, steps, *iters = solve(lambda p: _matvec(s, p), q.to(dtype).transpose(1, 2), _diag(s), cg_steps, cg_tol)
    o = ((x @ s.k.transpose(-1, -2)) * s.mask) @ s.v + (s.decay * x) @ s.h_kv  # (B, H, T, V)
    out = (o.transpose(1, 2).to(v.dtype), x.transpose(1, 2), s.h_kk_end, s.h_kv_end, steps.transpose(1, 2))
    return out, iters


def chunk_fwd_whole(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size: int, cg_steps: int, cg_tol: float):
    """``mesa::chunk_fwd`` for any symbolic T: one chunk, ``reference.cg_solve`` (fixed trip count)."""
    return _prefill(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol, reference.cg_solve)[0]


def chunk_fwd_loop(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size: int, cg_steps: int, cg_tol: float):
    """``chunk_fwd_whole`` with the CG of all tokens in one early-exit ``while_loop``.

    Returns the op's five outputs plus the loop's iteration count.
    """
    out, (iters,) = _prefill(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol, cg_solve_loop)
    return out, iters


def decode_step_loop(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps: int, cg_tol: float):
    """``reference.decode_step`` with the early-exit ``while_loop`` CG.

    Returns the op's five outputs plus the loop's iteration count.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, v.dtype), torch.float32)
    out_dtype = v.dtype
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
    o = (x[..., None, :] @ h_kv)[..., 0, :]  # (B, H, V)
    return (o.to(out_dtype), x, h_kk, h_kv, steps), iters


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
