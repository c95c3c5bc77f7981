"""Chunkwise MesaNet backward (implicit differentiation; the CG iterations are never unrolled).

Pipeline (mesanet-math.md section 4, same algebra as ops.reference.chunk_bwd):
  1. forward H state pass again (H_c at every chunk start; final H_T), with the G states of the
     adjoint read-out in the same launch where it reads them (chunk_output.adjoint_scans);
  2. adjoint CG solve u = A^{-1} G do: right-hand side dx by chunk_readout_adjoint (which scans G_c or
     reads it from those states, and returns the final G_T), solve by the chunk_cg kernel
     (BWD=True), with per-token dc_t = -u.(H_t x_t) + x.dx and per-chunk dlamb partials;
  3. reverse state passes, both in one launch: dH_end, dG_end at every chunk end (dh_kk / dh_kv enter
     at the end);
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
from .chunk_common import chunk_tokens, mm, mm_pre, split_hi, split_lo, split_pair
from .chunk_output import adjoint_scans, chunk_readout_adjoint, h_states_with_g
from .chunk_states import StatePass, chunk_state_passes


@triton.jit
def _chunk_grad_kernel(
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    x_ptr,  # (B, T, H, K) fp32 q*
    u_ptr,  # (B, T, H, K) fp32 adjoint solve
    do_ptr,  # (B, T, H, V) in v's dtype
    dhe_ptr,  # (B, NT, H, 2, K, K) adjoint of H at each chunk end as (hi, lo) in the split dtype
    dge_ptr,  # (B, NT, H, 2, K, V) adjoint of G at each chunk end as (hi, lo) in the split dtype
    dk_ptr,  # (B, T, H, K) out
    dv_ptr,  # (B, T, H, V) out
    dbeta_ptr,  # (B, T, H) fp32 out
    T, H, K, V, NT,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    # Tiles are held transposed, tokens along the columns (R^T (BK, C)): the K x K and K x V state
    # adjoints are the A operands (M = BK rows) of the big products, read from shared memory as loaded
    # (the CG kernel's layout, chunk_cg.py). With tokens as rows (M = C = 32) every product ran on the
    # pre-Hopper MMA with the 128 x 128 state tiles copied into registers and spilled.
    #   R1^T = DH ke^T - U^T A1     R2^T = DH^T ke^T - X^T A2     R3^T = DG ve^T + X^T A3
    #   R4^T = DG^T ke^T + dO^T A1  with A1 = (X K^T) * W^T, A2 = (U K^T) * W^T, A3 = (dO V^T) * W^T,
    #   ke = e^{bL-b} K, ve = e^{bL-b} V and W^T[s, t] = W[t, s].
    pid_c, bb, hh, cols, tm, tok = chunk_tokens(T, H, C)
    ik = tl.arange(0, BK)
    km = ik < K
    kc = km[:, None] & tm[None, :]  # (BK, C)
    hbase = ((bb * NT + pid_c) * H + hh) * 2 * K * K
    gbase = ((bb * NT + pid_c) * H + hh) * 2 * K * V

    g = tl.load(g_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    bcum = tl.cumsum(g, 0)  # (C,)
    e_end = tl.exp(tl.sum(g, 0) - bcum)  # (C,) e^{b_L - b_t}
    wdec_t = tl.where(cols[:, None] >= cols[None, :], tl.exp(bcum[:, None] - bcum[None, :]), 0.0)  # [s, t]

    kt = tl.load(k_ptr + tok[None, :] * K + ik[:, None], mask=kc, other=0.0)  # (BK, C) K^T
    ktf = kt.to(tl.float32)
    kt_hi, kt_lo = split_pair(kt, K_EXACT, SPLIT_FP16)
    xt = tl.load(x_ptr + tok[None, :] * K + ik[:, None], mask=kc, other=0.0)  # (BK, C) X^T
    ut = tl.load(u_ptr + tok[None, :] * K + ik[:, None], mask=kc, other=0.0)  # (BK, C) U^T
    xt_hi, xt_lo = split_pair(xt, False, SPLIT_FP16)
    ut_hi, ut_lo = split_pair(ut, False, SPLIT_FP16)
    ket = ktf * e_end[None, :]  # (BK, C) ke^T
    ket_hi, ket_lo = split_pair(ket, False, SPLIT_FP16)

    a1 = mm_pre(tl.trans(xt_hi), tl.trans(xt_lo), kt_hi, kt_lo, False, K_EXACT) * wdec_t  # (C, C)
    a2 = mm_pre(tl.trans(ut_hi), tl.trans(ut_lo), kt_hi, kt_lo, False, K_EXACT) * wdec_t
    a1_hi, a1_lo = split_pair(a1, False, SPLIT_FP16)
    a2_hi = split_hi(a2, SPLIT_FP16)
    # loaded in the split dtype and fed to the dots as loaded: the tiles stay in shared memory
    hkk = ik[:, None] * K + ik[None, :]
    dh_hi = tl.load(dhe_ptr + hbase + hkk, mask=km[:, None] & km[None, :], other=0.0)  # (BK, BK)
    dh_lo = tl.load(dhe_ptr + hbase + K * K + hkk, mask=km[:, None] & km[None, :], other=0.0)
    r1 = mm_pre(dh_hi, dh_lo, ket_hi, ket_lo, False, False)  # (BK, C)
    r1 -= mm_pre(ut_hi, ut_lo, a1_hi, a1_lo, False, False)
    r12 = mm_pre(tl.trans(dh_hi), tl.trans(dh_lo), ket_hi, ket_lo, False, False, r1)
    r12 -= mm_pre(xt_hi, xt_lo, a2_hi, split_lo(a2, a2_hi, SPLIT_FP16), False, False)  # R1^T + R2^T

    a3 = tl.zeros([C, C], dtype=tl.float32)  # [s, t] = do_s . v_t
    r3 = tl.zeros([BK, C], dtype=tl.float32)
    for v0 in range(0, V, BV):
        iv = v0 + tl.arange(0, BV)
        vm = iv < V
        vc = vm[:, None] & tm[None, :]
        vt = tl.load(v_ptr + tok[None, :] * V + iv[:, None], mask=vc, other=0.0).to(tl.float32)  # (BV, C)
        dot_ = tl.load(do_ptr + tok[None, :] * V + iv[:, None], mask=vc, other=0.0)  # (BV, C) dO^T
        dgm = km[:, None] & vm[None, :]
        dg_hi = tl.load(dge_ptr + gbase + ik[:, None] * V + iv[None, :], mask=dgm, other=0.0)  # (BK, BV)
        dg_lo = tl.load(dge_ptr + gbase + K * V + ik[:, None] * V + iv[None, :], mask=dgm, other=0.0)
        a3 += mm(tl.trans(dot_.to(tl.float32)), vt, V_EXACT, V_EXACT, SPLIT_FP16)
        vet = vt * e_end[None, :]  # (BV, C) ve^T
        vet_hi = split_hi(vet, SPLIT_FP16)
        r3 = mm_pre(dg_hi, dg_lo, vet_hi, split_lo(vet, vet_hi, SPLIT_FP16), False, False, r3)
        dot_hi, dot_lo = split_pair(dot_, V_EXACT, SPLIT_FP16)
        r4 = mm_pre(dot_hi, dot_lo, a1_hi, a1_lo, V_EXACT, False)  # (BV, C)
        r4 = mm_pre(tl.trans(dg_hi), tl.trans(dg_lo), ket_hi, ket_lo, False, False, r4)
        tl.store(dv_ptr + tok[None, :] * V + iv[:, None], (beta[None, :] * r4).to(dv_ptr.dtype.element_ty),
                 mask=vc)
    a3 = a3 * wdec_t
    a3_hi = split_hi(a3, SPLIT_FP16)
    r3 = mm_pre(xt_hi, xt_lo, a3_hi, split_lo(a3, a3_hi, SPLIT_FP16), False, False, r3)
    tl.store(dk_ptr + tok[None, :] * K + ik[:, None], (beta[None, :] * (r12 + r3)).to(dk_ptr.dtype.element_ty),
             mask=kc)
    # dbeta = rowsum(K * (R1 + R3))
    tl.store(dbeta_ptr + tok, tl.sum(ktf * (r1 + r3), 0), mask=tm)


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

    # an adjoint read-out from states gets its G states from the H pass's launch, and the two reverse
    # passes share one (chunk_state_passes)
    h_kv = h_kv.float().contiguous()
    scan = adjoint_scans(k, v)
    hs, h_upper, h_end, g_states = h_states_with_g(k, v, g32, b32, h_kk.float().contiguous(), h_kv, C,
                                                  split_fp16, with_g=not scan)
    dc = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    dlamb_part = torch.empty(B, NT, H, K, device=k.device, dtype=torch.float32)
    u = torch.empty(B, T, H, K, device=k.device, dtype=torch.float32)
    # u holds dx until the solve
    g_end = chunk_readout_adjoint(do, k, v, g32, b32, h_kv, u, split_fp16, scan=scan, states=g_states)
    launch_chunk_cg(u, k, g32, b32, lamb32, hs, x, dc, u, dc, dlamb_part, C, cg_steps, cg_tol, bwd=True,
                    h_upper=h_upper)
    (dhe, dh_kk0), (dge, dh_kv0) = chunk_state_passes(
        [StatePass(u, x, dh_kk, -1.0), StatePass(x, do, dh_kv, 1.0)], g32, b32, C, True, split_fp16)

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dbeta = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    BK = max(16, triton.next_power_of_2(K))
    # NOTE: on an H200 (B=8 T=2048 H=16 K=V=128) V blocks of 128 / 8 warps / 2 stages took 1.07 ms,
    # 64 / 8 / 3 1.23 ms, 32 / 4 / 3 1.84 ms (benchmarks/NOTES-kernels.md, round 4)
    BV = max(16, min(128, triton.next_power_of_2(V)))
    torch.library.wrap_triton(_chunk_grad_kernel)[(NT, B * H)](
        k, v, g32, b32, x, u, do, dhe, dge, dk, dv, dbeta, T, H, K, V, NT,
        C=C, BK=BK, BV=BV, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=8 if BK >= 128 else 4, num_stages=2,
    )

    d_cum = dc - b32 * dbeta  # (B, T, H)
    final = (dh_kk * h_end).sum((-1, -2)) + (dh_kv * g_end).sum((-1, -2))  # (B, H)
    d_cum[:, -1] += final
    dg = d_cum.flip(1).cumsum(1).flip(1)
    dlamb = dlamb_part.sum((0, 1))  # (H, K)
    return (u.to(q.dtype), dk, dv, dg.to(g.dtype), dbeta.to(beta.dtype), dlamb, dh_kk0, dh_kv0)
