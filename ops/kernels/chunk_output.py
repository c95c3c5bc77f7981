"""Chunkwise MesaNet read-out o_t = G_t^T q*_t and its adjoint, by a G state scan or from stored G_c.

Per chunk of C rows with within-chunk cumulative log decay b, M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s
and the chunk-start state G_c:
  read-out  o  = ((X K^T) * M) V + e^b * (X G_c)
  adjoint   dX = ((dO V^T) * M) K + e^b * (dO G_c^T)   (the right-hand side of the adjoint CG solve)
  state     G_{c+1} = e^{b_L} G_c + (K * w)^T V,  w_s = e^{b_L - b_s} beta_s
Two ways to get G_c, one kernel each for the read-out and the adjoint (constexpr SCAN):
- scan: a program owns one block of G (read-out: all K rows x a block of V columns; adjoint: a block
  of K rows x all V columns, so that each contraction is whole inside it), keeps it in fp32 registers
  and walks the chunks in order, writing o (dX) chunk by chunk and the final G at the end. G_c never
  goes to memory.
- from states: a G state pass (chunk_states.py) writes every G_c as a (hi, lo) pair, then one program
  per (block, chunk) runs the same per-chunk products, with all of K (adjoint) or blocks of 128 V
  columns (read-out): G_c comes from shared memory, so a block is not bound by registers. The forward
  and backward run the G pass in the same launch as their H pass (chunk_state_passes).
NOTE: the scan has only 2 programs per (batch, head) at K = V = 128, each walking all T / 32 chunks.
H100, ms, at chunk 32 / 64 (READOUT_CHUNKS); read-out: scan against G pass paired with the H pass +
kernel from states (the H pass alone subtracted): B=8 T=2048 H=16 0.48 against 0.20 + 0.25, B=16
T=2048 H=16 0.96 against 0.37 + 0.47, B=1 T=8192 H=4 1.47 against ~0 + 0.04 (benchmarks/NOTES-kernels.md,
round 12): the read-out runs from states at every shape measured. The adjoint scan still wins from
B x H = 96 at K = V = 128 (adjoint_scans). At one chunk length the state pass's update is the scan's,
term for term: on the GPU, o and the read-out's final G came out bit-identical by both ways; dX and
the adjoint's final G agree up to the fp32 order of the dots.
Products are split like every product of the chunk kernels (chunk_common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import fills_device, mm, mm_pre, split_pair
from .chunk_states import StatePass, chunk_state_passes, state_tiles

# Chunk lengths of the read-outs by path, independent of the CG's chunks. NOTE: H100, triton 3.6, ms at
# chunk 32 / 64 (V blocks of 64, 4 warps): scan (B=8 T=2048 H=16) read-out 0.535 / 0.772, adjoint 0.327 /
# 0.311; from states (B=1 T=8192 H=4, G state pass included) read-out 0.415 / 0.264, adjoint 0.404 / 0.253
# (benchmarks/NOTES-kernels.md, round 11)
READOUT_CHUNKS = {"scan": 32, "states": 64}


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
def _chunk_walk(s_ptr, tile, kv_mask, T, C: tl.constexpr, SCAN: tl.constexpr):
    """The chunks a program walks, [first, end), and the G block it starts from: for a scan all chunks
    from the initial G at s_ptr + tile; otherwise its own chunk (grid axis 2), G_c read per chunk."""
    if SCAN:
        return tl.load(s_ptr + tile, mask=kv_mask, other=0.0), 0, tl.cdiv(T, C)
    else:
        return 0.0, tl.program_id(2), tl.program_id(2) + 1


@triton.jit
def _readout_chunk(x_hi, x_lo, kt_hi, kt_lo, v_hi, v_lo, mdec, bcum, g_a, g_b, G_SPLIT: tl.constexpr,
                   K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """o (C, BV) fp32 of one chunk: ((X K^T) * M) V + e^b * (X G_c), from split tiles; G_c given as its
    (hi, lo) pair (g_a, g_b) when G_SPLIT, else as fp32 g_a."""
    s = mm_pre(x_hi, x_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
    s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
    if G_SPLIT:
        st_hi = g_a
        st_lo = g_b
    else:
        st_hi, st_lo = split_pair(g_a, False, SPLIT_FP16)
    o = mm_pre(x_hi, x_lo, st_hi, st_lo, False, False) * tl.exp(bcum)[:, None]
    return mm_pre(s_hi, s_lo, v_hi, v_lo, False, V_EXACT, o)


@triton.jit
def _adjoint_chunk(dov, vv, k_hi, k_lo, mdec, bcum, g_a, g_b, G_SPLIT: tl.constexpr,
                   K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """dX (C, BK) fp32 of one chunk: ((dO V^T) * M) K + e^b * (dO G_c^T); G_c^T given as its (hi, lo)
    pair (g_a, g_b) when G_SPLIT, else G_c as fp32 g_a."""
    s = mm(dov.to(tl.float32), tl.trans(vv.to(tl.float32)), V_EXACT, V_EXACT, SPLIT_FP16) * mdec  # (C, C)
    s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
    if G_SPLIT:
        do_hi, do_lo = split_pair(dov, V_EXACT, SPLIT_FP16)
        dog = mm_pre(do_hi, do_lo, g_a, g_b, V_EXACT, False)  # (C, BK) dO G_c^T
    else:
        dog = mm(dov.to(tl.float32), tl.trans(g_a), V_EXACT, False, SPLIT_FP16)
    return mm_pre(s_hi, s_lo, k_hi, k_lo, False, K_EXACT, dog * tl.exp(bcum)[:, None])


@triton.jit
def _readout_kernel(
    x_ptr,  # (B, T, H, K) fp32 q*
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s_ptr,  # SCAN: (B, H, K, V) fp32 initial G; else (B, NT, H, 2, K, V) chunk-start G as (hi, lo)
    o_ptr,  # (B, T, H, V) out
    sfin_ptr,  # (B, H, K, V) fp32 out (SCAN): final G
    T, H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCAN: tl.constexpr,
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
    state, c_first, c_end = _chunk_walk(s_ptr, tile, kv_mask, T, C, SCAN)  # state: (BK, BV) G_c
    for c in range(c_first, c_end):
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
        if SCAN:
            o = _readout_chunk(x_hi, x_lo, kt_hi, kt_lo, v_hi, v_lo, mdec, bcum, state, state, False,
                               K_EXACT, V_EXACT, SPLIT_FP16)  # (C, BV)
        else:
            pair = ((bb * tl.cdiv(T, C) + c) * H + hh) * 2 * K * V + ik[:, None] * V + iv[None, :]
            o = _readout_chunk(x_hi, x_lo, kt_hi, kt_lo, v_hi, v_lo, mdec, bcum,
                               tl.load(s_ptr + pair, mask=kv_mask, other=0.0),
                               tl.load(s_ptr + pair + K * V, mask=kv_mask, other=0.0), True,
                               K_EXACT, V_EXACT, SPLIT_FP16)
        tl.store(o_ptr + tok[:, None] * V + iv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])
        if SCAN:
            kw_hi, kw_lo = split_pair(kt.to(tl.float32) * w[None, :], False, SPLIT_FP16)  # (BK, C) (K * w)^T
            state = e_last * state + mm_pre(kw_hi, kw_lo, v_hi, v_lo, False, V_EXACT)
    if SCAN:
        tl.store(sfin_ptr + tile, state, mask=kv_mask)


@triton.jit
def _readout_adjoint_kernel(
    do_ptr,  # (B, T, H, V) in v's dtype
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s_ptr,  # SCAN: (B, H, K, V) fp32 initial G; else (B, NT, H, 2, K, V) chunk-start G as (hi, lo)
    dx_ptr,  # (B, T, H, K) fp32 out
    sfin_ptr,  # (B, H, K, V) fp32 out (SCAN): final G
    T, H, K, V,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, SCAN: tl.constexpr,
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
    state, c_first, c_end = _chunk_walk(s_ptr, tile, kv_mask, T, C, SCAN)  # state: (BK, BV) rows ik of G_c
    for c in range(c_first, c_end):
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
        if SCAN:
            dx = _adjoint_chunk(dov, vv, k_hi, k_lo, mdec, bcum, state, state, False,
                                K_EXACT, V_EXACT, SPLIT_FP16)
        else:
            # G_c^T (BV, BK)
            pair = ((bb * tl.cdiv(T, C) + c) * H + hh) * 2 * K * V + ik[None, :] * V + iv[:, None]
            vk_mask = vm[:, None] & km[None, :]
            dx = _adjoint_chunk(dov, vv, k_hi, k_lo, mdec, bcum,
                                tl.load(s_ptr + pair, mask=vk_mask, other=0.0),
                                tl.load(s_ptr + pair + K * V, mask=vk_mask, other=0.0), True,
                                K_EXACT, V_EXACT, SPLIT_FP16)
        tl.store(dx_ptr + tok[:, None] * K + ik[None, :], dx, mask=tm[:, None] & km[None, :])
        if SCAN:
            kw = tl.trans(kk.to(tl.float32) * w[:, None])  # (BK, C)
            state = e_last * state + mm(kw, vv.to(tl.float32), False, V_EXACT, SPLIT_FP16)
    if SCAN:
        tl.store(sfin_ptr + tile, state, mask=kv_mask)


def _launch(kernel, ins, out: torch.Tensor, blocks: int, states: tuple[torch.Tensor, torch.Tensor] | None,
            h_kv: torch.Tensor, BK: int, BV: int, split_fp16: bool) -> torch.Tensor:
    """Run a read-out kernel as a scan from the initial G h_kv (states None) or from chunk-start states
    (states: (stored G_c at READOUT_CHUNKS["states"], final G) of a G state pass); returns the final G."""
    k, v = ins[1:3]
    B, T, H, K = k.shape
    V = v.shape[-1]
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    scan = states is None
    C = READOUT_CHUNKS["scan" if scan else "states"]
    if scan:
        s_in = h_kv
        s_fin = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
        grid = (blocks, B * H)
    else:
        s_in, s_fin = states
        grid = (blocks, B * H, triton.cdiv(T, C))
    torch.library.wrap_triton(kernel)[grid](
        *ins, s_in, out, s_fin, T, H, K, V,
        C=C, BK=BK, BV=BV, SCAN=scan, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=4, num_stages=1,
    )
    return s_fin


def adjoint_scans(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the adjoint read-out scans G rather than reading G_c from states: when the scan's programs
    give each streaming multiprocessor at least 1.2. NOTE: H100, K=V=128, ms, H pass + adjoint scan
    against H + G paired pass + adjoint from states: B x H = 32 (T=4096) 0.74 / 0.41, 64 0.85 / 0.75, 96
    1.09 / 1.21, 128 (T=2048) 0.61 / 0.74, 256 1.17 / 1.44 (benchmarks/NOTES-kernels.md, round 12)."""
    B, T, H, K = k.shape
    return fills_device(triton.cdiv(K, _adjoint_scan_block_k(K, v.shape[-1])) * B * H, k.device, 1.2)


