"""Chunk-boundary state passes of the chunkwise MesaNet (forward states and adjoint states).

One kernel serves both directions, and runs one or two passes per launch (chunk_state_passes). A
program owns a (BA x BB) tile of a per-(batch, head) state S and walks the chunks sequentially, storing
S at every chunk boundary (a forward pass may store every n-th only), then updating it:
  forward  (REVERSE=False): stores S at each chunk START, then S <- e^{b_L} S + (A * w)^T B,
           w_s = e^{b_L - b_s} beta_s, with (A, B) = (k, k) for H, and (k, v) for G where the
           read-out kernels (chunk_output.py) read G_c from states instead of scanning G themselves.
  reverse  (REVERSE=True):  stores S at each chunk END, then S <- e^{b_L} S + sign (A * w)^T B,
           w_t = e^{b_t}, with (A, B, sign) = (u, x, -1) for dH and (x, do, +1) for dG.
b is the within-chunk cumulative log decay, b_L its value at the chunk's last row. States are fp32;
the boundary states are stored as a (hi, lo) pair in the split dtype (the bytes of fp32): the CG and
gradient kernels feed them to the tensor cores as loaded, which keeps them in shared memory.
The symmetric H may be stored as its tiles on or above the diagonal only (StatePass.upper): no program
runs for a tile below it (its final state is written, transposed, by the mirror tile's program). With
tiles of half the CG's key block (chunk_output.h_states_with_g) the CG kernel reads H_c as its top rows
and right columns, both stored. At K = 128 and 64 x 64 tiles that is 3/4 of the bytes of H_c, written
here and read back by every CG program.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .chunk_common import below_diagonal_tile, fills_device, mm, split_hi, split_lo


@triton.jit
def _state_walk(a_ptr, b_ptr, g_ptr, beta_ptr, s0_ptr, s_all_ptr, s_fin_ptr, bb, hh, T, H, DA, DB, NT,
                a_scale, C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr,
                EVERY: tl.constexpr, B_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr, UNROLL: tl.constexpr,
                UPPER: tl.constexpr):
    """One state pass of one (batch, head) over the program's (BA x BB) tile (module docstring); stores the
    state at every EVERY-th chunk start (forward) or at every chunk end (reverse, EVERY = 1); the chunk
    loop unrolled UNROLL times. UPPER: a symmetric state, whose final tile also goes to the entries of
    the tiles below the diagonal that mirror it."""
    a_scale = tl.cast(a_scale, tl.float32)
    ia = tl.program_id(0) * BA + tl.arange(0, BA)  # (BA,)
    ib = tl.program_id(1) * BB + tl.arange(0, BB)  # (BB,)
    ma = ia < DA
    mb = ib < DB
    rows = tl.arange(0, C)  # (C,)
    tile = ia[:, None] * DB + ib[None, :]  # (BA, BB)
    tmask = ma[:, None] & mb[None, :]
    n_stored = tl.cdiv(NT, EVERY)

    s = tl.load(s0_ptr + (bb * H + hh) * DA * DB + tile, mask=tmask, other=0.0).to(tl.float32)
    for i in tl.range(NT, loop_unroll_factor=UNROLL):
        if REVERSE:
            c = NT - 1 - i
        else:
            c = i
        if c % EVERY == 0:
            s_hi = split_hi(s, SPLIT_FP16)
            base = ((bb * n_stored + c // EVERY) * H + hh) * 2 * DA * DB
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
    fin = s_fin_ptr + (bb * H + hh) * DA * DB
    tl.store(fin + tile, s, mask=tmask)
    if UPPER:
        tl.store(fin + ib[None, :] * DB + ia[:, None], s,
                 mask=tmask & below_diagonal_tile(ib[None, :], ia[:, None], BA, BB))


@triton.jit
def _chunk_state_kernel(
    a_ptr,  # (B, T, H, DA)
    b_ptr,  # (B, T, H, DB)
    s0_ptr,  # (B, H, DA, DB) fp32 state entering the pass
    s_all_ptr,  # (B, cdiv(NT, EVERY), H, 2, DA, DB) stored states as (hi, lo) in the split dtype
    s_fin_ptr,  # (B, H, DA, DB) fp32 state leaving the pass
    a2_ptr, b2_ptr, s02_ptr, s2_all_ptr, s2_fin_ptr,  # the second pass (PAIRED), same layouts with DA2, DB2
    g_ptr,  # (B, T, H) fp32 log decay
    beta_ptr,  # (B, T, H) fp32
    T, H, NT, DA, DB, a_scale, DA2, DB2, a2_scale,
    C: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, REVERSE: tl.constexpr, PAIRED: tl.constexpr,
    EVERY: tl.constexpr, EVERY2: tl.constexpr, B_EXACT: tl.constexpr, B2_EXACT: tl.constexpr,
    SPLIT_FP16: tl.constexpr, UNROLL: tl.constexpr, UPPER: tl.constexpr,
):
    # grid axis 2: (batch, head) of the first pass, then (PAIRED) of the second; UPPER: the first pass
    # stores only tiles on or above the diagonal
    n_bh = tl.num_programs(2)
    if PAIRED:
        n_bh = n_bh // 2
    pid_bh = tl.program_id(2)
    first = pid_bh < n_bh
    pid_bh = pid_bh % n_bh
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    if first:
        walk = True
        if UPPER:
            walk = not below_diagonal_tile(tl.program_id(0) * BA, tl.program_id(1) * BB, BA, BB)
        if walk:
            _state_walk(a_ptr, b_ptr, g_ptr, beta_ptr, s0_ptr, s_all_ptr, s_fin_ptr, bb, hh, T, H, DA, DB, NT,
                        a_scale, C, BA, BB, REVERSE, EVERY, B_EXACT, SPLIT_FP16, UNROLL, UPPER)
    elif PAIRED:
        _state_walk(a2_ptr, b2_ptr, g_ptr, beta_ptr, s02_ptr, s2_all_ptr, s2_fin_ptr, bb, hh, T, H, DA2, DB2,
                    NT, a2_scale, C, BA, BB, REVERSE, EVERY2, B2_EXACT, SPLIT_FP16, UNROLL, False)


def _block(d: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(d)))


class StatePass(NamedTuple):
    """One state pass: S <- e^{b_L} S + a_scale (a * w)^T b chunk by chunk from s0 (module docstring);
    a forward pass stores S at every `every`-th chunk start (so a pass at chunk C with every = 2 gives the
    states of chunk 2C). upper: a is b and s0 is symmetric, so S is: only the tiles on or above the
    diagonal are stored (the others' entries are undefined; state_tiles gives the tiling) and the final
    state is whole."""

    a: torch.Tensor  # (B, T, H, DA)
    b: torch.Tensor  # (B, T, H, DB)
    s0: torch.Tensor  # (B, H, DA, DB) fp32
    a_scale: float = 1.0
    every: int = 1
    upper: bool = False


def chunk_state_passes(passes: Sequence[StatePass], g: torch.Tensor, beta: torch.Tensor, chunk_size: int,
                       reverse: bool, split_fp16: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one or two state passes over the same gates (g, beta: (B, T, H) fp32) in one launch; returns,
    per pass, (its stored states as (B, cdiv(NT, every), H, 2, DA, DB) (hi, lo) pairs in the split dtype,
    its final state (B, H, DA, DB) fp32). Every program walks all chunks of its sequence, a chain of
    dependent updates, so a pass with few (batch, head) pairs leaves most slots idle, and a second pass in
    the same launch runs in them. Where the slots are full the pair costs about the two passes' sum.
    NOTE: H100, ms, H pass alone / H paired with the read-out's G pass (G alone at chunk 64): B=1 T=8192
    H=4 0.35 / 0.32 (0.22); B=8 T=2048 H=16 0.28 / 0.48 (0.23), where 255 registers per 2-warp program
    leave 4 programs per SM and the 1024 programs of the pair run in two rounds
    (benchmarks/NOTES-kernels.md, round 12)."""
    if not 1 <= len(passes) <= 2:
        raise ValueError(f"one or two state passes per launch, got {len(passes)}")
    if reverse and any(p.every != 1 for p in passes):
        raise ValueError("a reverse state pass stores every chunk end")
    if any(p.upper for p in passes[1:]) or (passes[0].upper and passes[0].a is not passes[0].b):
        raise ValueError("only a launch's first pass may store upper tiles, and only of a symmetric state")
    B, T, H, _ = passes[0].a.shape
    NT = triton.cdiv(T, chunk_size)
    split_dt = torch.float16 if split_fp16 else torch.bfloat16
    outs = []
    for p in passes:
        DA, DB = p.a.shape[-1], p.b.shape[-1]
        stored = torch.empty(B, triton.cdiv(NT, p.every), H, 2, DA, DB, device=p.a.device, dtype=split_dt)
        outs.append((stored, torch.empty(B, H, DA, DB, device=p.a.device, dtype=torch.float32)))
    BA, BB = state_tiles(passes, reverse)
    grid = (max(triton.cdiv(p.a.shape[-1], BA) for p in passes),
            max(triton.cdiv(p.b.shape[-1], BB) for p in passes), B * H * len(passes))
    second = passes[-1]
    torch.library.wrap_triton(_chunk_state_kernel)[grid](
        passes[0].a, passes[0].b, passes[0].s0, *outs[0], second.a, second.b, second.s0, *outs[-1], g, beta,
        T, H, NT, passes[0].a.shape[-1], passes[0].b.shape[-1], passes[0].a_scale,
        second.a.shape[-1], second.b.shape[-1], second.a_scale,
        C=chunk_size, BA=BA, BB=BB, REVERSE=reverse, PAIRED=len(passes) == 2,
        EVERY=passes[0].every, EVERY2=second.every,
        B_EXACT=passes[0].b.dtype == split_dt, B2_EXACT=second.b.dtype == split_dt, SPLIT_FP16=split_fp16,
        # NOTE: H100, B=8 T=2048 H=16 K=128, chunk 32: the forward H pass took 0.26 ms at 2 warps
        # against 0.36 ms at 4; the reverse passes 0.37 / 0.35 ms at 4 warps, no faster at 2
        # (benchmarks/NOTES-kernels.md, round 5)
        num_warps=4 if reverse else 2,
        # a forward chunk loop of 32 rows unrolled twice overlaps one chunk's loads and products with the
        # other's state update. NOTE: H100, ms, unrolled 1 / 2: forward H pass B=8 T=2048 H=16 0.286 /
        # 0.281, paired with G 0.482 / 0.459; B=1 T=8192 H=4 (32 x 32 tiles) 0.351 / 0.264, paired 0.318
        # / 0.249; unrolled 4 times, 0.59 and 1.18 at B=8; the paired reverse passes at B=8 0.679 /
        # 0.711; the G pass alone at chunk 64, B=8, 0.23 / 0.46 (benchmarks/NOTES-kernels.md, round 12)
        UNROLL=1 if reverse or chunk_size > 32 else 2,
        UPPER=passes[0].upper,
    )
    return outs


def state_tiles(passes: Sequence[StatePass], reverse: bool) -> tuple[int, int]:
    """The (BA x BB) state tile of one program of chunk_state_passes (the same passes and direction)."""
    # 64 x 64 tiles, or 32 x 32 where there would be too few programs (each walks all chunks); a 4-warp
    # reverse program needs fewer of them. NOTE: H200, K = V = 128, T = 4096 (8192 at B x H = 4, 2048
    # at 128), ms for 64- / 32-tiles at B x H = 4, 32, 64, 96, 128: forward 0.52/0.35, 0.28/0.22,
    # 0.33/0.29, 0.40/0.49, 0.24/0.29; reverse 0.43/0.33, 0.24/0.23, 0.30/0.46, 0.37/0.67, 0.31/0.46
    # (benchmarks/NOTES-kernels.md, round 6)
    B, _, H, _ = passes[0].a.shape
    per_sm = 1.0 if reverse else 2.5
    tiles64 = sum(triton.cdiv(p.a.shape[-1], 64) * triton.cdiv(p.b.shape[-1], 64) for p in passes) * B * H
    cap = 64 if fills_device(tiles64, passes[0].a.device, per_sm) else 32
    return max(_block(p.a.shape[-1], cap) for p in passes), max(_block(p.b.shape[-1], cap) for p in passes)


def chunk_state_pass(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, s0: torch.Tensor,
                     chunk_size: int, reverse: bool, a_scale: float, split_fp16: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One state pass storing every chunk boundary (chunk_state_passes): returns (states (B, NT, H, 2,
    DA, DB) as (hi, lo) pairs, final state (B, H, DA, DB) fp32)."""
    return chunk_state_passes([StatePass(a, b, s0, a_scale)], g, beta, chunk_size, reverse, split_fp16)[0]
