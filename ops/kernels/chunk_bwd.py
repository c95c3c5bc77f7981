"""Chunkwise MesaNet backward (implicit differentiation; the CG iterations are never unrolled).

Pipeline (mesanet-math.md section 4, same algebra as ops.reference.chunk_bwd):
  1. forward state pass again (H_c, G_c at every chunk start; final H_T, G_T);
  2. adjoint CG solve u = A^{-1} G do: right-hand side by chunk_output_adjoint, solve by the
     chunk_cg kernel (BWD=True), with per-token
     dc_t = -u.(H_t x_t) + x.dx and per-chunk dlamb partials;
  3. reverse state passes: dH_end, dG_end at every chunk end (dh_kk / dh_kv enter at the end);
  4. _chunk_grad_kernel below: per chunk, with W[t,s] = 1[s >= t] e^{b_s - b_t},
       R1 = -((K X^T) * W) U + (e^{bL-b} K) DH^T      R2 = -((K U^T) * W) X + (e^{bL-b} K) DH
       R3 = ((V dO^T) * W) X + (e^{bL-b} V) DG^T      R4 = ((K X^T) * W) dO + (e^{bL-b} K) DG
     dk = beta (R1 + R2 + R3), dv = beta R4, dbeta = rowsum(K * (R1 + R3));
  5. aten glue: dg = reverse cumsum of dc - beta dbeta (+ <dh, final state> at the last token),
     dlamb = sum of the partials (deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_cg import _use_fp16_split, check_key_size, chunk_len, launch_chunk_cg
from .chunk_common import mm, mm_pre, split_hi, split_lo
from .chunk_output import chunk_output_adjoint
from .chunk_states import chunk_state_pass


@triton.jit
def _chunk_grad_kernel(
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    x_ptr,  # (B, T, H, K) fp32 q*
    u_ptr,  # (B, T, H, K) fp32 adjoint solve
    do_ptr,  # (B, T, H, V) in v's dtype
    dhe_ptr,  # (B, NT, H, K, K) fp32 adjoint of H at each chunk end
    dge_ptr,  # (B, NT, H, K, V) fp32 adjoint of G at each chunk end
    dk_ptr,  # (B, T, H, K) out
    dv_ptr,  # (B, T, H, V) out
    dbeta_ptr,  # (B, T, H) fp32 out
    T, H, K, V, NT,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)

    rows = tl.arange(0, C)
    t = pid_c * C + rows  # (C,)
    tm = t < T
    tok = (bb * T + t) * H + hh  # (C,)
    ik = tl.arange(0, BK)
    km = ik < K
    ck = tm[:, None] & km[None, :]  # (C, BK)
    hbase = ((bb * NT + pid_c) * H + hh) * K * K
    gbase = ((bb * NT + pid_c) * H + hh) * K * V

    g = tl.load(g_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    bcum = tl.cumsum(g, 0)  # (C,)
    e_end = tl.exp(tl.sum(g, 0) - bcum)  # (C,) e^{b_L - b_t}
    anti = rows[:, None] <= rows[None, :]
    wdec = tl.where(anti, tl.exp(bcum[None, :] - bcum[:, None]), 0.0)  # (C, C) W[t, s]

    kk = tl.load(k_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK)
    kf = kk.to(tl.float32)
    if K_EXACT:
        k_hi = split_hi(kk, SPLIT_FP16)
        k_lo = k_hi
    else:
        k_hi = split_hi(kf, SPLIT_FP16)
        k_lo = split_lo(kf, k_hi, SPLIT_FP16)
    x = tl.load(x_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK)
    u = tl.load(u_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)
    x_hi = split_hi(x, SPLIT_FP16)
    x_lo = split_lo(x, x_hi, SPLIT_FP16)
    u_hi = split_hi(u, SPLIT_FP16)
    u_lo = split_lo(u, u_hi, SPLIT_FP16)
    ke = kf * e_end[:, None]  # (C, BK)
    ke_hi = split_hi(ke, SPLIT_FP16)
    ke_lo = split_lo(ke, ke_hi, SPLIT_FP16)

    kx = mm_pre(k_hi, k_lo, tl.trans(x_hi), tl.trans(x_lo), K_EXACT, False) * wdec  # (C, C)
    ku = mm_pre(k_hi, k_lo, tl.trans(u_hi), tl.trans(u_lo), K_EXACT, False) * wdec
    kx_hi = split_hi(kx, SPLIT_FP16)
    kx_lo = split_lo(kx, kx_hi, SPLIT_FP16)
    dh = tl.load(dhe_ptr + hbase + ik[:, None] * K + ik[None, :], mask=km[:, None] & km[None, :],
                 other=0.0)  # (BK, BK)
    dh_hi = split_hi(dh, SPLIT_FP16)
    dh_lo = split_lo(dh, dh_hi, SPLIT_FP16)
    r1 = mm_pre(ke_hi, ke_lo, tl.trans(dh_hi), tl.trans(dh_lo), False, False)  # (C, BK)
    r2 = mm_pre(ke_hi, ke_lo, dh_hi, dh_lo, False, False)
    r1 -= mm_pre(kx_hi, kx_lo, u_hi, u_lo, False, False)
    r2 -= mm(ku, x, False, False, SPLIT_FP16)

    vdo = tl.zeros([C, C], dtype=tl.float32)
    r3 = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        iv = v0 + tl.arange(0, BV)
        vm = iv < V
        cv = tm[:, None] & vm[None, :]
        vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0).to(tl.float32)  # (C, BV)
        dov = tl.load(do_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0).to(tl.float32)
        dg_blk = tl.load(dge_ptr + gbase + ik[:, None] * V + iv[None, :], mask=km[:, None] & vm[None, :],
                         other=0.0)  # (BK, BV)
        dg_hi = split_hi(dg_blk, SPLIT_FP16)
        dg_lo = split_lo(dg_blk, dg_hi, SPLIT_FP16)
        vdo += mm(vv, tl.trans(dov), V_EXACT, V_EXACT, SPLIT_FP16)
        r3 += mm(vv * e_end[:, None], tl.trans(dg_blk), False, False, SPLIT_FP16)
        do_hi = split_hi(dov, SPLIT_FP16)
        do_lo = do_hi
        if not V_EXACT:
            do_lo = split_lo(dov, do_hi, SPLIT_FP16)
        r4 = mm_pre(kx_hi, kx_lo, do_hi, do_lo, False, V_EXACT)
        r4 += mm_pre(ke_hi, ke_lo, dg_hi, dg_lo, False, False)  # (C, BV)
        tl.store(dv_ptr + tok[:, None] * V + iv[None, :], (beta[:, None] * r4).to(dv_ptr.dtype.element_ty),
                 mask=cv)
    r3 += mm(vdo * wdec, x, False, False, SPLIT_FP16)
    dk = beta[:, None] * (r1 + r2 + r3)
    tl.store(dk_ptr + tok[:, None] * K + ik[None, :], dk.to(dk_ptr.dtype.element_ty), mask=ck)
    dbeta = tl.sum(kf * (r1 + r3), 1)
    tl.store(dbeta_ptr + tok, dbeta, mask=tm)


def chunk_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              lamb: torch.Tensor, h_kk: torch.Tensor, h_kv: torch.Tensor, q_star: torch.Tensor,
              do: torch.Tensor, dh_kk: torch.Tensor, dh_kv: torch.Tensor, chunk_size: int, cg_steps: int,
              cg_tol: float) -> tuple[torch.Tensor, ...]:
    """Chunkwise MesaNet backward with Triton kernels.

    Same arguments as chunk_fwd plus q_star (B, T, H, K) fp32 from it, do (B, T, H, V) and the final
    state gradients dh_kk (B, H, K, K), dh_kv (B, H, K, V). Returns (dq, dk, dv, dg, dbeta, dlamb,
    dh_kk0, dh_kv0): dq/dk/dv in the dtypes of q/k/v, dg/dbeta like g/beta, dlamb (H, K) fp32,
    dh_* fp32 (gradient of the initial state).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_key_size(K)
    C = chunk_len(chunk_size, K)
    NT = triton.cdiv(T, C)
    split_fp16 = _use_fp16_split()
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    k, v = k.contiguous(), v.contiguous()
    do = do.to(v.dtype).contiguous()
    x = q_star.float().contiguous()
    g32 = g.float().contiguous()
    b32 = beta.float().contiguous()
    lamb32 = lamb.float().contiguous()
    dh_kk = dh_kk.float().contiguous()
    dh_kv = dh_kv.float().contiguous()

    hs, h_end = chunk_state_pass(k, k, g32, b32, h_kk.float().contiguous(), C, False, 1.0, split_fp16,
                                 split_out=True)
    gs, g_end = chunk_state_pass(k, v, g32, b32, h_kv.float().contiguous(), C, False, 1.0, split_fp16)
    dc = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    dlamb_part = torch.empty(B, NT, H, K, device=k.device, dtype=torch.float32)
    u = torch.empty(B, T, H, K, device=k.device, dtype=torch.float32)
    chunk_output_adjoint(do, k, v, g32, b32, gs, u, C, split_fp16)  # u holds dx until the solve
    launch_chunk_cg(u, k, g32, b32, lamb32, hs, x, dc, u, dc, dlamb_part, C, cg_steps, cg_tol, bwd=True)
    dhe, dh_kk0 = chunk_state_pass(u, x, g32, b32, dh_kk, C, True, -1.0, split_fp16)
    dge, dh_kv0 = chunk_state_pass(x, do, g32, b32, dh_kv, C, True, 1.0, split_fp16)

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    torch.library.wrap_triton(_chunk_grad_kernel)[(NT, B * H)](
        k, v, g32, b32, x, u, do, dhe, dge, dk, dv, dbeta, T, H, K, V, NT,
        C=C, BK=BK, BV=BV, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=8 if BK >= 128 else 4,
    )

    d_cum = dc - b32 * dbeta  # (B, T, H)
    final = (dh_kk * h_end).sum((-1, -2)) + (dh_kv * g_end).sum((-1, -2))  # (B, H)
    d_cum[:, -1] += final
    dg = d_cum.flip(1).cumsum(1).flip(1)
    dlamb = dlamb_part.sum((0, 1))  # (H, K)
    return (u.to(q.dtype), dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), dlamb, dh_kk0, dh_kv0)
