"""Chunkwise MesaNet read-out o_t = G_t^T q*_t and its adjoint, each fused with the G state scan.

Per chunk of C rows with within-chunk cumulative log decay b, M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s
and the chunk-start state G_c:
  read-out  o  = ((X K^T) * M) V + e^b * (X G_c)
  adjoint   dX = ((dO V^T) * M) K + e^b * (dO G_c^T)   (the right-hand side of the adjoint CG solve)
  state     G_{c+1} = e^{b_L} G_c + (K * w)^T V,  w_s = e^{b_L - b_s} beta_s
A program owns one block of G (read-out: all K rows x a block of V columns; adjoint: a block of K rows
x all V columns, so that each contraction is whole inside it), keeps it in fp32 registers and walks
the chunks in order, writing o (dX) chunk by chunk and the final G at the end.
NOTE: G_c is never written to memory. Before, a state pass wrote every chunk-start G_c (fp32, 0.5 GB
at B=8 T=2048 H=16 K=V=128, chunk 32) and the read-out read it back. Same run on an H100: state pass
+ read-out 0.87 ms against 0.49 ms for the scan; state pass + adjoint 1.00 ms against 0.33 ms
(benchmarks/NOTES-kernels.md, round 5). Products are split like every product of the chunk kernels
(chunk_common.py); the state update is the state pass's (chunk_states.py), term for term: on the
GPU, o and the final G were bit-identical to the two-kernel path's, dX within 5e-8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import mm, mm_pre, split_pair

# Chunk length of the scans, independent of the CG's chunks. NOTE: at 64 (V blocks of 32, 4 warps,
# 1 stage) the forward scan raised an illegal address on an H100 with triton 3.6; 32 runs.
READOUT_CHUNK = 32


@triton.jit
def _chunk_decay(g_ptr, beta_ptr, tok, tm, rows):
    """Within-chunk cumulative log decay b (C,), M (C, C) = 1[t >= s] e^{b_t - b_s} beta_s, and the
    state-update weights w_s = e^{b_L - b_s} beta_s (0 past the sequence end) with e^{b_L}."""
    g = tl.load(g_ptr + tok, mask=tm, other=0.0)
    beta = tl.load(beta_ptr + tok, mask=tm, other=0.0)
    bcum = tl.cumsum(g, 0)
    b_last = tl.sum(g, 0)
    mdec = tl.where(rows[:, None] >= rows[None, :], tl.exp(bcum[:, None] - bcum[None, :]),
                    0.0) * beta[None, :]
    w = tl.where(tm, tl.exp(b_last - bcum) * beta, 0.0)
    return bcum, mdec, w, tl.exp(b_last)


@triton.jit
def _readout_scan_kernel(
    x_ptr,  # (B, T, H, K) fp32 q*
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s0_ptr,  # (B, H, K, V) fp32 initial G
    o_ptr,  # (B, T, H, V) out
    sfin_ptr,  # (B, H, K, V) fp32 out: final G
    T, H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, C)
    ik = tl.arange(0, BK)
    km = ik < K
    iv = pid_v * BV + tl.arange(0, BV)
    vm = iv < V
    tile = (bb * H + hh) * K * V + ik[:, None] * V + iv[None, :]
    kv_mask = km[:, None] & vm[None, :]
    state = tl.load(s0_ptr + tile, mask=kv_mask, other=0.0)  # (BK, BV) G_c
    for c in range(tl.cdiv(T, C)):
        t = c * C + rows
        tm = t < T
        tok = (bb * T + t) * H + hh
        bcum, mdec, w, e_last = _chunk_decay(g_ptr, beta_ptr, tok, tm, rows)
        x = tl.load(x_ptr + tok[:, None] * K + ik[None, :], mask=tm[:, None] & km[None, :],
                    other=0.0)  # (C, BK)
        x_hi, x_lo = split_pair(x, False, SPLIT_FP16)
        kt = tl.load(k_ptr + tok[None, :] * K + ik[:, None], mask=km[:, None] & tm[None, :],
                     other=0.0)  # (BK, C)
        kt_hi, kt_lo = split_pair(kt, K_EXACT, SPLIT_FP16)
        vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=tm[:, None] & vm[None, :],
                     other=0.0)  # (C, BV)
        v_hi, v_lo = split_pair(vv, V_EXACT, SPLIT_FP16)

        s = mm_pre(x_hi, x_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
        s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
        st_hi, st_lo = split_pair(state, False, SPLIT_FP16)
        o = mm_pre(x_hi, x_lo, st_hi, st_lo, False, False) * tl.exp(bcum)[:, None]
        o = mm_pre(s_hi, s_lo, v_hi, v_lo, False, V_EXACT, o)  # (C, BV)
        tl.store(o_ptr + tok[:, None] * V + iv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])

        kw_hi, kw_lo = split_pair(kt.to(tl.float32) * w[None, :], False, SPLIT_FP16)  # (BK, C) (K * w)^T
        state = e_last * state + mm_pre(kw_hi, kw_lo, v_hi, v_lo, False, V_EXACT)
    tl.store(sfin_ptr + tile, state, mask=kv_mask)


@triton.jit
def _readout_adjoint_scan_kernel(
    do_ptr,  # (B, T, H, V) in v's dtype
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s0_ptr,  # (B, H, K, V) fp32 initial G
    dx_ptr,  # (B, T, H, K) fp32 out
    sfin_ptr,  # (B, H, K, V) fp32 out: final G
    T, H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    rows = tl.arange(0, C)
    ik = pid_k * BK + tl.arange(0, BK)
    km = ik < K
    iv = tl.arange(0, BV)
    vm = iv < V
    tile = (bb * H + hh) * K * V + ik[:, None] * V + iv[None, :]
    kv_mask = km[:, None] & vm[None, :]
    state = tl.load(s0_ptr + tile, mask=kv_mask, other=0.0)  # (BK, BV) rows ik of G_c
    for c in range(tl.cdiv(T, C)):
        t = c * C + rows
        tm = t < T
        tok = (bb * T + t) * H + hh
        bcum, mdec, w, e_last = _chunk_decay(g_ptr, beta_ptr, tok, tm, rows)
        dov = tl.load(do_ptr + tok[:, None] * V + iv[None, :], mask=tm[:, None] & vm[None, :],
                      other=0.0)  # (C, BV)
        vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=tm[:, None] & vm[None, :],
                     other=0.0)  # (C, BV)
        kk = tl.load(k_ptr + tok[:, None] * K + ik[None, :], mask=tm[:, None] & km[None, :],
                     other=0.0)  # (C, BK)
        k_hi, k_lo = split_pair(kk, K_EXACT, SPLIT_FP16)

        s = mm(dov.to(tl.float32), tl.trans(vv.to(tl.float32)), V_EXACT, V_EXACT, SPLIT_FP16) * mdec  # (C, C)
        s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
        dog = mm(dov.to(tl.float32), tl.trans(state), V_EXACT, False, SPLIT_FP16)  # (C, BK) dO G_c^T
        dx = mm_pre(s_hi, s_lo, k_hi, k_lo, False, K_EXACT, dog * tl.exp(bcum)[:, None])
        tl.store(dx_ptr + tok[:, None] * K + ik[None, :], dx, mask=tm[:, None] & km[None, :])

        kw = tl.trans(kk.to(tl.float32) * w[:, None])  # (BK, C)
        state = e_last * state + mm(kw, vv.to(tl.float32), False, V_EXACT, SPLIT_FP16)
    tl.store(sfin_ptr + tile, state, mask=kv_mask)


def _blocks(K: int, V: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))


def chunk_readout(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  h_kv: torch.Tensor, o: torch.Tensor, split_fp16: bool) -> torch.Tensor:
    """Write o (B, T, H, V) from q* x (B, T, H, K) fp32, scanning G from h_kv (B, H, K, V) fp32; returns
    the final G (B, H, K, V) fp32. k, v contiguous; g, beta (B, T, H) fp32 contiguous."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    BK, BVF = _blocks(K, V)
    # NOTE: H100, B=8 T=2048 H=16 K=V=128: V blocks of 64 / 4 warps / 1 stage 0.48 ms; 64/4/2 0.57,
    # 64/8/2 0.67, 32/4/2 0.70 (benchmarks/NOTES-kernels.md, round 5)
    BV = min(64, BVF)
    s_fin = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    torch.library.wrap_triton(_readout_scan_kernel)[(triton.cdiv(V, BV), B * H)](
        x, k, v, g, beta, h_kv, o, s_fin, T, H, K, V,
        C=READOUT_CHUNK, BK=BK, BV=BV, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=4, num_stages=1,
    )
    return s_fin


def chunk_readout_adjoint(do: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, h_kv: torch.Tensor, dx: torch.Tensor,
                          split_fp16: bool) -> torch.Tensor:
    """Write dx (B, T, H, K) fp32, the adjoint of the read-out applied to do (B, T, H, V) (in v's
    dtype), scanning G from h_kv; returns the final G. Other arguments as for chunk_readout."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    BKF, BV = _blocks(K, V)
    # a block of K rows x all V columns of G stays within 64 fp32 registers per thread at 4 warps.
    # NOTE: H100, K=V=128: K blocks of 64 / 4 warps 0.33 ms (1 or 2 stages), 64 / 8 / 2 0.48,
    # 32 / 4 / 2 0.40 (benchmarks/NOTES-kernels.md, round 5)
    BK = max(16, min(BKF, 8192 // BV))
    s_fin = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    torch.library.wrap_triton(_readout_adjoint_scan_kernel)[(triton.cdiv(K, BK), B * H)](
        do, k, v, g, beta, h_kv, dx, s_fin, T, H, K, V,
        C=READOUT_CHUNK, BK=BK, BV=BV, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=4, num_stages=1,
    )
    return s_fin
