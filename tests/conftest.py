"""Shared test fixtures: a fresh seed per test, the `gpu` marker, and Mesa input factories."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from mesa_compile.ops import MesaState


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different, reproducible seed per test (crc32: str hash() changes between processes).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def mesa_inputs(B, T, H, K, V, *, dtype=torch.float32, device="cpu", gate_bias=2.0, requires_grad=False):
    """Random Mesa inputs: unnormalised q/k (the ops normalise), gates in range, lamb in [0.25, 1.25]."""
    q = torch.randn(B, T, H, K, dtype=dtype, device=device)
    k = torch.randn(B, T, H, K, dtype=dtype, device=device)
    v = torch.randn(B, T, H, V, dtype=dtype, device=device)
    g = F.logsigmoid(torch.randn(B, T, H, dtype=dtype, device=device) + gate_bias)
    beta = torch.rand(B, T, H, dtype=dtype, device=device)
    lamb = torch.rand(H, K, dtype=dtype, device=device) + 0.25
    tensors = [q, k, v, g, beta, lamb]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return tensors


def random_state(N, H, K, V, *, dtype=torch.float32, device="cpu", requires_grad=False):
    """A valid (symmetric PSD) Mesa state, as a prefix of some sequence would leave."""
    a = torch.randn(N, H, K, K, dtype=dtype, device=device) / K**0.5
    h_kk = a @ a.transpose(-1, -2)
    h_kv = torch.randn(N, H, K, V, dtype=dtype, device=device) * 0.3
    if requires_grad:
        h_kk.requires_grad_()
        h_kv.requires_grad_()
    return MesaState(h_kk, h_kv)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
