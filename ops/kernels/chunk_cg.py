"""Chunkwise MesaNet CG solve: one program runs the whole CG loop of one (chunk, batch, head).

Per chunk of C rows (tokens) with chunk-start state H_c and within-chunk cumulative log decay b:
  M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s                              (C, C)
  A(p)_t  = sum_s M[t, s] (k_s . p_t) k_s + e^{b_t} H_c p_t + lamb p_t    one CG matvec
  diag_t  = e^{b_t} diag(H_c) + sum_s M[t, s] k_s * k_s + lamb            Jacobi x0
Forward (BWD=False): solve A x = q, write q* = x and steps (o: chunk_readout, chunk_output.py).
Backward (BWD=True): solve A u = dx for the adjoint right-hand side dx (chunk_readout_adjoint,
  chunk_output.py), write u, dc_t = -u_t . (H_t x_t) + x_t . dx_t (the o.do term equals x.dx) and
  per-chunk dlamb partials -sum_t u_t * x_t (reduced later on the host side: deterministic, no atomics).
CG rows (tokens) stop individually: breakdown (p.w <= 0 or non-finite) keeps that row's x (a row
that stops before its first step keeps the Jacobi guess rounded to the split dtype, see below);
cg_tol > 0 stops a row at ||r||^2 <= tol^2 ||r0||^2; a row with r == 0 stops. The loop exits
once no row is active, and after cg_steps iterations at most.

NOTE (layout): every tile is held transposed, tokens along the columns: X^T, R^T (BK, C) fp32 and
the search directions P^T (BK, C), so a CG matvec is
  S^T = (K P^T) * M^T  (C, C)        W^T = e^b * (H_c P^T) + K^T S^T + lamb P^T  (BK, C)
with the loop-invariant K, K^T, H_c as the A operands (shared memory) and the BK rows as the dots' M
dimension, split across the warp groups. With tokens as M (C = 64 rows) both warp groups of 8 warps
needed their own register copies of every per-step A operand: 255 registers and 4.2 KB of spills per
thread (sm_90a compiler report). The kernel does nothing but the solve: a read-out after the loop kept
its tiles live through it and cost 1.7x in time per step (benchmarks/NOTES-kernels.md, round 4).
Where the H pass stores only H_c's tiles on or above the diagonal (h_upper), H_c P^T is computed as
top^T P_top + right P_bottom from its top rows (BK/2, BK) and right columns (BK, BK/2), the same wgmma
count. NOTE: H100, B=8 T=2048 H=16 K=V=128, the forward at 10 / 30 steps 2.251 -> 2.180 / 4.281 ->
4.218 ms with it (benchmarks/NOTES-kernels.md, round 13).
NOTE (numerics): CG with rounded search directions. P is rounded to the split dtype and the rounded
p~ is used consistently (x += alpha p~, r -= alpha A p~, alpha = r.p~ / p~.A p~, next p = r + beta p~),
so r stays the residual of x: the rounding slows convergence a little but sets no error floor.
Products with p~ are exact in one pass, so a step costs K P~ (1 pass), K^T S (2: S split) and H_c P~
(2: H_c split) instead of 7 split passes. fp64 simulation (bf16 directions, cond 369, B=1 T=384 H=4
K=128, rel. error of o vs the exact solve): 10 steps 5.7e-5 (unrounded CG 2.3e-7), 30 steps 1.8e-12
(4.8e-15). alpha = r.r / p~.A p~ instead diverged in the interpreter, whose fp16 directions underflow
once r is tiny. The Jacobi x0 is rounded to the split dtype too (one matvec for its residual; zero
steps keep it unrounded, with the residual A(x_hi) + A(x_lo)); the read-out uses 3-pass splits.
NOTE (relaxed matvecs): once every active row of a chunk has ||r|| <= CG_RELAX ||r0||, its matvecs run
one pass per product (H_c hi, S hi, keys hi: fla's cost). A matvec error E p~ enters x only through
that step's update alpha p~, and the updates shrink with the residual, so the later steps may carry
larger errors (relaxation in inexact Krylov methods): the recursive r then drifts from the true
residual by ~2^-9 ||A|| times the sum of the relaxed updates, ~2^-9 ||A|| ||x - x_k|| (the error left
when relaxing starts). fp64 simulation (benchmarks/sim_cg_precision.py, o vs the exact solve, 30 steps,
all lo passes / relaxed at 1e-3): cond ~5 4.05e-6 / 4.08e-6, cond ~350 5.70e-5 / 5.72e-5, cond ~850
1.80e-4 / 1.87e-4, with 21-23 of the 30 steps relaxed; at 1e-2 cond ~850 lost 2.6x (4.7e-4). H100,
B=8 T=2048 H=16 K=V=128 bf16 (benchmarks/NOTES-kernels.md, round 9): a step 117 us with the lo passes,
98 us without; the 30-step CG kernel 3.93 -> 3.52 ms, the 10-step one 1.60 -> 1.57 ms.
Each kind of step is compiled whole in its own branch of the loop (_cg_step, FULL a compile-time flag),
so a relaxed step runs none of the full step's code. NOTE: H200, same shape, the CG kernel at 30 / 10 steps
3.586 -> 3.424 / 1.553 -> 1.518 ms against one step body with run-time branches (benchmarks/NOTES-kernels.md,
round 15). Two loops, full steps then relaxed ones, raised an illegal memory access with triton 3.6's
ptxas 12.8; with ptxas 13.4 they ran, 18% slower (benchmarks/NOTES-kernels.md, round 17).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import chunk_tokens, mm, mm_pre, split_hi, split_lo, split_pair
from .chunk_output import chunk_readout, h_states_with_g

# Largest key size of the chunk kernels: the K x K state tile H_c stays in shared memory as a bf16
# (hi, lo) pair, 64 KiB at 128. Larger keys run the aten path (ops/library.py): a variant streaming
# H_c from memory by row blocks passed the interpreter but faulted on an H200 (illegal address inside
# the CG loop, K = 144 and 256) and was removed.
CHUNK_K_MAX = 128

# Relative residual ||r|| / ||r0|| below which a chunk's CG matvecs run one pass per product (module NOTE).
CG_RELAX = 1e-3


def check_key_size(K: int) -> None:
    """The chunk kernels' key-size limit, checked before anything is launched."""
    if K > CHUNK_K_MAX:
        raise ValueError(f"the chunk kernels take K <= {CHUNK_K_MAX}, got {K} (the mesa ops run aten there)")


