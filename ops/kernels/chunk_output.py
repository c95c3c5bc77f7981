"""Chunkwise MesaNet read-out o_t = G_t^T q*_t and its adjoint, by G state scans over segments of chunks.

Per chunk of C rows with within-chunk cumulative log decay b, M[t, s] = 1[t >= s] e^{b_t - b_s} beta_s
and the chunk-start state G_c:
  read-out  o  = ((X K^T) * M) V + e^b * (X G_c)
  adjoint   dX = ((dO V^T) * M) K + e^b * (dO G_c^T)   (the right-hand side of the adjoint CG solve)
  state     G_{c+1} = e^{b_L} G_c + (K * w)^T V,  w_s = e^{b_L - b_s} beta_s
One kernel each for the read-out and the adjoint. A program owns one block of G (read-out: all K rows
x a block of V columns; adjoint: a block of K rows x all V columns, so that each contraction is whole
inside it), keeps it in fp32 registers and walks a segment of `seg` consecutive chunks in order,
writing o (dX) chunk by chunk. With one segment (seg >= NT) it starts from the initial G and writes the
final G at the end; otherwise a G state pass (chunk_states.py) first writes G at every segment start as
a (hi, lo) pair and returns the final G. seg = 1 is a chunk-parallel read-out from every G_c.
NOTE: one segment leaves 2 programs per (batch, head) at K = V = 128, each walking all T / 32 chunks:
too few where B x H is small (round 6: B=1 T=8192 H=4 read-out 1.48 ms as a scan against 0.42 from
every G_c; B=8 T=2048 H=16 0.49 against 0.69). Segments trade the scan's serial chain against the
state pass's G traffic (benchmarks/NOTES-kernels.md, round 10). The state pass's update is the scan's,
term for term, so every segment length gives the same o up to the fp32 order of the dots.
Products are split like every product of the chunk kernels (chunk_common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import fills_device, mm, mm_pre, split_pair
from .chunk_states import chunk_state_pass

# Read-out programs per streaming multiprocessor that segments of chunks aim for (readout_segment).
READOUT_PROGRAMS_PER_SM = 4

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
def _segment_start(s_ptr, bb, hh, local, kv_mask, T, H, K, V, NS, seg, C: tl.constexpr,
                   FROM_STATES: tl.constexpr):
    """The chunks a program walks, [first, end) (its segment, grid axis 2), the end of its G updates
    and the fp32 G block (rows and columns `local` of a K x V state) it starts from: the initial G (one
    segment, which scans on to the final G) or its segment's start state from a state pass."""
    s_idx = tl.program_id(2)
    first = s_idx * seg
    end = tl.minimum(first + seg, tl.cdiv(T, C))
    if FROM_STATES:
        pair = s_ptr + ((bb * NS + s_idx) * H + hh) * 2 * K * V + local
        state = (tl.load(pair, mask=kv_mask, other=0.0).to(tl.float32)
                 + tl.load(pair + K * V, mask=kv_mask, other=0.0).to(tl.float32))
        update_end = end - 1  # the next segment starts from the state pass's G
    else:
        state = tl.load(s_ptr + (bb * H + hh) * K * V + local, mask=kv_mask, other=0.0)
        update_end = end
    return state, first, end, update_end


