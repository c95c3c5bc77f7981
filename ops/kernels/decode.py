"""Fused one-token Mesa decode step: state update, Jacobi-preconditioned CG solve, output, state write.

One program per (batch, head) pair and split index. Every program of a pair runs the same CG solve on
the same data (so all agree bit for bit); split ``s`` writes its share of the rows of the new H and its
share of the V columns of the new G and of the output. Splitting only pays when there are fewer pairs
than multiprocessors (small batches), since the redundant solves then run on otherwise idle SMs and
the state traffic of one pair is spread over several SMs.

Two matvec forms, picked by ``BK`` (K rounded up to a power of two):
- BK <= 128: the new H (BK x BK fp32, 64 KiB at K = 128) stays in registers for the whole solve.
- BK == 256: too large for the register file; every CG step streams the old H (read-only input)
  row tile by column tile from L2 and applies ``A p = e^g (H p) + beta k (k.p) + lambda p``, with the
  search direction staged through the ``q_star`` output row (which this program alone owns).
"""

import torch
import triton
import triton.language as tl

# Largest padded key size whose K x K state tile is kept in registers during the solve.
RESIDENT_MAX_BK = 128
# Columns of one chunk of the resident tile (see the kernel); the default is one chunk (COLS = BK).
# NOTE: measured on an H200 (triton 3.6, K = 128, 8 warps, 30 CG steps): COLS = 128 takes 128 registers
# per thread there (two programs per SM) and is the fastest at B = 1 / 16 / 128 (33.1 / 60.6 / 427 us);
# COLS = 64 / 32 / 16 take 180-207 registers and are 1.3-2.1x slower (benchmarks/NOTES-decode.md).
RESIDENT_COLS = 128
# Column tile of the streamed matvec (BK == 256).
STREAM_BC = 16


@triton.jit
def _dot(a, b):
    """Full reduction of an elementwise product: (BK,) or (NA, COLS) -> scalar."""
    ab = a * b
    if len(ab.shape) == 2:
        ab = tl.sum(ab, axis=1)  # NOTE: per axis; a full tl.sum first reshapes, which moves the layout
    return tl.sum(ab, axis=0)


@triton.jit
def _apply_a_resident(h3, vec, lam, NA: tl.constexpr, BK: tl.constexpr, COLS: tl.constexpr):
    """(H' + diag(lambda)) vec with H' resident as h3[a, i, c] = H'[i, a * COLS + c]: (NA, COLS) -> (NA, COLS)."""
    acc = tl.sum(h3 * vec[:, None, :], axis=0)  # (BK, COLS), in-thread
    w = tl.sum(acc, axis=1)  # (BK,) row-indexed: in-thread + shuffles over the COLS / 4 lanes of a row
    return tl.reshape(w, (NA, COLS), can_reorder=True) + lam * vec


