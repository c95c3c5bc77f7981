"""Public Mesa ops: ``mesa_net`` (chunkwise, training and prefill), ``mesa_net_step`` (one token),
``mesa_net_exact`` (ground truth by ``torch.linalg.solve``). Layout [B, T, H, D] as in
flash-linear-attention, so its users can switch by import."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import library  # noqa: F401  (registers torch.ops.mesa.*)
from . import reference
from . import validation as check

__all__ = ["MesaState", "MesaOutput", "mesa_net", "mesa_net_step", "mesa_net_exact"]


class MesaState(NamedTuple):
    """Recurrent state of one Mesa layer, fp32. N = batch size, or number of sequences (varlen)."""

    h_kk: Tensor  # (N, H, K, K)  sum of decayed beta k k^T
    h_kv: Tensor  # (N, H, K, V)  sum of decayed beta k v^T


class MesaOutput(NamedTuple):
    """``o`` (v's dtype), ``final_state`` (MesaState or None), ``cg_steps`` (int32 steps each
    token's solve used, [B, T, H] or [B, H] for one token; None unless asked for)."""

    o: Tensor
    final_state: Optional[MesaState]
    cg_steps: Optional[Tensor]


def _check_inputs(q, k, v, g, beta, lamb, token_dims: str) -> tuple[int, ...]:
    """Metadata checks shared by all public ops; returns the leading sizes of q and (H, K, V)."""
    lead = token_dims.split(",")
    check.check_tensor("q", q, ",".join(lead + ["K"]))
    check.check_tensor("k", k, ",".join(lead + ["K"]))
    check.check_tensor("v", v, ",".join(lead + ["V"]))
    check.check_tensor("g", g, token_dims)
    check.check_tensor("beta", beta, token_dims)
    check.check_tensor("lamb", lamb, "H,K")
    check.check_same_device(q=q, k=k, v=v, g=g, beta=beta, lamb=lamb)
    check.check_same_dtype(q=q, k=k, v=v)
    for i, label in enumerate(lead):
        for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta)):
            check.check_size(name, t, i, label, q.shape[i], "q")
    H, K, V = q.shape[-2], q.shape[-1], v.shape[-1]
    check.check_size("k", k, -1, "K", K, "q")
    check.check_size("lamb", lamb, 0, "H", H, "q")
    check.check_size("lamb", lamb, 1, "K", K, "q")
    check.check_values(q, k, v, g, beta, lamb)
    return (*q.shape[: len(lead) - 1], H, K, V)


