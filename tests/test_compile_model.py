"""torch.compile(fullgraph=True) on CPU: MesaLayer forward, the LM training step, decode_one_token.

fullgraph=True makes any graph break an error, so passing = zero graph breaks. Compiling is slow on
2 CPU cores (Inductor spends most of it in codegen and g++), so shapes are tiny, the models have one
layer and few CG steps (graph size grows with both), and each test compiles one function once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from mesa_compile import MesaConfig, MesaLayer, MesaNetLM

# Inductor vs eager in fp32: fused / reordered reductions through a 3-step CG and two norms.
# Measured differences are ~1e-6; aot_eager runs the same aten ops as eager (tolerance 1e-5).
INDUCTOR_TOL = dict(rtol=1e-4, atol=1e-5)
AOT_EAGER_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_config(**overrides) -> MesaConfig:
    # chunk_size 8 with T = 12: one full chunk and one partial chunk.
    return MesaConfig.from_preset("tiny", **{"n_layers": 1, "cg_steps": 3, "chunk_size": 8, **overrides})


def assert_trees_close(actual, expected, tol) -> None:
    for a, e in zip(tree_leaves(actual), tree_leaves(expected), strict=True):
        torch.testing.assert_close(a, e, **tol)


def test_layer_forward_compiles_fullgraph():
    layer = MesaLayer(small_config(gamma_cap=True))
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 5, 64))  # a state to continue from: prefill-from-state path
        expected = layer(x, state)
        actual = torch.compile(layer, fullgraph=True)(x, state)
    assert_trees_close(actual, expected, INDUCTOR_TOL)


def _loss(model: MesaNetLM, ids: torch.Tensor) -> torch.Tensor:
    logits, _ = model(ids[:, :-1])  # (B, T - 1, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _check_training_step(backend: str, tol: dict) -> None:
    model = MesaNetLM(small_config())
    ids = torch.randint(0, 256, (2, 13))
    loss = _loss(model, ids)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    compiled_loss = torch.compile(_loss, fullgraph=True, backend=backend)(model, ids)
    actual = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, loss, **tol)
    assert_trees_close(actual, expected, tol)


def test_training_step_compiles_fullgraph_aot_eager():
    # Dynamo + AOTAutograd's joint forward/backward graph (the custom ops' registered autograd
    # included) without Inductor's codegen, which is covered by the slow variant below.
    _check_training_step("aot_eager", AOT_EAGER_TOL)


@pytest.mark.slow
def test_training_step_compiles_fullgraph_inductor():
    _check_training_step("inductor", INDUCTOR_TOL)


def test_decode_one_token_compiles_fullgraph():
    model = MesaNetLM(small_config())
    ids = torch.randint(0, 256, (2, 9))
    step = torch.compile(model.decode_one_token, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        _, state = model(ids[:, :6])
        eager_state = compiled_state = state
        for t in range(6, 9):  # three steps through one compiled graph (same shapes: no recompile)
            expected, eager_state = model.decode_one_token(ids[:, t : t + 1], eager_state)
            actual, compiled_state = step(ids[:, t : t + 1], compiled_state)
            torch.testing.assert_close(actual, expected, **INDUCTOR_TOL)
    assert_trees_close(compiled_state, eager_state, INDUCTOR_TOL)
