"""Shared Triton helpers of the chunkwise MesaNet kernels: accurate split-precision matmuls.

NOTE: every product that feeds the CG iteration (and the state passes whose error the solve
amplifies by cond(H + Lambda)) is computed as a 3-pass split: an fp32 operand x is written as
hi + lo with hi = bf16(x) and lo = bf16(x - hi), and x @ y = hi@hi + hi@lo + lo@hi (fp32
accumulation). Operands already exact in the split dtype (bf16 keys/values) skip their lo pass,
so P @ K^T costs 2 passes instead of 3. Evidence (mesanet-math.md 6b, fp64 simulation at
cond 401): bf16x3 5.2e-5 vs tf32 4.4e-3 and bf16 3.5e-2 relative error of o; on the H200 a chain of
bf16 dots runs ~5x faster than `input_precision="tf32x3"` (616 vs 71 TFLOP/s per pass), so three
bf16 passes beat one tf32x3 dot. Measured numbers: benchmarks/NOTES-kernels.md.
The Triton interpreter computes bf16 dots wrongly; under TRITON_INTERPRET=1 the launchers pick
fp16 as the split dtype (SPLIT_FP16=True), which exercises the same code path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def fills_device(programs: int, device: torch.device, per_sm: float) -> bool:
    """Whether a launch of this many programs gives the streaming multiprocessors of a CUDA device at
    least per_sm programs each; the kernels whose programs walk all chunks of a sequence pick their
    split by it. Off CUDA (the interpreter) it is True."""
    if device.type != "cuda":
        return True
    return programs >= per_sm * torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def split_hi(x, SPLIT_FP16: tl.constexpr):
    """High part of an fp32 tile in the split dtype."""
    if SPLIT_FP16:
        return x.to(tl.float16)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def split_lo(x, hi, SPLIT_FP16: tl.constexpr):
    """Low part x - hi of an fp32 tile in the split dtype."""
    if SPLIT_FP16:
        return (x - hi.to(tl.float32)).to(tl.float16)
    else:
        return (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def below_diagonal_tile(i, j, BI: tl.constexpr, BJ: tl.constexpr):
    """Whether entry (i, j) of a state stored in (BI x BJ) tiles lies in a tile wholly below the diagonal.
    A state pass stores only the other tiles of a symmetric state (StatePass.upper, chunk_states.py);
    entry (j, i), the transpose of such an entry, always lies in a stored tile."""
    return (i // BI) * BI >= (j // BJ + 1) * BJ


@triton.jit
def chunk_tokens(T, H, C: tl.constexpr):
    """Where a chunk program works, on the grid (chunks, batch * heads): its chunk index, batch and head
    (int64), the chunk's positions 0..C-1, their in-sequence mask and flat token indices into
    (B, T, H, ...) tensors."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bb = (pid_bh // H).to(tl.int64)
    hh = (pid_bh % H).to(tl.int64)
    pos = tl.arange(0, C)
    t = pid_c * C + pos
    return pid_c, bb, hh, pos, t < T, (bb * T + t) * H + hh


@triton.jit
def split_pair(x, EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """(hi, lo) of a tile; a tile already exact in the split dtype (EXACT) is its own lo, which the
    products (mm_pre with A_EXACT / B_EXACT) then skip."""
    xf = x.to(tl.float32)
    hi = split_hi(xf, SPLIT_FP16)
    lo = hi
    if not EXACT:
        lo = split_lo(xf, hi, SPLIT_FP16)
    return hi, lo


@triton.jit
def mm_pre(a_hi, a_lo, b_hi, b_lo, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, acc=None):
    """acc + a @ b from pre-split operands, fp32 accumulation; small terms first."""
    if A_EXACT:
        if not B_EXACT:
            acc = tl.dot(a_hi, b_lo, acc)
    else:
        acc = tl.dot(a_lo, b_hi, acc)
        if not B_EXACT:
            acc = tl.dot(a_hi, b_lo, acc)
    return tl.dot(a_hi, b_hi, acc)


@triton.jit
def mm(a, b, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, SPLIT_FP16: tl.constexpr):
    """a @ b for fp32 tiles (or tiles exact in the split dtype), 1-3 passes."""
    a_hi = split_hi(a, SPLIT_FP16)
    b_hi = split_hi(b, SPLIT_FP16)
    a_lo = a_hi
    b_lo = b_hi
    if not A_EXACT:
        a_lo = split_lo(a, a_hi, SPLIT_FP16)
    if not B_EXACT:
        b_lo = split_lo(b, b_hi, SPLIT_FP16)
    return mm_pre(a_hi, a_lo, b_hi, b_lo, A_EXACT, B_EXACT)
