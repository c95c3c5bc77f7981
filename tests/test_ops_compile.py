"""torch.compile(fullgraph=True) and torch.library.opcheck on the mesa:: ops (CPU)."""

import pytest
import torch

from conftest import mesa_inputs, random_state, rel_err
from mesa_compile.ops import mesa_net, mesa_net_step
from mesa_compile.ops import reference


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_mesa_net_forward_backward_matches_eager():
    inputs = mesa_inputs(2, 37, 2, 16, 24, requires_grad=True)
    state = random_state(2, 2, 16, 24, requires_grad=True)

    def loss_fn(q, k, v, g, beta, lamb, h_kk, h_kv):
        out = mesa_net(q, k, v, g, beta, lamb, cg_steps=3, cg_tol=1e-5, chunk_size=16,
                       initial_state=type(state)(h_kk, h_kv), output_final_state=True)  # fmt: skip
        return out.o.square().mean() + out.final_state.h_kv.square().mean()

    leaves = [*inputs, *state]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="inductor")
    loss_c = compiled(*leaves)
    grads_c = torch.autograd.grad(loss_c, leaves)
    loss_e = loss_fn(*leaves)
    grads_e = torch.autograd.grad(loss_e, leaves)
    assert rel_err(loss_c, loss_e) <= 1e-5
    for got, want in zip(grads_c, grads_e):
        assert rel_err(got, want) <= 1e-4  # Inductor reorders fp32 reductions


def test_compiled_decode_step_has_no_graph_break():
    B, H, K, V = 2, 2, 16, 8
    q, k, v, g, beta, lamb = (t[:, 0] if t.dim() > 2 else t for t in mesa_inputs(B, 1, H, K, V))
    state = random_state(B, H, K, V)

    def step(q, k, v, g, beta, lamb, state):
        return mesa_net_step(q, k, v, g, beta, lamb, state, cg_steps=3, return_cg_steps=True)

    explained = torch._dynamo.explain(step)(q, k, v, g, beta, lamb, state)
    assert explained.graph_break_count == 0
    got = torch.compile(step, fullgraph=True)(q, k, v, g, beta, lamb, state)
    want = step(q, k, v, g, beta, lamb, state)
    assert rel_err(got.o, want.o) <= 1e-5
    assert rel_err(got.final_state.h_kk, want.final_state.h_kk) <= 1e-6
    assert torch.equal(got.cg_steps, want.cg_steps)


def _op_samples():
    B, T, H, K, V = 2, 5, 2, 8, 4
    q, k, v, g, beta, lamb = mesa_inputs(B, T, H, K, V, dtype=torch.float64)
    q, k = reference.l2_normalize(q), reference.l2_normalize(k)
    h_kk, h_kv = random_state(B, H, K, V, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, g, beta, lamb, h_kk, h_kv)]
    # NOTE: 2 CG steps keep opcheck's symbolic (dynamic-shape) traces short; the step count does
    # not change what opcheck verifies (schema, fakes, autograd registration, AOT dispatch).
    _, x, _, _, _ = torch.ops.mesa.chunk_fwd(*[t.detach() for t in leaves], 4, 2, 0.0)
    do = torch.randn(B, T, H, V, dtype=torch.float64)
    return {
        "chunk_fwd": (torch.ops.mesa.chunk_fwd, (*leaves, 4, 2, 1e-6)),
        "chunk_bwd": (torch.ops.mesa.chunk_bwd,
                      (*[t.detach() for t in leaves], x, do, torch.randn_like(h_kk), torch.randn_like(h_kv), 4, 2, 0.0)),
        "decode_step": (torch.ops.mesa.decode_step, (*[t[:, 0] for t in leaves[:5]], *leaves[5:], 2, 0.0)),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["chunk_fwd", "chunk_bwd", "decode_step"])
def test_opcheck(name):
    op, args = _op_samples()[name]
    torch.library.opcheck(op, args)
