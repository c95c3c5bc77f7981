"""mesa_net (aten chunk path) and mesa_net_step against the exact solve, on CPU."""

import pytest
import torch

from conftest import mesa_inputs, random_state, rel_err
from mesa_compile.ops import MesaState, mesa_net, mesa_net_exact, mesa_net_step
from mesa_compile.ops.api import _prepare_chunk_inputs
from mesa_compile.ops.reference import L2_NORM_EPS, l2_normalize, squared_norm

SHAPES = [  # (B, T, H, K, V): T=1, odd T (not a chunk multiple), V != K, odd batch and heads
    (1, 1, 2, 16, 16),
    (3, 37, 5, 24, 40),
    (2, 70, 3, 16, 8),
]


@pytest.mark.parametrize("B,T,H,K,V", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("converge", ["steps", "tol"])
def test_mesa_net_matches_exact_fp32(B, T, H, K, V, with_state, converge):
    q, k, v, g, beta, lamb = mesa_inputs(B, T, H, K, V)
    state = random_state(B, H, K, V) if with_state else None
    cg = dict(cg_steps=K + 5) if converge == "steps" else dict(cg_steps=200, cg_tol=1e-7)
    o, final, _ = mesa_net(q, k, v, g, beta, lamb, initial_state=state, output_final_state=True,
                           chunk_size=16, **cg)  # fmt: skip
    ref = mesa_net_exact(q, k, v, g, beta, lamb, initial_state=state)
    # fp32 arithmetic on a converged solve: the error budget is ~1e-6; the acceptance bound is 1e-5.
    assert rel_err(o, ref.o) <= 1e-5
    assert rel_err(final.h_kk, ref.final_state.h_kk) <= 1e-5
    assert rel_err(final.h_kv, ref.final_state.h_kv) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q, k, v, g, beta, lamb = mesa_inputs(2, 45, 2, 16, 24, dtype=torch.float64)
    o = mesa_net(q, k, v, g, beta, lamb, cg_steps=25, chunk_size=chunk_size).o
    ref = mesa_net_exact(q, k, v, g, beta, lamb).o
    assert rel_err(o, ref) <= 1e-12  # fp64, converged


def test_varlen_equals_per_sequence_runs():
    H, K, V = 3, 16, 24
    lengths = [1, 37, 100]
    cu = torch.tensor([0, 1, 38, 138], dtype=torch.int32)
    q, k, v, g, beta, lamb = mesa_inputs(1, sum(lengths), H, K, V)
    state = random_state(len(lengths), H, K, V)
    o, final, steps = mesa_net(q, k, v, g, beta, lamb, cg_steps=K + 5, cu_seqlens=cu, initial_state=state,
                               output_final_state=True, return_cg_steps=True)  # fmt: skip
    assert o.shape == (1, sum(lengths), H, V) and steps.shape == (1, sum(lengths), H)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = mesa_net(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], lamb, cg_steps=K + 5,
                       initial_state=MesaState(state.h_kk[i : i + 1], state.h_kv[i : i + 1]),
                       output_final_state=True)  # fmt: skip
        assert rel_err(o[:, a:b], one.o) <= 1e-5
        assert rel_err(final.h_kk[i], one.final_state.h_kk[0]) <= 1e-5
        assert rel_err(final.h_kv[i], one.final_state.h_kv[0]) <= 1e-5


@pytest.mark.parametrize("B,T,H,K,V", [(2, 37, 3, 24, 40), (1, 5, 1, 16, 16)])
def test_step_by_step_reproduces_prefill(B, T, H, K, V):
    q, k, v, g, beta, lamb = mesa_inputs(B, T, H, K, V)
    state0 = random_state(B, H, K, V)
    full = mesa_net(q, k, v, g, beta, lamb, cg_steps=K + 5, initial_state=state0, output_final_state=True)
    state, outs = state0, []
    for t in range(T):
        step = mesa_net_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], lamb, state, cg_steps=K + 5)
        state = step.final_state
        outs.append(step.o)
    assert rel_err(torch.stack(outs, 1), full.o) <= 1e-5
    assert rel_err(state.h_kk, full.final_state.h_kk) <= 1e-5
    assert rel_err(state.h_kv, full.final_state.h_kv) <= 1e-5


