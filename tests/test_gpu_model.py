"""GPU: the model through the Triton kernels, and the compiled LM training step on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mesa_compile import MesaConfig, MesaNetLM

pytestmark = pytest.mark.gpu


def _loss(model: MesaNetLM, ids: torch.Tensor) -> torch.Tensor:
    logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def test_compiled_training_step_on_cuda_matches_eager():
    torch._dynamo.reset()
    config = MesaConfig.from_preset("tiny", cg_steps=10)
    model = MesaNetLM(config).cuda()
    ids = torch.randint(0, config.vocab_size, (4, 130), device="cuda")
    params = [p for p in model.parameters()]

    loss_e = _loss(model, ids)
    grads_e = torch.autograd.grad(loss_e, params)
    compiled = torch.compile(_loss, fullgraph=True)  # fullgraph: a graph break is an error
    loss_c = compiled(model, ids)
    grads_c = torch.autograd.grad(loss_c, params)
    assert rel_err(loss_c, loss_e) <= 1e-4
    worst = max(rel_err(a, b) for a, b in zip(grads_c, grads_e))
    assert worst <= 1e-3, worst  # 3-pass split matmuls in the kernels: fp32-level differences


def test_prefill_then_decode_on_cuda_matches_full_forward():
    config = MesaConfig.from_preset("tiny", cg_steps=40)
    model = MesaNetLM(config).cuda().eval()
    ids = torch.randint(0, config.vocab_size, (3, 70), device="cuda")
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, :50])
        steps = [logits]
        for t in range(50, 70):
            step_logits, state = model(ids[:, t : t + 1], state)
            steps.append(step_logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-3  # kernels: chunk path vs fused decode path
