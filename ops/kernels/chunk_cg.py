"""Chunkwise MesaNet CG solve: one program runs the whole CG loop of one (chunk, batch, head).

Per chunk of C rows with chunk-start states H_c, G_c and within-chunk cumulative log decay b:
  M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s                       (C, C)
  A(P)    = ((P K^T) * M) K + e^b * (P H_c) + P * lamb            (C, K)   one CG matvec
  diag_t  = e^{b_t} diag(H_c) + M @ (K * K)                        Jacobi preconditioner / x0
Forward (BWD=False): solve A x = q, write q* = x, o = ((X K^T) * M) V + e^b * (X G_c), steps.
Backward (BWD=True): rhs dx = ((dO V^T) * M) K + e^b * (dO G_c^T), solve A u = dx, write u,
  dc_t = -u_t . (H_t x_t) + x_t . dx_t   (the o.do term equals x.dx), and per-chunk
  dlamb partials -sum_t u_t * x_t (reduced later on the host side: deterministic, no atomics).
CG rows (tokens) stop individually: breakdown (p.w <= 0 or non-finite) keeps that row's x;
cg_tol > 0 stops a row at ||r||^2 <= tol^2 ||r0||^2; a row with r == 0 stops. The loop exits
once no row is active, and after cg_steps iterations at most.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import mm, mm_pre, split_hi, split_lo
from .chunk_states import chunk_state_pass

# Largest (padded) key size whose K x K state tiles stay on chip (hi + lo bf16 operands: 64 KiB at
# 128; at 256 the CG kernel asks for 368 KiB of shared memory, measured on an H200 where 227 KiB fit).
RESIDENT_K_MAX = 128
# Mixed-precision CG: accurate (3-pass) true residual and CG restart every REFRESH steps.
REFRESH = 8


def chunk_len(chunk_size: int, K: int) -> int:
    """Chunk length the kernels use: at most 32 when K > RESIDENT_K_MAX (register pressure);
    the result does not depend on it beyond rounding."""
    return chunk_size if triton.next_power_of_2(K) <= RESIDENT_K_MAX else min(chunk_size, 32)


@triton.jit
def _ph_blocked(p_hi, p_lo, h_ptr, scr_ptr, K, rows, ik, km,
                BK: tl.constexpr, HB: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """P @ H_c with H_c streamed from memory in (BK, HB) column blocks (K > 128: H_c does not fit on
    chip); the blocks of the (C, BK) result meet in a per-program scratch tile."""
    tl.debug_barrier()  # earlier reads of the scratch tile are done
    for j0 in tl.static_range(0, BK, HB):
        jj = j0 + tl.arange(0, HB)
        hb = tl.load(h_ptr + ik[:, None] * K + jj[None, :], mask=km[:, None] & (jj < K)[None, :], other=0.0)
        hb_hi = split_hi(hb, SPLIT_FP16)
        wb = mm_pre(p_hi, p_lo, hb_hi, split_lo(hb, hb_hi, SPLIT_FP16), False, False)  # (C, HB)
        tl.store(scr_ptr + rows[:, None] * BK + jj[None, :], wb)
    tl.debug_barrier()
    return tl.load(scr_ptr + rows[:, None] * BK + ik[None, :])


@triton.jit
def _matvec(p, k_hi, k_lo, kt_hi, kt_lo, mdec, eb, h_hi, h_lo, lamb, h_ptr, scr_ptr, K, rows, ik, km,
            BK: tl.constexpr, HB: tl.constexpr, K_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """A(P) for the (C, BK) block P of search directions, fp32 out (3-pass split products).
    HB == BK: H_c resident on chip (h_hi, h_lo); else streamed by column blocks of HB."""
    p_hi = split_hi(p, SPLIT_FP16)
    p_lo = split_lo(p, p_hi, SPLIT_FP16)
    s = mm_pre(p_hi, p_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
    s_hi = split_hi(s, SPLIT_FP16)
    w = mm_pre(s_hi, split_lo(s, s_hi, SPLIT_FP16), k_hi, k_lo, False, K_EXACT)  # (C, BK)
    if HB == BK:
        w += eb[:, None] * mm_pre(p_hi, p_lo, h_hi, h_lo, False, False)
    else:
        w += eb[:, None] * _ph_blocked(p_hi, p_lo, h_ptr, scr_ptr, K, rows, ik, km, BK, HB, SPLIT_FP16)
    return w + p * lamb[None, :]


@triton.jit
def _matvec_fast(p, k16, kt16, mdec, eb, h16, hinv, lamb):
    """A(P) with single-pass fp16 products (mixed-precision CG iterations, H_c resident).
    Rows are independent systems, so each row of P is scaled by a power of two to max |p| ~ 1
    before the fp16 cast (fp16 has no exponent range for small residual directions) and the
    product is unscaled after; h16 holds H_c scaled by the power of two 1 / hinv."""
    pmax = tl.max(tl.abs(p), 1)  # (C,)
    sc = tl.exp2(-tl.ceil(tl.log2(tl.maximum(pmax, 1e-30))))  # (C,) power of two
    ps = (p * sc[:, None]).to(tl.float16)  # (C, BK)
    s = tl.dot(ps, kt16) * mdec  # (C, C); |s| <= sqrt(K) for unit keys
    w = tl.dot(s.to(tl.float16), k16)  # (C, BK)
    w += (eb * hinv)[:, None] * tl.dot(ps, h16)
    return w / sc[:, None] + p * lamb[None, :]


@triton.jit
def _chunk_cg_kernel(
    q_ptr,  # (B, T, H, K) rhs source (fwd)
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    lamb_ptr,  # (H, K) fp32
    hs_ptr,  # (B, NT, H, K, K) fp32 chunk-start H
    gs_ptr,  # (B, NT, H, K, V) fp32 chunk-start G
    x_ptr,  # (B, T, H, K) fp32: fwd out q*, bwd in q*
    o_ptr,  # (B, T, H, V) fwd out
    steps_ptr,  # (B, T, H) int32 fwd out
    do_ptr,  # (B, T, H, V) bwd in
    u_ptr,  # (B, T, H, K) fp32 bwd out
    dc_ptr,  # (B, T, H) fp32 bwd out
    dlamb_ptr,  # (B, NT, H, K) fp32 bwd out
    scr_ptr,  # (NT * B * H, C, BK) fp32 scratch (used when HB < BK)
    T, H, K, V, NT, cg_steps, cg_tol,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HB: tl.constexpr, BWD: tl.constexpr,
    K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
    MIXED: tl.constexpr, REFRESH: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    cg_tol = tl.cast(cg_tol, tl.float32)
    tol2 = cg_tol * cg_tol

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
    eb = tl.exp(bcum)
    causal = rows[:, None] >= rows[None, :]
    mdec = tl.where(causal, tl.exp(bcum[:, None] - bcum[None, :]), 0.0) * beta[None, :]  # (C, C)
    # padded columns get lamb = 1 so that A stays the identity there and x stays 0
    lamb = tl.load(lamb_ptr + hh * K + ik, mask=km, other=1.0).to(tl.float32)  # (BK,)

    kk = tl.load(k_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK)
    kf = kk.to(tl.float32)
    if K_EXACT:
        k_hi = split_hi(kk, SPLIT_FP16)
        k_lo = k_hi
    else:
        k_hi = split_hi(kf, SPLIT_FP16)
        k_lo = split_lo(kf, k_hi, SPLIT_FP16)
    kt_hi = tl.trans(k_hi)
    kt_lo = tl.trans(k_lo)
    scr = scr_ptr + (pid_c * tl.num_programs(1) + pid_bh).to(tl.int64) * C * BK
    if HB == BK:
        hc = tl.load(hs_ptr + hbase + ik[:, None] * K + ik[None, :], mask=km[:, None] & km[None, :],
                     other=0.0)  # (BK, BK)
        h_hi = split_hi(hc, SPLIT_FP16)
        h_lo = split_lo(hc, h_hi, SPLIT_FP16)
    else:
        h_hi = k_hi  # unused placeholders: H_c is streamed
        h_lo = k_lo
    if MIXED:
        # fp16 operands of the fast matvec; H_c scaled by a power of two into fp16's range
        k16 = kf.to(tl.float16)
        kt16 = tl.trans(k16)
        hmax = tl.max(tl.max(tl.abs(hc), 1), 0)
        hsc = tl.exp2(-tl.ceil(tl.log2(tl.maximum(hmax, 1e-30))))
        h16 = (hc * hsc).to(tl.float16)  # (BK, BK)
        hinv = 1.0 / hsc
    hdiag = tl.load(hs_ptr + hbase + ik * (K + 1), mask=km, other=0.0)  # (BK,)
    diag = eb[:, None] * hdiag[None, :] + mm(mdec, kf * kf, False, False, SPLIT_FP16)
    diag = diag + lamb[None, :]  # (C, BK)

    # right-hand side
    if BWD:
        xq = tl.load(x_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0)  # (C, BK) q*
        sdv = tl.zeros([C, C], dtype=tl.float32)
        dog = tl.zeros([C, BK], dtype=tl.float32)
        for v0 in range(0, V, BV):
            iv = v0 + tl.arange(0, BV)
            vm = iv < V
            cv = tm[:, None] & vm[None, :]
            dov = tl.load(do_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0)  # (C, BV)
            vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0)
            gsv = tl.load(gs_ptr + gbase + ik[:, None] * V + iv[None, :], mask=km[:, None] & vm[None, :],
                          other=0.0)  # (BK, BV)
            sdv += mm(dov.to(tl.float32), tl.trans(vv.to(tl.float32)), V_EXACT, V_EXACT, SPLIT_FP16)
            dog += mm(dov.to(tl.float32), tl.trans(gsv), V_EXACT, False, SPLIT_FP16)
        sdv = sdv * mdec
        sdv_hi = split_hi(sdv, SPLIT_FP16)
        rhs = mm_pre(sdv_hi, split_lo(sdv, sdv_hi, SPLIT_FP16), k_hi, k_lo, False, K_EXACT)
        rhs += eb[:, None] * dog  # (C, BK)
    else:
        rhs = tl.load(q_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0).to(tl.float32)

    # CG with Jacobi x0
    x = rhs / diag
    r = rhs - _matvec(x, k_hi, k_lo, kt_hi, kt_lo, mdec, eb, h_hi, h_lo, lamb,
                   hs_ptr + hbase, scr, K, rows, ik, km, BK, HB, K_EXACT, SPLIT_FP16)
    p = r
    d = tl.sum(r * r, 1)  # (C,)
    d0 = d
    active = tm & (d > tol2 * d0)
    steps = tl.zeros([C], dtype=tl.int32)
    it = 0
    n_active = tl.sum(active.to(tl.int32), 0)
    while (it < cg_steps) & (n_active > 0):
        if MIXED:
            w = _matvec_fast(p, k16, kt16, mdec, eb, h16, hinv, lamb)
        else:
            w = _matvec(p, k_hi, k_lo, kt_hi, kt_lo, mdec, eb, h_hi, h_lo, lamb,
                        hs_ptr + hbase, scr, K, rows, ik, km, BK, HB, K_EXACT, SPLIT_FP16)
        pw = tl.sum(p * w, 1)
        ok = active & (pw > 0) & (pw < float("inf"))
        alpha = tl.where(ok, d / tl.where(ok, pw, 1.0), 0.0)
        x = tl.where(ok[:, None], x + alpha[:, None] * p, x)
        keep_p = 1.0
        if MIXED and ((it + 1) % REFRESH == 0):
            # true residual from the accurate split matvec, then a CG restart (p = r)
            # (stopped rows never read r again: no select against the old r, one tile less live)
            if BWD:
                b_rhs = rhs
            else:
                b_rhs = tl.load(q_ptr + tok[:, None] * K + ik[None, :], mask=ck, other=0.0).to(tl.float32)
            r = b_rhs - _matvec(x, k_hi, k_lo, kt_hi, kt_lo, mdec, eb, h_hi, h_lo, lamb,
                                hs_ptr + hbase, scr, K, rows, ik, km, BK, HB, K_EXACT, SPLIT_FP16)
            keep_p = 0.0
        else:
            r = tl.where(ok[:, None], r - alpha[:, None] * w, r)
        d_new = tl.sum(r * r, 1)
        steps += ok.to(tl.int32)
        go = ok & (d_new > 0)
        if cg_tol > 0:
            go = go & (d_new > tol2 * d0)
        bcg = tl.where(go, keep_p * d_new / tl.where(go, d, 1.0), 0.0)
        p = tl.where(go[:, None], r + bcg[:, None] * p, 0.0)
        d = tl.where(go, d_new, d)
        active = go
        it += 1
        n_active = tl.sum(active.to(tl.int32), 0)

    if BWD:
        tl.store(u_ptr + tok[:, None] * K + ik[None, :], x, mask=ck)
        hx = _matvec(xq, k_hi, k_lo, kt_hi, kt_lo, mdec, eb, h_hi, h_lo, lamb,
                   hs_ptr + hbase, scr, K, rows, ik, km, BK, HB, K_EXACT, SPLIT_FP16)
        hx = hx - xq * lamb[None, :]  # H_t x_t
        dc = tl.sum(xq * rhs - x * hx, 1)
        tl.store(dc_ptr + tok, dc, mask=tm)
        dl = -tl.sum(tl.where(ck, x * xq, 0.0), 0)  # (BK,)
        tl.store(dlamb_ptr + ((bb * NT + pid_c) * H + hh) * K + ik, dl, mask=km)
    else:
        tl.store(x_ptr + tok[:, None] * K + ik[None, :], x, mask=ck)
        tl.store(steps_ptr + tok, steps, mask=tm)
        x_hi = split_hi(x, SPLIT_FP16)
        x_lo = split_lo(x, x_hi, SPLIT_FP16)
        sx = mm_pre(x_hi, x_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
        sx_hi = split_hi(sx, SPLIT_FP16)
        sx_lo = split_lo(sx, sx_hi, SPLIT_FP16)
        for v0 in range(0, V, BV):
            iv = v0 + tl.arange(0, BV)
            vm = iv < V
            cv = tm[:, None] & vm[None, :]
            vv = tl.load(v_ptr + tok[:, None] * V + iv[None, :], mask=cv, other=0.0)  # (C, BV)
            gsv = tl.load(gs_ptr + gbase + ik[:, None] * V + iv[None, :], mask=km[:, None] & vm[None, :],
                          other=0.0)  # (BK, BV)
            if V_EXACT:
                v_hi = split_hi(vv, SPLIT_FP16)
                v_lo = v_hi
            else:
                v_hi = split_hi(vv.to(tl.float32), SPLIT_FP16)
                v_lo = split_lo(vv.to(tl.float32), v_hi, SPLIT_FP16)
            g_hi = split_hi(gsv, SPLIT_FP16)
            g_lo = split_lo(gsv, g_hi, SPLIT_FP16)
            o = mm_pre(sx_hi, sx_lo, v_hi, v_lo, False, V_EXACT)
            o += eb[:, None] * mm_pre(x_hi, x_lo, g_hi, g_lo, False, False)
            tl.store(o_ptr + tok[:, None] * V + iv[None, :], o.to(o_ptr.dtype.element_ty), mask=cv)


def _use_fp16_split() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def launch_chunk_cg(q, k, v, g, beta, lamb, hs, gs, x, o, steps, do, u, dc, dlamb,
                    chunk_size: int, cg_steps: int, cg_tol: float, bwd: bool,
                    num_warps: int | None = None, mixed: bool = False, refresh: int = REFRESH) -> None:
    """Launch the CG kernel over (chunks, batch * heads); all tensors contiguous (see kernel).
    num_warps: None picks the default (8 for K > 64, else 4); benchmarks pass others.
    mixed: fp16 single-pass CG matvecs with the true residual every `refresh` steps (only with
    H_c resident, K <= RESIDENT_K_MAX); False: every matvec a 3-pass split."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    split_fp16 = _use_fp16_split()
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    HB = BK if BK <= RESIDENT_K_MAX else 64
    scr = torch.empty(NT * B * H * chunk_size * BK if HB < BK else 1, device=k.device, dtype=torch.float32)
    torch.library.wrap_triton(_chunk_cg_kernel)[(NT, B * H)](
        q, k, v, g, beta, lamb, hs, gs, x, o, steps, do, u, dc, dlamb, scr,
        T, H, K, V, NT, cg_steps, cg_tol,
        C=chunk_size, BK=BK, BV=BV, HB=HB, BWD=bwd,
        K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt, SPLIT_FP16=split_fp16,
        MIXED=mixed and HB == BK, REFRESH=refresh,
        num_warps=num_warps or (8 if BK >= 128 else 4),
        # NOTE: the mixed backward kernel with pipelined loads asked 270336 B of shared memory on an
        # H200 (232448 B allowed); unpipelined it compiles to 180224 B (sm_90a compiler report)
        num_stages=1 if (mixed and bwd) else 3,
    )


def chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              lamb: torch.Tensor, h_kk: torch.Tensor, h_kv: torch.Tensor, chunk_size: int, cg_steps: int,
              cg_tol: float, *, mixed: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunkwise MesaNet forward with Triton kernels.

    q, k: (B, T, H, K) L2-normalised; v: (B, T, H, V); g, beta: (B, T, H); lamb: (H, K) fp32;
    h_kk (B, H, K, K), h_kv (B, H, K, V): fp32 initial state.
    Returns o (B, T, H, V) in v.dtype, q* (B, T, H, K) fp32, final h_kk, h_kv (fp32),
    steps (B, T, H) int32. mixed=False runs every CG matvec as a 3-pass split (the accurate path).

    NOTE: the accurate path is the default: on an H200 (B=8 T=2048 H=16 D=128, bf16) the mixed path
    measured slower (forward 9.88 vs 8.70 ms at 30 steps, 5.56 vs 4.16 at 10) because the kernel is
    register-bound, not tensor-core-bound, and less accurate at 10 steps (1.6e-3 vs 5.1e-4 at cond ~400).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk_size = chunk_len(chunk_size, K)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g32 = g.float().contiguous()
    b32 = beta.float().contiguous()
    lamb = lamb.float().contiguous()
    split_fp16 = _use_fp16_split()
    hs, h_kk_out = chunk_state_pass(k, k, g32, b32, h_kk.float().contiguous(), chunk_size, False, 1.0,
                                    split_fp16)
    gs, h_kv_out = chunk_state_pass(k, v, g32, b32, h_kv.float().contiguous(), chunk_size, False, 1.0,
                                    split_fp16)
    x = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=q.device, dtype=v.dtype)
    steps = torch.empty(B, T, H, device=q.device, dtype=torch.int32)
    launch_chunk_cg(q, k, v, g32, b32, lamb, hs, gs, x, o, steps, o, x, g32, lamb,
                    chunk_size, cg_steps, cg_tol, bwd=False, mixed=mixed)
    return o, x, h_kk_out, h_kv_out, steps
