"""Chunk-boundary state passes of the chunkwise MesaNet (forward states and adjoint states).

One kernel serves both directions. A program owns a (BA x BB) tile of a per-(batch, head) state S
and walks the chunks sequentially, storing S at every chunk boundary, then updating it:
  forward  (REVERSE=False): stores S at each chunk START, then S <- e^{b_L} S + (A * w)^T B,
           w_s = e^{b_L - b_s} beta_s, with (A, B) = (k, k) for H, and (k, v) for G where the
           read-out kernels (chunk_output.py) read G_c from states instead of scanning G themselves.
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
    s0_ptr,  # (B, H, DA, DB) fp32 state entering the pass
    s_all_ptr,  # (B, NT, H, 2, DA, DB) state at each chunk boundary as (hi, lo) in the split dtype
    s_fin_ptr,  # (B, H, DA, DB) fp32 state leaving the pass
    T, H, DA, DB, NT, a_scale,
    C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr,
    B_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
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

    s = tl.load(s0_ptr + (bb * H + hh) * DA * DB + tile, mask=tmask, other=0.0).to(tl.float32)
    for i in range(NT):
        if REVERSE:
            c = NT - 1 - i
        else:
            c = i
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
    tl.store(s_fin_ptr + (bb * H + hh) * DA * DB + tile, s, mask=tmask)


def _block(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one state pass; returns (states at every chunk boundary as (B, NT, H, 2, DA, DB) (hi, lo)
    pairs in the split dtype, final state (B, H, DA, DB) fp32)."""
    B, T, H, DA = a.shape
    DB = b.shape[-1]
    NT = triton.cdiv(T, chunk_size)
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    s_all = torch.empty(B, NT, H, 2, DA, DB, device=a.device, dtype=split_dt)
    s_fin = torch.empty(B, H, DA, DB, device=a.device, dtype=torch.float32)
    # 64 x 64 tiles, or 32 x 32 where there would be too few programs (each walks all chunks); a 4-warp
    # reverse program needs fewer of them. NOTE: H200, K = V = 128, T = 4096 (8192 at B x H = 4, 2048
    # at 128), ms for 64- / 32-tiles at B x H = 4, 32, 64, 96, 128: forward 0.52/0.35, 0.28/0.22,
    # 0.33/0.29, 0.40/0.49, 0.24/0.29; reverse 0.43/0.33, 0.24/0.23, 0.30/0.46, 0.37/0.67, 0.31/0.46
    # (benchmarks/NOTES-kernels.md, round 6)
    per_sm = 1.0 if reverse else 2.5
    cap = 64 if fills_device(triton.cdiv(DA, 64) * triton.cdiv(DB, 64) * B * H, a.device, per_sm) else 32
    BA, BB = _block(DA, cap), _block(DB, cap)
    grid = (triton.cdiv(DA, BA), triton.cdiv(DB, BB), B * H)
    torch.library.wrap_triton(_chunk_state_kernel)[grid](
        a, b, g, beta, s0, s_all, s_fin, T, H, DA, DB, NT, a_scale,
        C=chunk_size, BA=BA, BB=BB, REVERSE=reverse,
        B_EXACT=b.dtype == split_dt, SPLIT_FP16=split_fp16,
        # NOTE: H100, B=8 T=2048 H=16 K=128, chunk 32: the forward H pass took 0.26 ms at 2 warps
        # against 0.36 ms at 4; the reverse passes 0.37 / 0.35 ms at 4 warps, no faster at 2
        # (benchmarks/NOTES-kernels.md, round 5)
        num_warps=4 if reverse else 2,
    )
    return s_all, s_fin