def readout_state_pass(k: torch.Tensor, v: torch.Tensor, h_kv: torch.Tensor, chunk_size: int = 0
                       ) -> StatePass:
    """The G state pass that the read-outs from states read: at READOUT_CHUNKS["states"], or at
    chunk_size storing every n-th state (to run in one launch with another pass at chunk_size)."""
    every = READOUT_CHUNKS["states"] // chunk_size if chunk_size else 1
    return StatePass(k, v, h_kv, 1.0, every)


def h_states_with_g(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, h_kk: torch.Tensor,
                    h_kv: torch.Tensor, chunk_size: int, split_fp16: bool, with_g: bool
                    ) -> tuple[torch.Tensor, bool, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The H state pass at chunk_size: stored H_c, whether only its tiles on or above the diagonal are
    stored (StatePass.upper: where the state tiles are half the CG's key block; launch_chunk_cg's
    h_upper), final H; and, when with_g and chunk_size divides the read-outs' chunk, the read-out's G
    states from the same launch (else None: the read-out runs its own G pass or scans)."""
    passes = [StatePass(k, k, h_kk)]
    if with_g and READOUT_CHUNKS["states"] % chunk_size == 0:
        passes.append(readout_state_pass(k, v, h_kv, chunk_size))
    half = max(16, triton.next_power_of_2(k.shape[-1])) // 2
    upper = state_tiles(passes, False) == (half, half)
    passes[0] = passes[0]._replace(upper=upper)
    (hs, h_fin), *g_states = chunk_state_passes(passes, g, beta, chunk_size, False, split_fp16)
    return hs, upper, h_fin, (g_states[0] if g_states else None)


def _g_states(k, v, g, beta, h_kv, split_fp16, scan, states):
    """(stored G_c, final G) for a read-out from states (the given ones, or a G state pass run here), or
    None for a scan."""
    if scan:
        return None
    if states is None:
        C = READOUT_CHUNKS["states"]
        states = chunk_state_passes([readout_state_pass(k, v, h_kv)], g, beta, C, False, split_fp16)[0]
    return states


def chunk_readout(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  h_kv: torch.Tensor, o: torch.Tensor, split_fp16: bool, scan: bool = False,
                  states: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Write o (B, T, H, V) from q* x (B, T, H, K) fp32 and the initial G h_kv (B, H, K, V) fp32; returns
    the final G (B, H, K, V) fp32. k, v contiguous; g, beta (B, T, H) fp32 contiguous. Reads G_c from
    states: the result of readout_state_pass's pass run by the caller (chunk_cg.chunk_fwd runs it with
    the H pass), else a G state pass run here. scan=True scans G instead: slower at every shape measured
    (module NOTE), kept as the independent check of the path from states (tests, benchmarks)."""
    states = _g_states(k, v, g, beta, h_kv, split_fp16, scan, states)
    BK = max(16, triton.next_power_of_2(k.shape[-1]))
    BVF = max(16, triton.next_power_of_2(v.shape[-1]))
    # NOTE: H100, B=8 T=2048 H=16 K=V=128: scan V blocks of 64 / 4 warps / 1 stage 0.48 ms; 64/4/2 0.57,
    # 64/8/2 0.67, 32/4/2 0.70 (benchmarks/NOTES-kernels.md, round 5); from states at chunk 64 (kernel
    # alone) 128 / 4 warps 0.25 ms, 64/4 0.33, 128/8 0.33, 32/4 0.37 (round 12)
    BV = min(64 if states is None else 128, BVF)
    return _launch(_readout_kernel, (x, k, v, g, beta), o, triton.cdiv(v.shape[-1], BV), states, h_kv, BK, BV,
                   split_fp16)


def _adjoint_scan_block_k(K: int, V: int) -> int:
    # a block of K rows x all V columns of G stays within 64 fp32 registers per thread at 4 warps.
    # NOTE: H100, K=V=128 (scan): K blocks of 64 / 4 warps 0.33 ms (1 or 2 stages), 64 / 8 / 2 0.48,
    # 32 / 4 / 2 0.40 (benchmarks/NOTES-kernels.md, round 5)
    return max(16, min(triton.next_power_of_2(K), 8192 // max(16, triton.next_power_of_2(V))))


def chunk_readout_adjoint(do: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, h_kv: torch.Tensor, dx: torch.Tensor, split_fp16: bool,
                          scan: bool | None = None, states: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> torch.Tensor:
    """Write dx (B, T, H, K) fp32, the adjoint of the read-out applied to do (B, T, H, V) (in v's
    dtype), from the initial G h_kv; returns the final G. scan: True scans G, False reads G_c from
    states (given, or a G state pass run here), None picks by adjoint_scans; other arguments as for
    chunk_readout."""
    if scan is None:
        scan = states is None and adjoint_scans(k, v)
    states = _g_states(k, v, g, beta, h_kv, split_fp16, scan, states)
    K, BV = k.shape[-1], max(16, triton.next_power_of_2(v.shape[-1]))
    # from states the G_c^T tile comes from shared memory, not registers: whole K up to 64 KiB of (hi, lo).
    # NOTE: H100, B=8 T=2048 H=16 K=V=128, kernel alone at chunk 64: K blocks of 128 / 4 warps 0.23 ms,
    # 64/4 0.27, 128/8 0.31, 32/4 0.30 (benchmarks/NOTES-kernels.md, round 12)
    BK = (_adjoint_scan_block_k(K, BV) if states is None
          else max(16, min(triton.next_power_of_2(K), 16384 // BV)))
    return _launch(_readout_adjoint_kernel, (do, k, v, g, beta), dx, triton.cdiv(K, BK), states, h_kv,
                   BK, BV, split_fp16)