def test_zero_steps_is_the_jacobi_guess_on_both_paths():
    # One x0 rule everywhere: with 0 CG steps, prefill and decode agree (fla's chunk path returns 0).
    B, T, H, K, V = 1, 3, 2, 16, 16
    q, k, v, g, beta, lamb = mesa_inputs(B, T, H, K, V)
    full = mesa_net(q, k, v, g, beta, lamb, cg_steps=0)
    state = MesaState(torch.zeros(B, H, K, K), torch.zeros(B, H, K, V))
    outs = []
    for t in range(T):
        step = mesa_net_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], lamb, state, cg_steps=0)
        state = step.final_state
        outs.append(step.o)
    assert full.o.abs().sum() > 0
    assert rel_err(torch.stack(outs, 1), full.o) <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_low_precision_inputs_keep_fp32_states(dtype, tol):
    q, k, v, g, beta, lamb = mesa_inputs(2, 33, 2, 16, 16)
    out = mesa_net(q.to(dtype), k.to(dtype), v.to(dtype), g, beta, lamb, cg_steps=25, output_final_state=True)
    ref = mesa_net_exact(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), g, beta, lamb)
    assert out.o.dtype == dtype and out.final_state.h_kk.dtype == torch.float32
    # o is rounded to the input dtype at the end: the error is that rounding (bf16 2^-8, fp16 2^-11).
    assert rel_err(out.o, ref.o) <= tol
    # the states are not: normalised keys never pass through the input dtype (they would cost ~2^-8 here)
    assert rel_err(out.final_state.h_kk, ref.final_state.h_kk) <= 1e-5
    assert rel_err(out.final_state.h_kv, ref.final_state.h_kv) <= 1e-5


def test_key_norm_is_folded_into_gates_and_values():
    """With qk_l2norm the chunk op gets the raw keys; beta / s and v s^1/2 (s = ||k||^2 + eps) give the
    outer products of the normalised keys, so the states and the solve are the same."""
    q, k, v, g, beta, lamb = mesa_inputs(2, 9, 3, 16, 8)
    k16 = k.to(torch.bfloat16)
    q_in, k_in, v_in, beta_in = _prepare_chunk_inputs(q, k16, v.to(torch.bfloat16), beta, True)
    assert k_in is k16 and v_in.dtype == beta_in.dtype == torch.float32
    assert torch.equal(q_in, l2_normalize(q))
    kn = l2_normalize(k16)
    kk = torch.einsum("bth,bthi,bthj->bthij", beta_in, k16.float(), k16.float())
    assert rel_err(kk, torch.einsum("bth,bthi,bthj->bthij", beta, kn, kn)) <= 1e-6
    kv = torch.einsum("bth,bthi,bthj->bthij", beta_in, k16.float(), v_in)
    assert rel_err(kv, torch.einsum("bth,bthi,bthj->bthij", beta, kn, v.to(torch.bfloat16).float())) <= 1e-6
    assert _prepare_chunk_inputs(q, k, v, beta, False) == (q, k, v, beta)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_l2_normalize_accumulates_in_fp32(dtype):
    x = torch.randn(3, 5, 24, dtype=torch.float64) * 4.0
    x[1, 2] = 0.0  # a padded token's key
    xd = x.to(dtype)
    want_sq = xd.double().square().sum(-1) + L2_NORM_EPS
    out_dtype = torch.promote_types(dtype, torch.float32)
    sq, xn = squared_norm(xd), l2_normalize(xd)
    assert sq.dtype == xn.dtype == out_dtype
    # fp32 accumulation of the input as given (no rounding of squares to the input dtype): ~1e-7
    assert rel_err(sq, want_sq) <= (1e-12 if dtype == torch.float64 else 1e-6)
    assert rel_err(xn, xd.double() / want_sq.sqrt()[..., None]) <= (1e-12 if dtype == torch.float64 else 1e-6)


def test_l2_normalize_gradient_including_a_zero_vector():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    x[0, 1] = 0.0
    assert torch.autograd.gradcheck(l2_normalize, (x.requires_grad_(),))
    assert torch.autograd.gradcheck(squared_norm, (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_output_has_the_value_dtype(dtype):
    q, k, v, g, beta, lamb = mesa_inputs(2, 1, 2, 16, 8)
    state = random_state(2, 2, 16, 8)
    out = mesa_net_step(q[:, 0].to(dtype), k[:, 0].to(dtype), v[:, 0].to(dtype), g[:, 0], beta[:, 0], lamb, state)
    assert out.o.dtype == dtype and out.final_state.h_kk.dtype == torch.float32