@triton.jit
def _apply_a_streamed(h_base, scratch, vec, decay, bk_vec, k_vec, lam, offs_r, mask_r,
                      K: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """(H' + diag(lambda)) vec with H' = e^g H + beta k k^T, H streamed from memory: (BK,) -> (BK,)."""
    tl.debug_barrier()  # every thread has finished reading the previous vector from scratch
    tl.store(scratch + offs_r, vec, mask=mask_r)
    tl.debug_barrier()  # the whole vector is visible to every thread
    acc = tl.zeros([BK], dtype=tl.float32)  # (BK,)
    for c0 in range(0, K, BC):
        offs_c = c0 + tl.arange(0, BC)
        mask_c = offs_c < K
        h_blk = tl.load(h_base + offs_r[:, None] * K + offs_c[None, :],
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)  # (BK, BC)
        v_blk = tl.load(scratch + offs_c, mask=mask_c, other=0.0)  # (BC,)
        acc += tl.sum(h_blk * v_blk[None, :], axis=1)
    return decay * acc + bk_vec * _dot(k_vec, vec) + lam * vec


@triton.jit
def _decode_step_fwd_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, lamb_ptr, hkk_ptr, hkv_ptr,  # inputs
    o_ptr, qs_ptr, hkk_out_ptr, hkv_out_ptr, steps_ptr,  # outputs
    cg_steps, cg_tol,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, COLS: tl.constexpr, NA: tl.constexpr,
    ROWS_PER_SPLIT: tl.constexpr, VBLOCKS_PER_SPLIT: tl.constexpr, RESIDENT: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * H + h
    pid_s = tl.program_id(1)  # split index
    i_h = pid_bh % H
    # NOTE: Inductor passes Python floats as fp64; an fp64 scalar would promote the whole CG loop.
    cg_tol = tl.cast(cg_tol, tl.float32)

    offs_r = tl.arange(0, BK)
    mask_r = offs_r < K

    decay = tl.exp(tl.load(g_ptr + pid_bh).to(tl.float32))  # e^g, scalar
    beta = tl.load(beta_ptr + pid_bh).to(tl.float32)
    k_r = tl.load(k_ptr + pid_bh * K + offs_r, mask=mask_r, other=0.0).to(tl.float32)  # (BK,)
    bk_r = beta * k_r

    h_base = hkk_ptr + pid_bh * K * K
    h_out_base = hkk_out_ptr + pid_bh * K * K
    row_lo = pid_s * ROWS_PER_SPLIT
    rows_mine = mask_r & (offs_r >= row_lo) & (offs_r < row_lo + ROWS_PER_SPLIT)

    if RESIDENT:
        # H' lives in registers as a (NA, BK, COLS) tile, h3[a, i, c] = H'[i, a * COLS + c]; every CG vector
        # is a (NA, COLS) tile, vec2[a, c] = vec[a * COLS + c]. NOTE: with 2-D vectors the compiler spreads
        # them over the warps instead of replicating a 1-D row vector in every lane (16 registers each at
        # K = 128): triton 3.6 then fits the kernel in 128 registers (two programs per SM; triton 3.9 on
        # a CPU-side compile gives 210). Per CG step there are still three exchanges through shared
        # memory (p to the matvec's layout, two dot products).
        offs_a = tl.arange(0, NA)
        offs_cc = tl.arange(0, COLS)
        offs_j = offs_a[:, None] * COLS + offs_cc[None, :]  # (NA, COLS) column index
        mask_j = offs_j < K
        k_j = tl.load(k_ptr + pid_bh * K + offs_j, mask=mask_j, other=0.0).to(tl.float32)  # (NA, COLS)
        offs_h = offs_r[None, :, None] * K + offs_j[:, None, :]  # (NA, BK, COLS)
        mask_h = mask_r[None, :, None] & mask_j[:, None, :]
        h_old = tl.load(h_base + offs_h, mask=mask_h, other=0.0)  # (NA, BK, COLS)
        h_new = decay * h_old + bk_r[None, :, None] * k_j[:, None, :]  # (NA, BK, COLS)
        tl.store(h_out_base + offs_h, h_new, mask=rows_mine[None, :, None] & mask_j[:, None, :])
        diag = tl.sum(tl.sum(tl.where(offs_r[None, :, None] == offs_j[:, None, :], h_new, 0.0), axis=0), axis=1)
        q = tl.load(q_ptr + pid_bh * K + offs_j, mask=mask_j, other=0.0).to(tl.float32)  # (NA, COLS)
        # NOTE: padded lambda entries are 1, so padded rows of A are the identity and x0 = 0 / 1 = 0 there.
        lam = tl.load(lamb_ptr + i_h * K + offs_j, mask=mask_j, other=1.0).to(tl.float32)  # (NA, COLS)
        x = q / (tl.reshape(diag, (NA, COLS)) + lam)
        r = q - _apply_a_resident(h_new, x, lam, NA, BK, COLS)
    else:
        offs_c = tl.arange(0, BK)
        mask_c = offs_c < K
        for r0 in range(0, K, BC):  # write H' by row tiles
            offs_t = r0 + tl.arange(0, BC)
            mask_t = offs_t < K
            k_t = tl.load(k_ptr + pid_bh * K + offs_t, mask=mask_t, other=0.0).to(tl.float32)  # (BC,)
            tile_mask = mask_t[:, None] & mask_c[None, :]
            h_t = tl.load(h_base + offs_t[:, None] * K + offs_c[None, :], mask=tile_mask, other=0.0)
            h_t = decay * h_t + (beta * k_t)[:, None] * k_r[None, :]  # (BC, BK)
            tl.store(h_out_base + offs_t[:, None] * K + offs_c[None, :], h_t, mask=tile_mask)
        q = tl.load(q_ptr + pid_bh * K + offs_r, mask=mask_r, other=0.0).to(tl.float32)  # (BK,)
        lam = tl.load(lamb_ptr + i_h * K + offs_r, mask=mask_r, other=1.0).to(tl.float32)  # (BK,)
        h_diag = tl.load(h_base + offs_r * (K + 1), mask=mask_r, other=0.0)  # (BK,)
        x = q / (decay * h_diag + bk_r * k_r + lam)
        scratch = qs_ptr + pid_bh * K
        r = q - _apply_a_streamed(h_base, scratch, x, decay, bk_r, k_r, lam, offs_r, mask_r, K, BK, BC)

    # ---- conjugate gradient on (H' + diag(lambda)) x = q, Jacobi start, early exit in-kernel ----
    p = r
    d = _dot(r, r)
    d0 = d
    steps = tl.full([], 0, dtype=tl.int32)
    it = tl.full([], 0, dtype=tl.int32)
    go = it < cg_steps
    while go:
        if RESIDENT:
            w = _apply_a_resident(h_new, p, lam, NA, BK, COLS)  # (NA, COLS)
        else:
            w = _apply_a_streamed(h_base, scratch, p, decay, bk_r, k_r, lam, offs_r, mask_r, K, BK, BC)
        pw = _dot(p, w)
        # NOTE: breakdown guard instead of an epsilon in the denominator: pw <= 0 or NaN/inf stops the
        # row with x unchanged (fp32 A can lose definiteness; an epsilon would hide it).
        ok = (pw > 0.0) & (pw < float("inf"))
        alpha = d / tl.where(ok, pw, 1.0)
        x = tl.where(ok, x + alpha * p, x)
        r = tl.where(ok, r - alpha * w, r)
        d_new = _dot(r, r)
        steps += ok.to(tl.int32)
        converged = ((cg_tol > 0.0) & (d_new <= cg_tol * cg_tol * d0)) | (d_new == 0.0)
        p = r + (d_new / tl.where(d > 0.0, d, 1.0)) * p
        d = d_new
        it += 1
        go = ok & (~converged) & (it < cg_steps)

    if not RESIDENT:
        tl.debug_barrier()  # every thread has read the scratch row in the last matvec
    if pid_s == 0:
        if RESIDENT:
            tl.store(qs_ptr + pid_bh * K + offs_j, x, mask=mask_j)
        else:
            tl.store(qs_ptr + pid_bh * K + offs_r, x, mask=mask_r)
        tl.store(steps_ptr + pid_bh, steps)
    x_r = tl.reshape(x, (BK,))  # (BK,) row-indexed for the output

    # ---- G' = e^g G + beta k v^T and o = G'^T x, over this split's V blocks ----
    g_base = hkv_ptr + pid_bh * K * V
    g_out_base = hkv_out_ptr + pid_bh * K * V
    for j in range(VBLOCKS_PER_SPLIT):
        offs_v = (pid_s * VBLOCKS_PER_SPLIT + j) * BV + tl.arange(0, BV)
        mask_v = offs_v < V
        vv = tl.load(v_ptr + pid_bh * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)  # (BV,)
        tile_mask = mask_r[:, None] & mask_v[None, :]
        g_t = tl.load(g_base + offs_r[:, None] * V + offs_v[None, :], mask=tile_mask, other=0.0)
        g_t = decay * g_t + bk_r[:, None] * vv[None, :]  # (BK, BV)
        tl.store(g_out_base + offs_r[:, None] * V + offs_v[None, :], g_t, mask=tile_mask)
        o_t = tl.sum(g_t * x_r[:, None], axis=0)  # (BV,)
        tl.store(o_ptr + pid_bh * V + offs_v, o_t.to(o_ptr.dtype.element_ty), mask=mask_v)


def _default_splits(n_pairs: int, n_vblocks: int, device: torch.device, resident: bool) -> int:
    """Programs per (b, h) pair: enough to cover the multiprocessors when pairs are few."""
    if not resident or device.type != "cuda":
        return 1
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vblocks, n_sm // max(n_pairs, 1)))


def decode_step(
    q: torch.Tensor,  # (B, H, K), L2-normalised
    k: torch.Tensor,  # (B, H, K), L2-normalised
    v: torch.Tensor,  # (B, H, V)
    g: torch.Tensor,  # (B, H), log decay <= 0
    beta: torch.Tensor,  # (B, H)
    lamb: torch.Tensor,  # (H, K) fp32, > 0
    h_kk: torch.Tensor,  # (B, H, K, K) fp32
    h_kv: torch.Tensor,  # (B, H, K, V) fp32
    cg_steps: int,
    cg_tol: float,
    *,
    num_splits: int | None = None,
    num_warps: int | None = None,
    cols: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Mesa decode token in one Triton launch (out of place; no input is modified).

    Computes H' = e^g H + beta k k^T, G' = e^g G + beta k v^T, solves (H' + diag(lamb)) x = q with at
    most ``cg_steps`` Jacobi-started CG steps (stopping once ||r||^2 <= cg_tol^2 ||r0||^2 when
    ``cg_tol > 0``, or on breakdown), and returns ``(o, q_star, h_kk_new, h_kv_new, steps)``:
    o = G'^T x (B, H, V) in v's dtype, q_star = x (B, H, K) fp32, the new states (fp32) and the CG
    updates done per (b, h) (B, H) int32. ``num_splits`` / ``num_warps`` / ``cols`` (columns per chunk
    of the register-resident tile, a power of two) override the launch heuristics (tests and
    benchmarks). Requires K, V <= 256.
    """
    B, H, K = q.shape
    V = v.shape[-1]
    if K > 256 or V > 256:
        raise ValueError(f"decode_step kernel supports K, V <= 256, got K={K}, V={V}")
    dev = q.device
    o = torch.empty(B, H, V, dtype=v.dtype, device=dev)
    q_star = torch.empty(B, H, K, dtype=torch.float32, device=dev)
    h_kk_new = torch.empty(B, H, K, K, dtype=torch.float32, device=dev)
    h_kv_new = torch.empty(B, H, K, V, dtype=torch.float32, device=dev)
    steps = torch.empty(B, H, dtype=torch.int32, device=dev)
    if B * H == 0:
        return o, q_star, h_kk_new, h_kv_new, steps

    BK = max(16, triton.next_power_of_2(K))
    resident = BK <= RESIDENT_MAX_BK
    BV = min(32, max(16, triton.next_power_of_2(V)))
    n_vblocks = triton.cdiv(V, BV)
    splits = num_splits if num_splits is not None else _default_splits(B * H, n_vblocks, dev, resident)
    if not resident:
        splits = 1  # the streamed path uses its q_star row as scratch: one program per pair
    vblocks_per_split = triton.cdiv(n_vblocks, splits)
    splits = triton.cdiv(n_vblocks, vblocks_per_split)  # no program without V columns
    if num_warps is None:
        num_warps = 8 if BK >= 128 else 4
    cols = min(cols or RESIDENT_COLS, BK)

    grid = (B * H, splits)
    torch.library.wrap_triton(_decode_step_fwd_kernel)[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
        lamb.contiguous(), h_kk.contiguous(), h_kv.contiguous(),
        o, q_star, h_kk_new, h_kv_new, steps,
        cg_steps, cg_tol,
        H=H, K=K, V=V, BK=BK, BV=BV, BC=STREAM_BC, COLS=cols, NA=BK // cols,
        ROWS_PER_SPLIT=triton.cdiv(K, splits), VBLOCKS_PER_SPLIT=vblocks_per_split, RESIDENT=resident,
        num_warps=num_warps,
    )
    return o, q_star, h_kk_new, h_kv_new, steps