def chunk_len(chunk_size: int, K: int) -> int:
    """Chunk length the kernels use: at most 32 at K > 64. The result does not depend on it beyond
    rounding. NOTE: on an H200 (B=8 T=2048 H=16 K=V=128, bf16, 30 CG steps) the CG kernel took
    7.2 ms at C = 32 / 4 warps against 9.1 ms at C = 64 / 8 warps (benchmarks/NOTES-kernels.md)."""
    return chunk_size if K <= 64 else min(chunk_size, 32)


@triton.jit
def _add_pair(a0, b0, a1, b1):
    """Combine function of a sum over two tensors at once (one cross-warp exchange for both)."""
    return a0 + a1, b0 + b1


@triton.jit
def _state_pair(h_ptr, offs, mask, KK):
    """The (hi, lo) entries at offs of a state stored as its hi then its lo part (KK entries each)."""
    return tl.load(h_ptr + offs, mask=mask, other=0.0), tl.load(h_ptr + KK + offs, mask=mask, other=0.0)


@triton.jit
def _h_product(pt, ha_hi, ha_lo, hb_hi, hb_lo, full, HALVES: tl.constexpr, BK: tl.constexpr, C: tl.constexpr):
    """H_c P^T (BK, C) fp32, with the lo pass of H_c when full. HALVES: H_c given as its top rows ha (BK/2,
    BK) and right columns hb (BK, BK/2), H_c P^T = ha^T P_top + hb P_bottom (H_c symmetric); else ha is
    H_c (BK, BK)."""
    if HALVES:
        p_top, p_bottom = tl.split(tl.permute(tl.reshape(pt, (2, BK // 2, C)), (1, 2, 0)))
        w = tl.zeros([BK, C], dtype=tl.float32)
        if full:
            w = tl.dot(tl.trans(ha_lo), p_top, w)
            w = tl.dot(hb_lo, p_bottom, w)
        w = tl.dot(tl.trans(ha_hi), p_top, w)
        w = tl.dot(hb_hi, p_bottom, w)
    elif full:
        w = mm_pre(ha_hi, ha_lo, pt, pt, False, True)
    else:
        w = tl.dot(ha_hi, pt)
    return w


@triton.jit
def _matvec(pt, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb, ha_hi, ha_lo, hb_hi, hb_lo, lamb, full,
            K_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr, HALVES: tl.constexpr, BK: tl.constexpr,
            C: tl.constexpr):
    """A(P)^T (BK, C) fp32 for directions P^T (BK, C) given in the split dtype (exact there). full: with
    the lo passes of H_c, S and inexact keys; otherwise one pass per product (module NOTE, relaxed).
    H_c as _h_product takes it."""
    if full:
        st = mm_pre(k_hi, k_lo, pt, pt, K_EXACT, True)
    else:
        st = tl.dot(k_hi, pt)
    w = _h_product(pt, ha_hi, ha_lo, hb_hi, hb_lo, full, HALVES, BK, C)
    st = st * mdec_t  # (C, C) S^T
    st_hi = split_hi(st, SPLIT_FP16)
    if full:
        w = mm_pre(kt_hi, kt_lo, st_hi, split_lo(st, st_hi, SPLIT_FP16), K_EXACT, False, w * eb[None, :])
    else:
        w = tl.dot(kt_hi, st_hi, w * eb[None, :])
    return w + lamb[:, None] * pt.to(tl.float32)


@triton.jit
def _any_above(active, d, bound):
    """Whether some active row's squared residual d is above bound (C,)."""
    return tl.sum((active & (d > bound)).to(tl.int32), 0) > 0


@triton.jit
def _cg_step(x, r, pt, d, d0, active, steps, tol2, cg_tol, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb, ha_hi, ha_lo,
             hb_hi, hb_lo, lamb, FULL: tl.constexpr, K_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
             HALVES: tl.constexpr, BK: tl.constexpr, C: tl.constexpr):
    """One CG step of the active rows (module docstring), with the lo passes (FULL) or relaxed; returns the
    new (x, r, p~, d, active, steps, number of active rows)."""
    w = _matvec(pt, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb, ha_hi, ha_lo, hb_hi, hb_lo, lamb, FULL, K_EXACT,
                SPLIT_FP16, HALVES, BK, C)
    pf = pt.to(tl.float32)
    # p~.A p~ and r.p~ in one cross-warp reduction (r.p~ does not wait for the matvec)
    pw, rp = tl.reduce((pf * w, r * pf), 0, _add_pair)
    ok = active & (pw > 0) & (pw < float("inf"))
    # exact line search along p~ (r.p~, not r.r: p~ is not p) keeps each step an energy descent
    alpha = tl.where(ok, tl.fdiv(rp, tl.where(ok, pw, 1.0)), 0.0)  # 2-ulp division: x, r share it
    # alpha = 0 leaves x unchanged (p~ is finite); w of a broken-down row may not be finite
    x = x + alpha[None, :] * pf
    r = tl.where(ok[None, :], r - alpha[None, :] * w, r)
    d_new = tl.sum(r * r, 0)
    steps += ok.to(tl.int32)
    go = ok & (d_new > 0)
    if cg_tol > 0:
        go = go & (d_new > tol2 * d0)
    bcg = tl.where(go, tl.fdiv(d_new, tl.where(go, d, 1.0)), 0.0)
    # a stopped row never steps again (active = False): its finite p = r is left unused
    pt = split_hi(r + bcg[None, :] * pf, SPLIT_FP16)
    d = tl.where(go, d_new, d)
    return x, r, pt, d, go, steps, tl.sum(go.to(tl.int32), 0)


@triton.jit
def _chunk_cg_kernel(
    rhs_ptr,  # (B, T, H, K) right-hand side: q (fwd), dx fp32 (bwd)
    k_ptr,  # (B, T, H, K)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    lamb_ptr,  # (H, K) fp32
    hs_ptr,  # (B, NT, H, 2, K, K) chunk-start H as (hi, lo) in the split dtype (HALVES: upper tiles only)
    x_ptr,  # (B, T, H, K) fp32: fwd out q*, bwd in q*
    steps_ptr,  # (B, T, H) int32 fwd out
    u_ptr,  # (B, T, H, K) fp32 bwd out
    dc_ptr,  # (B, T, H) fp32 bwd out
    dlamb_ptr,  # (B, NT, H, K) fp32 bwd out
    T, H, K, NT, cg_steps, cg_tol,
    C: tl.constexpr, BK: tl.constexpr, BWD: tl.constexpr, K_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
    RELAX: tl.constexpr, HALVES: tl.constexpr,
):
    pid_c, bb, hh, cols, tm, tok = chunk_tokens(T, H, C)
    cg_tol = tl.cast(cg_tol, tl.float32)
    tol2 = cg_tol * cg_tol
    ik = tl.arange(0, BK)
    km = ik < K
    kc = km[:, None] & tm[None, :]  # (BK, C)
    hbase = ((bb * NT + pid_c) * H + hh) * 2 * K * K

    g = tl.load(g_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + tok, mask=tm, other=0.0).to(tl.float32)
    bcum = tl.cumsum(g, 0)  # (C,)
    eb = tl.exp(bcum)
    causal_t = cols[:, None] <= cols[None, :]  # [s, t]: s <= t
    mdec_t = tl.where(causal_t, tl.exp(bcum[None, :] - bcum[:, None]), 0.0) * beta[:, None]  # (C, C) M^T
    # padded key rows get lamb = 1 so that A stays the identity there and x stays 0
    lamb = tl.load(lamb_ptr + hh * K + ik, mask=km, other=1.0).to(tl.float32)  # (BK,)

    kk = tl.load(k_ptr + tok[:, None] * K + ik[None, :], mask=tm[:, None] & km[None, :], other=0.0)  # (C, BK)
    kf = kk.to(tl.float32)
    k_hi, k_lo = split_pair(kk, K_EXACT, SPLIT_FP16)
    kt_hi = tl.trans(k_hi)
    kt_lo = tl.trans(k_lo)
    # loaded in the split dtype and fed to the dots as loaded: the tiles stay in shared memory. HALVES:
    # stored as its tiles on or above the diagonal in two tile rows, H_c is read as its top rows and right
    # columns, both stored (a gathered load of the whole tile from the stored entries cost 0.87 ms more per
    # CG launch at B=8 T=2048 H=16: benchmarks/NOTES-kernels.md, round 13)
    h_ptr = hs_ptr + hbase
    if HALVES:
        ih = tl.arange(0, BK // 2)
        # top rows (BK/2, BK) and right columns (BK, BK/2)
        ha_hi, ha_lo = _state_pair(h_ptr, ih[:, None] * K + ik[None, :], (ih < K)[:, None] & km[None, :],
                                   K * K)
        hb_hi, hb_lo = _state_pair(h_ptr, ik[:, None] * K + (BK // 2 + ih)[None, :],
                                   km[:, None] & (BK // 2 + ih < K)[None, :], K * K)
    else:
        ha_hi, ha_lo = _state_pair(h_ptr, ik[:, None] * K + ik[None, :], km[:, None] & km[None, :], K * K)
        hb_hi, hb_lo = ha_hi, ha_lo
    d_hi, d_lo = _state_pair(h_ptr, ik * (K + 1), km, K * K)
    hdiag = d_hi.to(tl.float32) + d_lo.to(tl.float32)  # (BK,)
    diag = mm(tl.trans(kf * kf), mdec_t, False, False, SPLIT_FP16) + hdiag[:, None] * eb[None, :]
    diag = diag + lamb[:, None]  # (BK, C)

    rhs = tl.load(rhs_ptr + tok[None, :] * K + ik[:, None], mask=kc, other=0.0).to(tl.float32)  # (BK, C)

    # CG from the Jacobi guess rounded to the split dtype: its residual then costs one matvec instead of
    # two (the products with a split-dtype tile are exact), and CG corrects the rounding like any error
    # of x0. Zero steps keep the unrounded guess, as the reference and the decode kernel do.
    x = rhs / diag
    x_hi = split_hi(x, SPLIT_FP16)
    r = rhs - _matvec(x_hi, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb, ha_hi, ha_lo, hb_hi, hb_lo, lamb, True,
                      K_EXACT, SPLIT_FP16, HALVES, BK, C)
    if cg_steps > 0:
        x = x_hi.to(tl.float32)
    else:
        x_lo = split_lo(x, x_hi, SPLIT_FP16)
        r = r - _matvec(x_lo, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb, ha_hi, ha_lo, hb_hi, hb_lo, lamb, True,
                        K_EXACT, SPLIT_FP16, HALVES, BK, C)
    pt = split_hi(r, SPLIT_FP16)
    d = tl.sum(r * r, 0)  # (C,)
    d0 = d
    active = tm & (d > tol2 * d0)
    steps = tl.zeros([C], dtype=tl.int32)
    it = 0
    n_active = tl.sum(active.to(tl.int32), 0)
    # the lo passes while some active row's residual is above RELAX of its initial one (module NOTE); the
    # two calls differ only in FULL, a compile-time flag, so that each kind of step is compiled whole
    while (it < cg_steps) & (n_active > 0):
        if _any_above(active, d, RELAX * RELAX * d0):
            x, r, pt, d, active, steps, n_active = _cg_step(
                x, r, pt, d, d0, active, steps, tol2, cg_tol, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb,
                ha_hi, ha_lo, hb_hi, hb_lo, lamb, True, K_EXACT, SPLIT_FP16, HALVES, BK, C)
        else:
            x, r, pt, d, active, steps, n_active = _cg_step(
                x, r, pt, d, d0, active, steps, tol2, cg_tol, k_hi, k_lo, kt_hi, kt_lo, mdec_t, eb,
                ha_hi, ha_lo, hb_hi, hb_lo, lamb, False, K_EXACT, SPLIT_FP16, HALVES, BK, C)
        it += 1

    if BWD:
        tl.store(u_ptr + tok[None, :] * K + ik[:, None], x, mask=kc)
        xq = tl.load(x_ptr + tok[None, :] * K + ik[:, None], mask=kc, other=0.0)  # (BK, C) q*^T
        # H_t symmetric and r = dx - A u (CG keeps r the residual of its x = u):
        # -u.(H x) + x.dx = -x.(H u) + x.dx = x.(r + lamb u), with no matvec after the loop
        dc = tl.sum(xq * (r + lamb[:, None] * x), 0)
        tl.store(dc_ptr + tok, dc, mask=tm)
        dl = -tl.sum(tl.where(kc, x * xq, 0.0), 1)  # (BK,)
        tl.store(dlamb_ptr + ((bb * NT + pid_c) * H + hh) * K + ik, dl, mask=km)
    else:
        tl.store(x_ptr + tok[None, :] * K + ik[:, None], x, mask=kc)
        tl.store(steps_ptr + tok, steps, mask=tm)


def _use_fp16_split() -> bool:
    from triton import knobs

    return bool(knobs.runtime.interpret)


def launch_chunk_cg(rhs, k, g, beta, lamb, hs, x, steps, u, dc, dlamb,
                    chunk_size: int, cg_steps: int, cg_tol: float, bwd: bool,
                    num_warps: int | None = None, relax: float = CG_RELAX,
                    h_upper: bool = False) -> None:
    """Launch the CG kernel over (chunks, batch * heads); all tensors contiguous (see kernel; the
    outputs of the other direction are not touched). num_warps: None picks the default (8 for
    64-row chunks of K > 64, else 4); relax: residual ratio below which a chunk's matvecs drop their
    lo passes (0: never). Benchmarks pass others. h_upper: hs holds only the tiles on or above the
    diagonal, in two tile rows (h_states_with_g); the kernel then reads H_c as its top rows and right
    columns, which suit a whole hs too."""
    B, T, H, K = k.shape
    NT = triton.cdiv(T, chunk_size)
    split_fp16 = _use_fp16_split()
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    BK = max(16, triton.next_power_of_2(K))
    torch.library.wrap_triton(_chunk_cg_kernel)[(NT, B * H)](
        rhs, k, g, beta, lamb, hs, x, steps, u, dc, dlamb,
        T, H, K, NT, cg_steps, cg_tol,
        C=chunk_size, BK=BK, BWD=bwd, K_EXACT=k.dtype == split_dt, SPLIT_FP16=split_fp16, RELAX=relax,
        HALVES=h_upper,
        num_warps=num_warps or (8 if BK >= 128 and chunk_size >= 64 else 4),
    )


def chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              lamb: torch.Tensor, h_kk: torch.Tensor, h_kv: torch.Tensor, chunk_size: int, cg_steps: int,
              cg_tol: float, *, out_dtype: torch.dtype | None = None, relax: float = CG_RELAX
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunkwise MesaNet forward with Triton kernels.

    q, k: (B, T, H, K) L2-normalised, K <= CHUNK_K_MAX; v: (B, T, H, V); g, beta: (B, T, H);
    lamb: (H, K) fp32; h_kk (B, H, K, K), h_kv (B, H, K, V): fp32 initial state.
    Returns o (B, T, H, V) in out_dtype (default v.dtype), q* (B, T, H, K) fp32, final h_kk, h_kv
    (fp32), steps (B, T, H) int32. o is computed in fp32; out_dtype=torch.float32 keeps it unrounded.
    relax: residual ratio below which the CG matvecs drop their lo passes (module NOTE; 0: never).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    check_key_size(K)
    chunk_size = chunk_len(chunk_size, K)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    g32 = g.float().contiguous()
    b32 = beta.float().contiguous()
    lamb = lamb.float().contiguous()
    split_fp16 = _use_fp16_split()
    # the read-out reads G_c from states that the H pass's launch also writes
    h_kv = h_kv.float().contiguous()
    hs, h_upper, h_kk_out, g_states = h_states_with_g(k, v, g32, b32, h_kk.float().contiguous(), h_kv,
                                                     chunk_size, split_fp16, with_g=True)
    x = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    o = torch.empty(B, T, H, V, device=q.device, dtype=out_dtype or v.dtype)
    steps = torch.empty(B, T, H, device=q.device, dtype=torch.int32)
    launch_chunk_cg(q, k, g32, b32, lamb, hs, x, steps, x, g32, lamb, chunk_size, cg_steps, cg_tol, bwd=False,
                    relax=relax, h_upper=h_upper)
    h_kv_out = chunk_readout(x, k, v, g32, b32, h_kv, o, split_fp16, states=g_states)
    return o, x, h_kk_out, h_kv_out, steps