def _prepare_qk(q: Tensor, k: Tensor, qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    if qk_l2norm:
        return reference.l2_normalize(q), reference.l2_normalize(k)
    return q, k


def _prepare_chunk_inputs(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, qk_l2norm: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v, beta) as the chunk op takes them. With qk_l2norm only q is normalised: the keys' norm
    is folded into the gates and values instead, ``beta k^ k^T = (beta s^-1) k k^T`` and
    ``beta k^ v^T = (beta s^-1) k (s^1/2 v)^T`` with ``s = ||k||^2 + eps``, so the keys reach the kernels
    in their own dtype.

    NOTE: normalised keys rounded back to bf16 cost ~4e-3 in o (reference.l2_normalize). Kept in fp32
    they make every product with a key a three-pass split product: the op's forward took 10.4 ms where
    the kernels on bf16 keys took 4.1 and the aten norm 0.9 (H100, 30 steps, benchmarks/RESULTS.md,
    nineteenth session). Raw bf16 keys are exact in the kernels' split dtype; the fp32 values and gates
    carry the scale.
    """
    if not qk_l2norm:
        return q, k, v, beta
    sq_norm = reference.squared_norm(k)
    return reference.l2_normalize(q), k, v * sq_norm.sqrt().unsqueeze(-1), beta / sq_norm


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States are fp32 (fp64 when the caller works in fp64, e.g. for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _zero_state(n: int, h: int, dk: int, dv: int, like: Tensor) -> MesaState:
    dtype = _state_dtype(like.dtype)
    return MesaState(
        torch.zeros(n, h, dk, dk, device=like.device, dtype=dtype),
        torch.zeros(n, h, dk, dv, device=like.device, dtype=dtype),
    )


def _pad_sequences(x: Tensor, index: Tensor, valid: Tensor) -> Tensor:
    """(1, T, H, *) packed -> (N, Tmax, H, *), zeros after each sequence's end (a neutral token)."""
    padded = x[0][index]  # (N, Tmax, H, *)
    return padded * valid.view(*valid.shape, *([1] * (padded.dim() - 2))).to(padded.dtype)


def mesa_net(
    q: Tensor,  # (B, T, H, K)
    k: Tensor,  # (B, T, H, K)
    v: Tensor,  # (B, T, H, V)
    g: Tensor,  # (B, T, H)  log forget gate, <= 0
    beta: Tensor,  # (B, T, H)  input gate in [0, 1]
    lamb: Tensor,  # (H, K)  ridge regulariser, > 0
    *,
    cg_steps: int = 30,
    cg_tol: float = 0.0,
    initial_state: Optional[MesaState] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    qk_l2norm: bool = True,
    return_cg_steps: bool = False,
    chunk_size: int = 64,
) -> MesaOutput:
    """Mesa layer over whole sequences (training, prefill), chunkwise with an on-chip CG solve.

    For every token t and head: ``o_t = G_t^T (H_t + diag(lamb))^-1 q_t`` with
    ``H_t = e^{g_t} H_{t-1} + beta_t k_t k_t^T`` and ``G_t = e^{g_t} G_{t-1} + beta_t k_t v_t^T``.

    Args:
        cg_steps: CG iterations per token (upper bound when ``cg_tol > 0``); 0 keeps the Jacobi guess.
        cg_tol: per-token early exit once ``||r|| <= cg_tol * ||r0||``; 0 runs all ``cg_steps``.
        initial_state: MesaState with N = B (or the number of sequences with ``cu_seqlens``).
        output_final_state: return the state after the last token (after each sequence with varlen).
        cu_seqlens: int offsets [N+1] of sequences packed along T of a batch of size 1.
            Varlen reads the offsets on the host (a device sync), so it is for eager use.
        qk_l2norm: L2-normalise q and k per head (in fp32) first, as MesaNet does.
        return_cg_steps: also return the int32 steps each token's solve used, [B, T, H].
        chunk_size: tokens per chunk of the parallel form.

    Gradients (q, k, v, g, beta, lamb, initial state) come from implicit differentiation: a second
    CG solve, exact at convergence, never backprop through the iterations.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, lamb, "B,T,H")
    check.check_cg_args(cg_steps, cg_tol)
    check.check_chunk_size(chunk_size)
    index = valid = None
    n = B
    if cu_seqlens is not None:
        check.check_same_device(q=q, cu_seqlens=cu_seqlens)
        lengths = check.check_cu_seqlens(cu_seqlens, B, T)
        n, t_max = len(lengths), max(lengths)
        steps_in = torch.arange(t_max, device=q.device)
        valid = steps_in[None, :] < torch.tensor(lengths, device=q.device)[:, None]  # (N, Tmax)
        index = torch.where(valid, cu_seqlens[:-1, None].long() + steps_in[None, :], 0)
    if initial_state is not None:
        check.check_state("initial_state", initial_state, n, H, K, V, q.device)
        h_kk, h_kv = (t.to(_state_dtype(t.dtype)) for t in initial_state)
    else:
        h_kk, h_kv = _zero_state(n, H, K, V, q)

    out_dtype = v.dtype
    q, k, v, beta = _prepare_chunk_inputs(q, k, v, beta, qk_l2norm)
    if index is not None:
        q, k, v, g, beta = (_pad_sequences(t, index, valid) for t in (q, k, v, g, beta))
    o, _, h_kk_end, h_kv_end, steps = torch.ops.mesa.chunk_fwd(
        q, k, v, g, beta, lamb, h_kk.contiguous(), h_kv.contiguous(), chunk_size, cg_steps, float(cg_tol)
    )
    o = o.to(out_dtype)  # scaled values come back in their compute dtype; one rounding either way
    if index is not None:  # back to the packed layout (1, T, H, *)
        o, steps = o[valid][None], steps[valid][None]
    return MesaOutput(
        o,
        MesaState(h_kk_end, h_kv_end) if output_final_state else None,
        steps if return_cg_steps else None,
    )


def mesa_net_step(
    q: Tensor,  # (B, H, K)
    k: Tensor,  # (B, H, K)
    v: Tensor,  # (B, H, V)
    g: Tensor,  # (B, H)
    beta: Tensor,  # (B, H)
    lamb: Tensor,  # (H, K)
    state: MesaState,
    *,
    cg_steps: int = 30,
    cg_tol: float = 0.0,
    qk_l2norm: bool = True,
    return_cg_steps: bool = False,
) -> MesaOutput:
    """One decoding step: update the state with (k, v), solve for q with CG, read out.

    Same math and the same Jacobi x0 as ``mesa_net``, so token-by-token decoding reproduces a
    prefill. Returns ``MesaOutput(o (B, H, V), new MesaState, steps (B, H) or None)``; the input
    state is not modified.
    """
    B, H, K, V = _check_inputs(q, k, v, g, beta, lamb, "B,H")
    check.check_cg_args(cg_steps, cg_tol)
    check.check_state("state", state, B, H, K, V, q.device)
    q, k = _prepare_qk(q, k, qk_l2norm)
    o, _, h_kk, h_kv, steps = torch.ops.mesa.decode_step(
        q, k, v, g, beta, lamb, state.h_kk.to(_state_dtype(state.h_kk.dtype)).contiguous(),
        state.h_kv.to(_state_dtype(state.h_kv.dtype)).contiguous(), cg_steps, float(cg_tol),
    )  # fmt: skip
    return MesaOutput(o, MesaState(h_kk, h_kv), steps if return_cg_steps else None)


def mesa_net_exact(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    lamb: Tensor,
    *,
    initial_state: Optional[MesaState] = None,
    qk_l2norm: bool = True,
) -> MesaOutput:
    """Ground truth: the recurrence token by token with ``torch.linalg.solve`` (differentiable).

    Computes in fp32, or fp64 for fp64 inputs; returns o in v's dtype and the final state in the
    compute dtype. Slow (a Python loop over T): for tests and checks.
    """
    B, T, H, K, V = _check_inputs(q, k, v, g, beta, lamb, "B,T,H")
    if initial_state is not None:
        check.check_state("initial_state", initial_state, B, H, K, V, q.device)
        h_kk, h_kv = initial_state
    else:
        h_kk, h_kv = _zero_state(B, H, K, V, q)
    q, k = _prepare_qk(q, k, qk_l2norm)
    o, h_kk, h_kv = reference.exact_recurrence(q, k, v, g, beta, lamb, h_kk, h_kv)
    return MesaOutput(o.to(v.dtype), MesaState(h_kk, h_kv), None)
