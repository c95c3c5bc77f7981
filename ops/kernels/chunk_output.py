"""Chunkwise MesaNet read-out o_t = G_t^T q*_t and its adjoint, from the chunk-start states G_c.

Per chunk of C rows with within-chunk cumulative log decay b and M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s:
  read-out  o  = ((X K^T) * M) V + e^b * (X G_c)
  adjoint   dX = ((dO V^T) * M) K + e^b * (dO G_c^T)   (the right-hand side of the adjoint CG solve)
Both are their own kernels rather than the tail and head of the CG kernel: their tiles (V, dO, G_c,
the split X) kept the CG loop's registers busy across the loop and doubled its spills, and the
adjoint's streamed G_c buffers took the shared memory of a second program per SM
(benchmarks/NOTES-kernels.md, round 4). Products are split like every product of the chunk kernels
(chunk_common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import chunk_tokens, mm, mm_pre, split_hi, split_lo, split_pair


@triton.jit
def _decay(g_ptr, beta_ptr, tok, tm, rows):
    """Cumulative log decay b (C,) of the chunk and M (C, C) = 1[t >= s] e^{b_t - b_s} beta_s."""
    g = tl.load(g_ptr + tok, mask=tm, other=0.0)
    beta = tl.load(beta_ptr + tok, mask=tm, other=0.0)
    bcum = tl.cumsum(g, 0)
    return bcum, tl.where(rows[:, None] >= rows[None, :], tl.exp(bcum[:, None] - bcum[None, :]), 0.0) * beta[None, :]


@triton.jit
def _chunk_output_kernel(
    x_ptr,  # (B, T, H, K) fp32 q*
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    gs_ptr,  # (B, NT, H, K, V) fp32 chunk-start G
    o_ptr,  # (B, T, H, V) out
    T, H, K, V, NT,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_c, bb, hh, rows, tm, tok = chunk_tokens(T, H, C)
    pid_v = tl.program_id(2)
    ik = tl.arange(0, BK)
    km = ik < K
    iv = pid_v * BV + tl.arange(0, BV)
    vm = iv < V
    ck = tm[:, None] & km[None, :]
    cv = tm[:, None] & vm[None, :]

    bcum, mdec = _decay(g_ptr, beta_ptr, tok, tm, rows)

    x = tl.load(x_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK)
    x_hi, x_lo = split_pair(x, False, SPLIT_FP16)
    kt = tl.load(k_ptr + tok[None, :] * K + ik[:, None], mask=km[:, None] & tm[None, :], other=0.0)  # (BK, C)
    kt_hi, kt_lo = split_pair(kt, K_EXACT, SPLIT_FP16)
    s = mm_pre(x_hi, x_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
    s_hi, s_lo = split_pair(s, False, SPLIT_FP16)

    vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0)  # (C, BV)
    v_hi, v_lo = split_pair(vv, V_EXACT, SPLIT_FP16)
    gbase = ((bb * NT + pid_c) * H + hh) * K * V
    gc = tl.load(gs_ptr + gbase + ik[:, None] * V + iv[None, :], mask=km[:, None] & vm[None, :], other=0.0)
    gc_hi = split_hi(gc, SPLIT_FP16)
    o = mm_pre(x_hi, x_lo, gc_hi, split_lo(gc, gc_hi, SPLIT_FP16), False, False) * tl.exp(bcum)[:, None]
    o = mm_pre(s_hi, s_lo, v_hi, v_lo, False, V_EXACT, o)  # (C, BV)
    tl.store(o_ptr + tok[:, None] * V + iv[None, :], o.to(o_ptr.dtype.element_ty), mask=cv)


def chunk_output(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                 gs: torch.Tensor, o: torch.Tensor, chunk_size: int, split_fp16: bool) -> None:
    """Write o (B, T, H, V) from q* x (B, T, H, K) fp32 and the chunk-start states gs (B, NT, H, K, V)
    fp32; k, v contiguous, g and beta (B, T, H) fp32 contiguous."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    torch.library.wrap_triton(_chunk_output_kernel)[(NT, B * H, triton.cdiv(V, BV))](
        x, k, v, g, beta, gs, o, T, H, K, V, NT,
        C=chunk_size, BK=BK, BV=BV, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=4,
    )


@triton.jit
def _chunk_output_adjoint_kernel(
    do_ptr,  # (B, T, H, V) in v's dtype
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    gs_ptr,  # (B, NT, H, K, V) fp32 chunk-start G
    dx_ptr,  # (B, T, H, K) fp32 out
    T, H, K, V, NT,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_c, bb, hh, rows, tm, tok = chunk_tokens(T, H, C)
    ik = tl.arange(0, BK)
    km = ik < K
    ck = tm[:, None] & km[None, :]
    gbase = ((bb * NT + pid_c) * H + hh) * K * V
    bcum, mdec = _decay(g_ptr, beta_ptr, tok, tm, rows)

    sdv = tl.zeros([C, C], dtype=tl.float32)  # [t, s] = do_t . v_s
    dog = tl.zeros([C, BK], dtype=tl.float32)  # (dO G_c^T)_t
    for v0 in range(0, V, BV):
        iv = v0 + tl.arange(0, BV)
        vm = iv < V
        cv = tm[:, None] & vm[None, :]
        dov = tl.load(do_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0)  # (C, BV)
        vt = tl.load(v_ptr + tok[None, :] * V + iv[:, None], mask=vm[:, None] & tm[None, :], other=0.0)  # (BV, C)
        gct = tl.load(gs_ptr + gbase + ik[None, :] * V + iv[:, None], mask=vm[:, None] & km[None, :],
                      other=0.0)  # (BV, BK) G_c^T
        sdv += mm(dov.to(tl.float32), vt.to(tl.float32), V_EXACT, V_EXACT, SPLIT_FP16)
        dog += mm(dov.to(tl.float32), gct, V_EXACT, False, SPLIT_FP16)
    s = sdv * mdec
    s_hi = split_hi(s, SPLIT_FP16)
    kk = tl.load(k_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK)
    k_hi, k_lo = split_pair(kk, K_EXACT, SPLIT_FP16)
    dx = mm_pre(s_hi, split_lo(s, s_hi, SPLIT_FP16), k_hi, k_lo, False, K_EXACT, dog * tl.exp(bcum)[:, None])
    tl.store(dx_ptr + tok[:, None] * K + ik[None, :], dx, mask=ck)


def chunk_output_adjoint(do: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, gs: torch.Tensor, dx: torch.Tensor, chunk_size: int,
                         split_fp16: bool) -> None:
    """Write dx (B, T, H, K) fp32, the adjoint of the read-out applied to do (B, T, H, V) (in v's
    dtype); the other arguments as for chunk_output."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    torch.library.wrap_triton(_chunk_output_adjoint_kernel)[(triton.cdiv(T, chunk_size), B * H)](
        do, k, v, g, beta, gs, dx, T, H, K, V, triton.cdiv(T, chunk_size),
        C=chunk_size, BK=max(16, triton.next_power_of_2(K)), BV=max(16, min(64, triton.next_power_of_2(V))),
        K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt, SPLIT_FP16=split_fp16, num_warps=4,
    )
