"""The public ops run the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (eager).

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. at import, so the interpreted run
happens in a subprocess (this file run as a script) that checks its results and exits non-zero
on failure.
"""

import os
import subprocess
import sys

import pytest
import torch


def _interpreted_checks() -> None:
    from conftest import mesa_inputs, random_state, rel_err
    from mesa_compile.ops import library, mesa_net, mesa_net_exact, mesa_net_step

    torch.manual_seed(0)
    B, T, H, K, V = 2, 19, 2, 16, 24
    leaves = mesa_inputs(B, T, H, K, V, requires_grad=True)
    state = random_state(B, H, K, V, requires_grad=True)
    assert library._pick("chunk_fwd", leaves[0]).__module__.endswith("kernels.chunk_cg")
    assert library._pick("decode_step", leaves[0]).__module__.endswith("kernels.decode")

    out = mesa_net(*leaves, cg_steps=K + 5, chunk_size=16, initial_state=state, output_final_state=True)
    exact = mesa_net_exact(*leaves, initial_state=state)
    assert rel_err(out.o, exact.o) <= 1e-5, rel_err(out.o, exact.o)
    assert rel_err(out.final_state.h_kv, exact.final_state.h_kv) <= 1e-5
    do = torch.randn_like(out.o)
    grads = torch.autograd.grad((out.o * do).sum(), [*leaves, *state])
    expected = torch.autograd.grad((exact.o * do).sum(), [*leaves, *state])
    for name, got, want in zip("q k v g beta lamb h_kk h_kv".split(), grads, expected):
        assert rel_err(got, want) <= 1e-4, (name, rel_err(got, want))  # fp32, converged

    q, k, v, g, beta, lamb = (t.detach() for t in leaves)
    step = mesa_net_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, state, cg_steps=K + 5)
    first = mesa_net_exact(q[:, :1], k[:, :1], v[:, :1], g[:, :1], beta[:, :1], lamb, initial_state=state)
    assert rel_err(step.o, first.o[:, 0]) <= 1e-5

    early = mesa_net(q, k, v, g, beta, lamb, cg_steps=30, cg_tol=1e-3, chunk_size=16, initial_state=state,
                     return_cg_steps=True)
    assert early.cg_steps.float().mean() < 30 and rel_err(early.o, exact.o) <= 1e-2

    # varlen: two sequences packed in one row run the kernels as two independent sequences
    cu = torch.tensor([0, 7, T], dtype=torch.int32)
    packed = mesa_net(q[:1], k[:1], v[:1], g[:1], beta[:1], lamb, cg_steps=K + 5, chunk_size=16,
                      cu_seqlens=cu)
    for a, b in ((0, 7), (7, T)):
        one = mesa_net_exact(q[:1, a:b], k[:1, a:b], v[:1, a:b], g[:1, a:b], beta[:1, a:b], lamb)
        assert rel_err(packed.o[:, a:b], one.o) <= 1e-5, rel_err(packed.o[:, a:b], one.o)


def test_public_ops_run_the_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "0"}
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, __file__], env=env, cwd=here, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "interpreted checks passed" in done.stdout


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _interpreted_checks()
    print("interpreted checks passed")
