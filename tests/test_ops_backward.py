"""Gradients of mesa_net / mesa_net_step (implicit differentiation) vs autograd of the exact solve."""

import pytest
import torch

from conftest import mesa_inputs, random_state, rel_err
from mesa_compile.ops import mesa_net, mesa_net_exact, mesa_net_step

NAMES = ["q", "k", "v", "g", "beta", "lamb", "h_kk0", "h_kv0"]


def _loss(out, do, dh_kk, dh_kv):
    # Weights on o and on both final states, so every gradient path is exercised.
    return (out.o * do).sum() + (out.final_state.h_kk * dh_kk).sum() + (out.final_state.h_kv * dh_kv).sum()


@pytest.mark.parametrize("B,T,H,K,V,chunk", [(2, 37, 3, 24, 40, 16), (1, 1, 2, 16, 16, 64), (3, 20, 5, 16, 8, 8)])
def test_gradients_match_autograd_of_exact_solve_fp64(B, T, H, K, V, chunk):
    inputs = mesa_inputs(B, T, H, K, V, dtype=torch.float64, requires_grad=True)
    state = random_state(B, H, K, V, dtype=torch.float64, requires_grad=True)
    leaves = [*inputs, state.h_kk, state.h_kv]
    fast = mesa_net(*inputs, cg_steps=K + 10, initial_state=state, output_final_state=True, chunk_size=chunk)
    exact = mesa_net_exact(*inputs, initial_state=state)
    do = torch.randn_like(exact.o)
    dh_kk, dh_kv = torch.randn_like(state.h_kk), torch.randn_like(state.h_kv)
    grads = torch.autograd.grad(_loss(fast, do, dh_kk, dh_kv), leaves)
    expected = torch.autograd.grad(_loss(exact, do, dh_kk, dh_kv), leaves)
    for name, got, want in zip(NAMES, grads, expected):
        assert rel_err(got, want) <= 1e-6, name  # converged CG in fp64: the budget is ~1e-12


def test_gradients_fp32_converged():
    inputs = mesa_inputs(2, 30, 2, 16, 24, requires_grad=True)
    o = mesa_net(*inputs, cg_steps=40).o
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), inputs)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = mesa_net_exact(*exact_inputs).o
    expected = torch.autograd.grad((ref * do.double()).sum(), exact_inputs)
    for name, got, want in zip(NAMES, grads, expected):
        assert rel_err(got, want) <= 1e-4, name  # fp32 rounding through two solves and sums


def test_gradcheck_small_fp64():
    inputs = mesa_inputs(1, 6, 2, 4, 3, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, g, beta, lamb):
        return mesa_net(q, k, v, g, beta, lamb, cg_steps=12, chunk_size=4).o

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_step_gradients_match_exact():
    B, H, K, V = 2, 3, 16, 24
    q, k, v, g, beta, lamb = mesa_inputs(B, 1, H, K, V, dtype=torch.float64, requires_grad=True)
    state = random_state(B, H, K, V, dtype=torch.float64, requires_grad=True)
    leaves = [q, k, v, g, beta, lamb, state.h_kk, state.h_kv]
    step = mesa_net_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, state, cg_steps=K + 10)
    exact = mesa_net_exact(q, k, v, g, beta, lamb, initial_state=state)
    do = torch.randn_like(step.o)
    dh_kk, dh_kv = torch.randn_like(state.h_kk), torch.randn_like(state.h_kv)
    step = step._replace(o=step.o[:, None])
    grads = torch.autograd.grad(_loss(step, do[:, None], dh_kk, dh_kv), leaves)
    expected = torch.autograd.grad(_loss(exact, do[:, None], dh_kk, dh_kv), leaves)
    for name, got, want in zip(NAMES, grads, expected):
        assert rel_err(got, want) <= 1e-6, name


def test_unused_outputs_get_zero_gradients():
    # Only the final state feeds the loss: do arrives as None and must be treated as zeros.
    inputs = mesa_inputs(1, 9, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    out = mesa_net(*inputs, cg_steps=12, output_final_state=True)
    out.final_state.h_kv.sum().backward()
    exact_inputs = [t.detach().requires_grad_() for t in inputs]
    mesa_net_exact(*exact_inputs).final_state.h_kv.sum().backward()
    for name, got, want in zip(NAMES, inputs, exact_inputs):
        expected = torch.zeros_like(got) if want.grad is None else want.grad  # q, lamb: no path
        assert (got.grad - expected).abs().max() <= 1e-8 * (1 + expected.abs().max()), name