@triton.jit
def _readout_chunk(x_hi, x_lo, kt_hi, kt_lo, v_hi, v_lo, mdec, bcum, state,
                   K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """o (C, BV) fp32 of one chunk: ((X K^T) * M) V + e^b * (X G_c), from split tiles and fp32 G_c."""
    s = mm_pre(x_hi, x_lo, kt_hi, kt_lo, False, K_EXACT) * mdec  # (C, C)
    s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
    st_hi, st_lo = split_pair(state, False, SPLIT_FP16)
    o = mm_pre(x_hi, x_lo, st_hi, st_lo, False, False) * tl.exp(bcum)[:, None]
    return mm_pre(s_hi, s_lo, v_hi, v_lo, False, V_EXACT, o)


@triton.jit
def _adjoint_chunk(dov, vv, k_hi, k_lo, mdec, bcum, state,
                   K_EXACT: tl.constexpr, V_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """dX (C, BK) fp32 of one chunk: ((dO V^T) * M) K + e^b * (dO G_c^T), with fp32 G_c rows."""
    s = mm(dov.to(tl.float32), tl.trans(vv.to(tl.float32)), V_EXACT, V_EXACT, SPLIT_FP16) * mdec  # (C, C)
    s_hi, s_lo = split_pair(s, False, SPLIT_FP16)
    dog = mm(dov.to(tl.float32), tl.trans(state), V_EXACT, False, SPLIT_FP16)  # (C, BK) dO G_c^T
    return mm_pre(s_hi, s_lo, k_hi, k_lo, False, K_EXACT, dog * tl.exp(bcum)[:, None])


@triton.jit
def _readout_kernel(
    x_ptr,  # (B, T, H, K) fp32 q*
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s_ptr,  # FROM_STATES: (B, NS, H, 2, K, V) segment-start G as (hi, lo); else (B, H, K, V) fp32 initial G
    o_ptr,  # (B, T, H, V) out
    sfin_ptr,  # (B, H, K, V) fp32 out (one segment): final G
    T, H, K, V, NS, seg,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FROM_STATES: tl.constexpr,
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
    local = ik[:, None] * V + iv[None, :]
    kv_mask = km[:, None] & vm[None, :]
    # state: (BK, BV) block of G_c
    state, c_first, c_end, update_end = _segment_start(s_ptr, bb, hh, local, kv_mask, T, H, K, V, NS, seg, C,
                                                       FROM_STATES)
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
        o = _readout_chunk(x_hi, x_lo, kt_hi, kt_lo, v_hi, v_lo, mdec, bcum, state,
                           K_EXACT, V_EXACT, SPLIT_FP16)
        tl.store(o_ptr + tok[:, None] * V + iv[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=tm[:, None] & vm[None, :])
        if c < update_end:
            kw_hi, kw_lo = split_pair(kt.to(tl.float32) * w[None, :], False, SPLIT_FP16)  # (BK, C) (K * w)^T
            state = e_last * state + mm_pre(kw_hi, kw_lo, v_hi, v_lo, False, V_EXACT)
    if not FROM_STATES:
        tl.store(sfin_ptr + (bb * H + hh) * K * V + local, state, mask=kv_mask)


@triton.jit
def _readout_adjoint_kernel(
    do_ptr,  # (B, T, H, V) in v's dtype
    k_ptr,  # (B, T, H, K)
    v_ptr,  # (B, T, H, V)
    g_ptr,  # (B, T, H) fp32
    beta_ptr,  # (B, T, H) fp32
    s_ptr,  # FROM_STATES: (B, NS, H, 2, K, V) segment-start G as (hi, lo); else (B, H, K, V) fp32 initial G
    dx_ptr,  # (B, T, H, K) fp32 out
    sfin_ptr,  # (B, H, K, V) fp32 out (one segment): final G
    T, H, K, V, NS, seg,
    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FROM_STATES: tl.constexpr,
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
    local = ik[:, None] * V + iv[None, :]
    kv_mask = km[:, None] & vm[None, :]
    # state: (BK, BV) rows ik of G_c
    state, c_first, c_end, update_end = _segment_start(s_ptr, bb, hh, local, kv_mask, T, H, K, V, NS, seg, C,
                                                       FROM_STATES)
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
        dx = _adjoint_chunk(dov, vv, k_hi, k_lo, mdec, bcum, state, K_EXACT, V_EXACT, SPLIT_FP16)
        tl.store(dx_ptr + tok[:, None] * K + ik[None, :], dx, mask=tm[:, None] & km[None, :])
        if c < update_end:
            kw = tl.trans(kk.to(tl.float32) * w[:, None])  # (BK, C)
            state = e_last * state + mm(kw, vv.to(tl.float32), False, V_EXACT, SPLIT_FP16)
    if not FROM_STATES:
        tl.store(sfin_ptr + (bb * H + hh) * K * V + local, state, mask=kv_mask)


def _blocks(K: int, V: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))


def readout_segment(programs: int, n_chunks: int, device: torch.device) -> int:
    """Chunks per read-out program for `programs` programs per segment (G blocks x batch x heads): all
    n_chunks (one scan) where those give every streaming multiprocessor READOUT_PROGRAMS_PER_SM,
    else halved until the segments do or are single chunks (module NOTE)."""
    seg = n_chunks
    while seg > 1 and not fills_device(programs * triton.cdiv(n_chunks, seg), device,
                                       READOUT_PROGRAMS_PER_SM):
        seg = triton.cdiv(seg, 2)
    return seg


def _launch(kernel, ins, h_kv: torch.Tensor, out: torch.Tensor, blocks: int, seg: int | None,
            C: int, BK: int, BV: int, split_fp16: bool) -> torch.Tensor:
    """Run a read-out kernel over segments of seg chunks (None: readout_segment picks); returns the
    final G."""
    k, v, g, beta = ins[1:5]
    B, T, H, K = k.shape
    V = v.shape[-1]
    NT = triton.cdiv(T, C)
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    if seg is None:
        seg = readout_segment(blocks * B * H, NT, k.device)
    elif seg < 1:
        raise ValueError(f"seg must be >= 1 chunk, got {seg}")
    seg = min(seg, NT)
    n_seg = triton.cdiv(NT, seg)
    if n_seg == 1:
        states = h_kv
        s_fin = torch.empty(B, H, K, V, device=k.device, dtype=torch.float32)
    else:
        states, s_fin = chunk_state_pass(k, v, g, beta, h_kv, C, False, 1.0, split_fp16, every=seg)
    torch.library.wrap_triton(kernel)[(blocks, B * H, n_seg)](
        *ins, states, out, s_fin, T, H, K, V, n_seg, seg,
        C=C, BK=BK, BV=BV, FROM_STATES=n_seg > 1, K_EXACT=k.dtype == split_dt, V_EXACT=v.dtype == split_dt,
        SPLIT_FP16=split_fp16, num_warps=4, num_stages=1,
    )
    return s_fin


def chunk_readout(x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                  h_kv: torch.Tensor, o: torch.Tensor, split_fp16: bool, seg: int | None = None
                  ) -> torch.Tensor:
    """Write o (B, T, H, V) from q* x (B, T, H, K) fp32 and the initial G h_kv (B, H, K, V) fp32; returns
    the final G (B, H, K, V) fp32. k, v contiguous; g, beta (B, T, H) fp32 contiguous. seg: chunks of
    READOUT_CHUNK tokens per program (>= the chunk count: one scan; None: picked, module NOTE)."""
    BK, BVF = _blocks(k.shape[-1], v.shape[-1])
    # NOTE: H100, B=8 T=2048 H=16 K=V=128 (one scan): V blocks of 64 / 4 warps / 1 stage 0.48 ms; 64/4/2
    # 0.57, 64/8/2 0.67, 32/4/2 0.70 (benchmarks/NOTES-kernels.md, round 5)
    BV = min(64, BVF)
    return _launch(_readout_kernel, (x, k, v, g, beta), h_kv, o, triton.cdiv(v.shape[-1], BV), seg,
                   READOUT_CHUNK, BK, BV, split_fp16)


def chunk_readout_adjoint(do: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          beta: torch.Tensor, h_kv: torch.Tensor, dx: torch.Tensor, split_fp16: bool,
                          seg: int | None = None) -> torch.Tensor:
    """Write dx (B, T, H, K) fp32, the adjoint of the read-out applied to do (B, T, H, V) (in v's
    dtype), from the initial G h_kv; returns the final G. Other arguments as for chunk_readout."""
    BKF, BV = _blocks(k.shape[-1], v.shape[-1])
    # a block of K rows x all V columns of G stays within 64 fp32 registers per thread at 4 warps.
    # NOTE: H100, K=V=128 (one scan): K blocks of 64 / 4 warps 0.33 ms (1 or 2 stages), 64 / 8 / 2 0.48,
    # 32 / 4 / 2 0.40 (benchmarks/NOTES-kernels.md, round 5)
    BK = max(16, min(BKF, 8192 // BV))
    return _launch(_readout_adjoint_kernel, (do, k, v, g, beta), h_kv, dx, triton.cdiv(k.shape[-1], BK), seg,
                   READOUT_CHUNK, BK, BV, split_fp16)
