"""Chunk-boundary state passes of the chunkwise MesaNet (forward states and adjoint states).

One kernel serves both directions. A program owns a (BA x BB) tile of a per-(batch, head) state S
and walks the chunks sequentially, storing S at every chunk boundary, then updating it:
  forward  (REVERSE=False): stores S at each chunk START, then S <- e^{b_L} S + (A * w)^T B,
           w_s = e^{b_L - b_s} beta_s, with (A, B) = (k, k) for H (G is scanned by the read-out
           kernels in chunk_output.py and never stored per chunk).
  reverse  (REVERSE=True):  stores S at each chunk END, then S <- e^{b_L} S + sign (A * w)^T B,
           w_t = e^{b_t}, with (A, B, sign) = (u, x, -1) for dH and (x, do, +1) for dG.
b is the within-chunk cumulative log decay, b_L its value at the chunk's last row. States are fp32;
the boundary states are stored as a (hi, lo) pair in the split dtype (the bytes of fp32): the CG and
gradient kernels feed them to the tensor cores as loaded, which keeps them in shared memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_common import fills_device, mm, split_hi, split_lo


@triton.jit
def _chunk_state_kernel(
    a_ptr,  # (B, T, H, DA)
    b_ptr,  # (B, T, H, DB)
    g_ptr,  # (B, T, H) fp32 log decay
    beta_ptr,  # (B, T, H) fp32
    s0_ptr,  # (B, H, DA, DB) fp32 state entering the pass; SEGMENTED: (B, H, NSEG, DA, DB) per segment
    s_all_ptr,  # (B, NT, H, 2, DA, DB) state at each chunk boundary as (hi, lo) in the split dtype
    s_fin_ptr,  # (B, H, DA, DB) fp32 state leaving the pass; SEGMENTED: (B, H, NSEG, DA, DB) per segment
    T, H, DA, DB, NT, a_scale,
    dec_ptr,  # SEGMENTED and not STORE_ALL: (B, H, NSEG) fp32 out, the segment's total log decay
    SEG,  # SEGMENTED: chunks per segment
    C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr,
    B_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr, SEGMENTED: tl.constexpr, STORE_ALL: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    if SEGMENTED:
        # programs (batch * head, segment); a segment is SEG chunks in walk order
        nseg = tl.cdiv(NT, SEG)
        seg = tl.program_id(2) % nseg
        pid_bh = tl.program_id(2) // nseg
    else:
        pid_bh = tl.program_id(2)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    a_scale = tl.cast(a_scale, tl.float32)

    ia = pid_a * BA + tl.arange(0, BA)  # (BA,)
    ib = pid_b * BB + tl.arange(0, BB)  # (BB,)
    ma = ia < DA
    mb = ib < DB
    rows = tl.arange(0, C)  # (C,)
    tile = ia[:, None] * DB + ib[None, :]  # (BA, BB)
    tmask = ma[:, None] & mb[None, :]

    if SEGMENTED:
        state_at = ((bb * H + hh) * nseg + seg) * DA * DB + tile
        i_first = seg * SEG
        i_end = tl.minimum(i_first + SEG, NT)
        if STORE_ALL:
            s = tl.load(s0_ptr + state_at, mask=tmask, other=0.0)
        else:
            s = tl.zeros([BA, BB], dtype=tl.float32)
            b_seg = tl.sum(tl.zeros([C], dtype=tl.float32), 0)
    else:
        s = tl.load(s0_ptr + (bb * H + hh) * DA * DB + tile, mask=tmask, other=0.0).to(tl.float32)
        i_first = 0
        i_end = NT
    for i in range(i_first, i_end):
        if REVERSE:
            c = NT - 1 - i
        else:
            c = i
        if STORE_ALL:
            s_hi = split_hi(s, SPLIT_FP16)
            base = ((bb * NT + c) * H + hh) * 2 * DA * DB
            tl.store(s_all_ptr + base + tile, s_hi, mask=tmask)
            tl.store(s_all_ptr + base + DA * DB + tile, split_lo(s, s_hi, SPLIT_FP16), mask=tmask)
        t = c * C + rows  # (C,)
        tm = t < T
        tok = (bb * T + t) * H + hh  # (C,) token index
        g = tl.load(g_ptr + tok, mask=tm, other=0.0).to(tl.float32)
        bcum = tl.cumsum(g, 0)  # (C,)
        b_last = tl.sum(g, 0)
        if REVERSE:
            w = tl.exp(bcum)
        else:
            beta = tl.load(beta_ptr + tok, mask=tm, other=0.0).to(tl.float32)
            w = tl.exp(b_last - bcum) * beta
        w = tl.where(tm, w, 0.0)
        xa = tl.load(a_ptr + tok[:, None] * DA + ia[None, :], mask=tm[:, None] & ma[None, :], other=0.0)
        xb = tl.load(b_ptr + tok[:, None] * DB + ib[None, :], mask=tm[:, None] & mb[None, :], other=0.0)
        aw = tl.trans(xa.to(tl.float32) * w[:, None])  # (BA, C)
        upd = mm(aw, xb, False, B_EXACT, SPLIT_FP16)  # (BA, BB)
        s = tl.exp(b_last) * s + a_scale * upd
        if SEGMENTED:
            if not STORE_ALL:
                b_seg += b_last
    if SEGMENTED:
        if not STORE_ALL:
            tl.store(s_fin_ptr + state_at, s, mask=tmask)
            tl.store(dec_ptr + (bb * H + hh) * nseg + seg, b_seg)
    else:
        tl.store(s_fin_ptr + (bb * H + hh) * DA * DB + tile, s, mask=tmask)


@triton.jit
def _segment_starts_kernel(
    s0_ptr,  # (B, H, DA, DB) fp32 state entering the pass
    loc_ptr,  # (B, H, NSEG, DA, DB) fp32 each segment's state change from a zero start
    dec_ptr,  # (B, H, NSEG) fp32 each segment's total log decay
    starts_ptr,  # (B, H, NSEG, DA, DB) fp32 out: the state entering each segment
    s_fin_ptr,  # (B, H, DA, DB) fp32 out: the state leaving the pass
    N, NSEG,  # N = DA * DB
    BLOCK: tl.constexpr,
):
    """Walks the segments in order: start_{j+1} = e^{dec_j} start_j + loc_j (elementwise)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = idx < N
    s = tl.load(s0_ptr + pid_bh * N + idx, mask=m, other=0.0)
    for j in range(NSEG):
        at = (pid_bh * NSEG + j) * N + idx
        tl.store(starts_ptr + at, s, mask=m)
        s = tl.exp(tl.load(dec_ptr + pid_bh * NSEG + j)) * s + tl.load(loc_ptr + at, mask=m, other=0.0)
    tl.store(s_fin_ptr + pid_bh * N + idx, s, mask=m)


def _block(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


def _segment_count(programs: int, NT: int, device: torch.device, per_sm: float) -> int:
    """Segments that bring the programs of a pass to per_sm per streaming multiprocessor, each segment
    keeping at least 8 chunks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(int(per_sm * sms), programs), NT // 8))


def chunk_state_pass(
    a: torch.Tensor,  # (B, T, H, DA)
    b: torch.Tensor,  # (B, T, H, DB)
    g: torch.Tensor,  # (B, T, H) fp32
    beta: torch.Tensor,  # (B, T, H) fp32
    s0: torch.Tensor,  # (B, H, DA, DB) fp32
    chunk_size: int,
    reverse: bool,
    a_scale: float,
    split_fp16: bool,
    segments: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one state pass; returns (states at every chunk boundary as (B, NT, H, 2, DA, DB) (hi, lo)
    pairs in the split dtype, final state (B, H, DA, DB) fp32). segments: the chunks are split into
    this many segments walked in parallel (module NOTE); None picks by the number of programs."""
    B, T, H, DA = a.shape
    DB = b.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    s_all = torch.empty(B, NT, H, 2, DA, DB, device=a.device, dtype=split_dt)
    s_fin = torch.empty(B, H, DA, DB, device=a.device, dtype=torch.float32)
    # 64 x 64 tiles, or 32 x 32 where there would be too few programs (each walks all chunks); a 4-warp
    # reverse program needs fewer of them. NOTE: H200, K = V = 128, T = 4096 (2048 at B x H = 128), ms for
    # 64- / 32-tiles, B x H = 4, 32, 64, 96, 128: forward 0.52/0.35, 0.28/0.22, 0.33/0.29, 0.40/0.49,
    # 0.24/0.29; reverse 0.43/0.33, 0.24/0.23, 0.30/0.46, 0.37/0.67, 0.31/0.46 (NOTES-kernels.md, round 6)
    per_sm = 1.0 if reverse else 2.5
    cap = 64 if fills_device(triton.cdiv(DA, 64) * triton.cdiv(DB, 64) * B * H, a.device, per_sm) else 32
    BA, BB = _block(DA, cap), _block(DB, cap)
    tiles = (triton.cdiv(DA, BA), triton.cdiv(DB, BB))
    if segments is None:
        segments = 1 if cap == 64 else _segment_count(tiles[0] * tiles[1] * B * H, NT, a.device, per_sm)
    seg_len = triton.cdiv(NT, segments)
    nseg = triton.cdiv(NT, seg_len)
    # NOTE: H100, B=8 T=2048 H=16 K=128, chunk 32: the forward H pass took 0.26 ms at 2 warps against
    # 0.36 ms at 4; the reverse passes 0.37 / 0.35 ms at 4 warps, no faster at 2 (NOTES-kernels.md, round 5)
    launch = dict(C=chunk_size, BA=BA, BB=BB, REVERSE=reverse, B_EXACT=b.dtype == split_dt, SPLIT_FP16=split_fp16,
                  num_warps=4 if reverse else 2)
    state_kernel = torch.library.wrap_triton(_chunk_state_kernel)
    if nseg == 1:
        state_kernel[(*tiles, B * H)](a, b, g, beta, s0, s_all, s_fin, T, H, DA, DB, NT, a_scale, s_fin, NT,
                                      SEGMENTED=False, STORE_ALL=True, **launch)
        return s_all, s_fin
    # segments: each one's state change from a zero start, the states entering the segments in order,
    # then every segment again from its true start, storing its chunk-boundary states
    local = torch.empty(B, H, nseg, DA, DB, device=a.device, dtype=torch.float32)
    decay = torch.empty(B, H, nseg, device=a.device, dtype=torch.float32)
    starts = torch.empty_like(local)
    grid = (*tiles, B * H * nseg)
    state_kernel[grid](a, b, g, beta, s0, s_all, local, T, H, DA, DB, NT, a_scale, decay, seg_len,
                       SEGMENTED=True, STORE_ALL=False, **launch)
    block = 1024
    torch.library.wrap_triton(_segment_starts_kernel)[(triton.cdiv(DA * DB, block), B * H)](
        s0, local, decay, starts, s_fin, DA * DB, nseg, BLOCK=block, num_warps=4)
    state_kernel[grid](a, b, g, beta, starts, s_all, local, T, H, DA, DB, NT, a_scale, decay, seg_len,
                       SEGMENTED=True, STORE_ALL=True, **launch)
    return s_all, s_fin
