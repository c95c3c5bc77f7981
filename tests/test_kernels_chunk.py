"""Triton chunk kernels (mesa_compile.ops.kernels.chunk_fwd / chunk_bwd) vs the aten reference.

CPU: the kernels run in the Triton interpreter. Triton 3.9 reads TRITON_INTERPRET when
``@triton.jit`` decorates a function (``triton.knobs.runtime.interpret`` is consulted in
``triton.jit``), i.e. when mesa_compile.ops.kernels is first imported; other test modules import it
without the flag. So one subprocess (this file run as a script) computes the kernel outputs of all
CPU cases with TRITON_INTERPRET=1 and TRITON_DEFAULT_FP_FUSION=0, and the tests compare them here.
GPU (marked ``gpu``): bf16 accuracy against the exact solve, gradients, long sequences, sizes.

Tolerances: fp32 kernels vs the fp64 reference: 1e-5 (the 3-pass fp16/bf16 split products carry
~22/16 mantissa bits, measured ~5e-7 in the interpreter); fp16 outputs add their rounding (2e-4 rms):
2e-3. Against the exact solve (fp64), with enough CG steps to converge: 1e-4.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mesa_compile.ops import reference as ref
from mesa_compile.ops.api import mesa_net_exact

# name: (B, T, H, K, V, dtype, chunk, cg_steps, cg_tol, with backward)
CASES = {
    "f32_t37_converged": (1, 37, 2, 16, 24, torch.float32, 16, 32, 0.0, True),
    "f16_t20": (2, 20, 2, 32, 16, torch.float16, 16, 12, 0.0, True),
    "f32_k48_v40_tol": (1, 40, 2, 48, 40, torch.float32, 32, 30, 1e-3, False),
    "f32_zero_steps": (1, 16, 2, 16, 16, torch.float32, 16, 0, 0.0, True),
    # V padded to 256: the adjoint read-out scan splits K = 48 into two blocks of 32 rows
    "f32_k48_v160_blocks": (1, 45, 1, 48, 160, torch.float32, 16, 40, 0.0, True),
    # run as if on a GPU with few programs per SM (LOW_OCCUPANCY): the adjoint read-out from the G states
    # of the backward's paired launch too, 32 x 32 state tiles (masked at K = 48, V = 160)
    "f32_k48_v160_low_occupancy": (2, 45, 2, 48, 160, torch.float32, 16, 40, 0.0, True),
}
LOW_OCCUPANCY = {"f32_k48_v160_low_occupancy"}
FWD_NAMES = ("o", "q_star", "h_kk", "h_kv", "steps")
BWD_NAMES = ("dq", "dk", "dv", "dg", "dbeta", "dlamb", "dh_kk0", "dh_kv0")


def make_inputs(B, T, H, K, V, dtype, device="cpu", *, corr=0.0, gate_bias=3.0, lamb=None, state=True):
    """Normalised q/k (k = normalize(corr * u + noise), one u per head), gates, lamb, states."""
    q = ref.l2_normalize(torch.randn(B, T, H, K, device=device)).to(dtype)
    u = torch.randn(1, 1, H, K, device=device)
    k = ref.l2_normalize(corr * u + torch.randn(B, T, H, K, device=device)).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + gate_bias)
    beta = torch.sigmoid(torch.randn(B, T, H, device=device))
    lamb = torch.rand(H, K, device=device) + 0.25 if lamb is None else torch.full((H, K), lamb, device=device)
    h_kk = torch.zeros(B, H, K, K, device=device)
    h_kv = torch.zeros(B, H, K, V, device=device)
    if state:
        a = torch.randn(B, H, K, K, device=device) / K
        h_kk, h_kv = a @ a.transpose(-1, -2), torch.randn(B, H, K, V, device=device) / K
    return [q, k, v, g, beta, lamb, h_kk, h_kv]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_cases(path: str) -> None:
    """Subprocess body: kernel outputs of every CPU case under the interpreter, saved to path."""
    from mesa_compile.ops.kernels import chunk_bwd, chunk_common, chunk_fwd, chunk_output, chunk_states

    torch.manual_seed(1234)
    results = {}
    for name, (B, T, H, K, V, dtype, C, steps, tol, bwd) in CASES.items():
        occupancy = (lambda *_: False) if name in LOW_OCCUPANCY else chunk_common.fills_device
        chunk_output.fills_device = chunk_states.fills_device = occupancy
        args = make_inputs(B, T, H, K, V, dtype)
        fwd = chunk_fwd(*args, C, steps, tol)
        res = {"args": args, "fwd": fwd}
        if bwd:
            do = torch.randn(B, T, H, V).to(dtype)
            dh = (torch.randn(B, H, K, K) / K, torch.randn(B, H, K, V) / K)
            res["grads_in"] = (do, *dh)
            res["bwd"] = chunk_bwd(*args, fwd[1], do, *dh, C, steps, tol)
        results[name] = res
    chunk_output.fills_device = chunk_states.fills_device = chunk_common.fills_device
    results["readout_paths"] = _readout_paths("cpu")
    results["relaxed"] = _relaxed_solves()
    results["upper_states"] = _upper_states("cpu")
    torch.save(results, path)


def _readout_paths(device: str) -> dict:
    """Read-out o and adjoint dx with their final G, by the scan and from a G state pass (both paths of
    chunk_output.py), both paths at each chunk length the launchers use (READOUT_CHUNKS), on inputs
    where the adjoint splits K into two blocks: {"chunks": {chunk: {scan: (o, G, dx, G)}}}; and from the
    G states of a launch paired with the H pass at chunk 32, as chunk_fwd / chunk_bwd run it:
    {"paired": (o, G, dx, G), "h": (H states of the paired launch, of the H pass alone)}."""
    from mesa_compile.ops.kernels import chunk_output
    from mesa_compile.ops.kernels.chunk_cg import _use_fp16_split
    from mesa_compile.ops.kernels.chunk_states import StatePass, chunk_state_passes

    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    B, T, H, K, V = (2, 75, 2, 48, 160) if device == "cpu" else (2, 700, 3, 128, 96)
    q, k, v, g, beta, _, h_kk, h_kv = make_inputs(B, T, H, K, V, dtype, device)
    x, do = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, V, device=device).to(dtype)

    def both(scan, states=None):
        # o kept in fp32: a 16-bit o would turn 1-ulp differences of G_c into rounding flips
        o, dx = torch.empty(B, T, H, V, device=device), torch.empty_like(x)
        split = _use_fp16_split()
        g_o = chunk_output.chunk_readout(x, k, v, g, beta, h_kv, o, split, scan=scan, states=states)
        g_dx = chunk_output.chunk_readout_adjoint(do, k, v, g, beta, h_kv, dx, split, scan=scan,
                                                  states=states)
        return o, g_o, dx, g_dx

    chunks = chunk_output.READOUT_CHUNKS
    out = {"chunks": {}}
    try:
        for chunk in sorted(set(chunks.values())):
            chunk_output.READOUT_CHUNKS = dict.fromkeys(chunks, chunk)
            out["chunks"][chunk] = {scan: both(scan) for scan in (True, False)}
    finally:
        chunk_output.READOUT_CHUNKS = chunks
    h_pass = StatePass(k, k, h_kk)
    g_pass = chunk_output.readout_state_pass(k, v, h_kv, 32)
    h_paired, g_states = chunk_state_passes([h_pass, g_pass], g, beta, 32, False, _use_fp16_split())
    h_alone = chunk_state_passes([h_pass], g, beta, 32, False, _use_fp16_split())[0]
    out["paired"] = both(False, g_states)
    out["h"] = (h_paired, h_alone)
    return out


def _relaxed_solves() -> dict:
    """q* of the CG kernel with its matvecs relaxed to one pass per product from the first step
    (relax=1) and never (relax=0), 40 steps, with the inputs; run under the interpreter."""
    from mesa_compile.ops.kernels.chunk_cg import _use_fp16_split, launch_chunk_cg
    from mesa_compile.ops.kernels.chunk_states import chunk_state_pass

    B, T, H, K, C = 1, 40, 2, 32, 16
    args = make_inputs(B, T, H, K, K, torch.float32)
    q, k, _, g, beta, lamb, h_kk, _ = args
    hs, _ = chunk_state_pass(k, k, g, beta, h_kk, C, False, 1.0, _use_fp16_split())
    out = {"args": args}
    for relax in (0.0, 1.0):
        x, steps = torch.empty_like(q), torch.empty(B, T, H, dtype=torch.int32)
        launch_chunk_cg(q, k, g, beta, lamb, hs, x, steps, x, g, lamb, C, 40, 0.0, False, relax=relax)
        out[relax] = x
    return out


def _upper_states(device: str) -> dict:
    """The H state pass storing every tile and only the tiles on or above the diagonal (StatePass.upper),
    and the CG's q* from each, with the entries of the unstored tiles set to NaN (the CG kernel must not
    read them); state tiles of half the CG's key block, as h_states_with_g stores upper tiles: 32 on the
    CPU (K = 48: a masked one mirrored), 64 on the GPU (K = 128)."""
    from mesa_compile.ops.kernels import chunk_states
    from mesa_compile.ops.kernels.chunk_cg import _use_fp16_split, launch_chunk_cg

    B, T, H, K, C = (1, 40, 2, 48, 16) if device == "cpu" else (2, 256, 2, 128, 32)
    q, k, _, g, beta, lamb, h_kk, _ = make_inputs(B, T, H, K, K, torch.float32 if device == "cpu"
                                                  else torch.bfloat16, device)
    occupancy = chunk_states.fills_device
    # 32 x 32 tiles where the launch leaves few programs per SM (as on the CPU here), else 64 x 64
    chunk_states.fills_device = lambda *_: device != "cpu"
    try:
        passes = {upper: [chunk_states.StatePass(k, k, h_kk, upper=upper)] for upper in (False, True)}
        out = {upper: chunk_states.chunk_state_passes(p, g, beta, C, False, _use_fp16_split())[0]
               for upper, p in passes.items()}
        tile = chunk_states.state_tiles(passes[True], False)
    finally:
        chunk_states.fills_device = occupancy
    i = torch.arange(K, device=device)
    out["mirrored"] = (i[:, None] // tile[0]) * tile[0] >= (i[None, :] // tile[1] + 1) * tile[1]
    out["tile"] = tile
    out[True][0][..., out["mirrored"]] = float("nan")
    for upper in (False, True):
        x = torch.empty(B, T, H, K, device=device)
        steps = torch.empty(B, T, H, dtype=torch.int32, device=device)
        launch_chunk_cg(q, k, g, beta, lamb, out[upper][0], x, steps, x, g, lamb, C, 12, 0.0, False,
                        h_upper=upper)
        out[f"x_{upper}"] = x
    return out


def _check_upper_states(res: dict) -> None:
    """Upper tiles only: the stored tiles are the whole pass's, bit for bit; the final state is whole,
    its mirrored entries the transposes of the computed ones; the CG reads none of the unstored entries
    (NaN) and solves the same system (H_c exactly symmetric instead of up to rounding: 1e-5)."""
    mirrored = res["mirrored"]
    half = 2 ** ((mirrored.shape[0] - 1).bit_length() - 1)  # half the CG's key block (next power of two)
    assert mirrored.any() and res["tile"] == (half, half), res["tile"]
    whole, upper = res[False], res[True]
    assert torch.equal(upper[0][..., ~mirrored], whole[0][..., ~mirrored])
    fin = upper[1]
    assert torch.equal(fin[..., mirrored], fin.transpose(-1, -2)[..., mirrored])
    assert torch.equal(fin[..., ~mirrored], whole[1][..., ~mirrored])
    assert rel(fin, whole[1]) <= 1e-5
    assert torch.isfinite(res["x_True"]).all() and rel(res["x_True"], res["x_False"]) <= 1e-5


def _check_readout_paths(res: dict) -> None:
    """At one chunk length, the same products in the same order: equal up to the fp32 summation order of
    the dots (1e-6); across chunk lengths, the order of the state updates differs too (1e-5)."""
    names = ("o", "G (read-out)", "dx", "G (adjoint)")
    first = res["chunks"][min(res["chunks"])][True]
    for chunk, paths in res["chunks"].items():
        for name, a, b, c in zip(names, paths[True], paths[False], first):
            assert torch.isfinite(a).all() and rel(a, b) <= 1e-6, (chunk, name, rel(a, b))
            assert rel(b, c) <= 1e-5, (chunk, name, rel(b, c))
    # G states stored every 2nd chunk of 32 by the paired launch: the states of chunk 64, with the updates
    # of 32 rows each; the H states of that launch are the H pass's, bit for bit
    for name, a, b in zip(names, res["paired"], first):
        assert torch.isfinite(a).all() and rel(a, b) <= 1e-5, ("paired", name, rel(a, b))
    for a, b in zip(*res["h"]):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def interp_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("interp") / "chunk_kernels.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out)], env=env, check=True, timeout=600)
    return torch.load(out, weights_only=False)


def _tol(dtype: torch.dtype, name: str) -> float:
    low_precision_out = name in ("o", "dq", "dk", "dv")
    return 2e-3 if (dtype == torch.float16 and low_precision_out) else 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_interp_fwd_matches_reference(interp_results, case):
    B, T, H, K, V, dtype, C, steps, tol, _ = CASES[case]
    res = interp_results[case]
    args64 = [a.double() for a in res["args"]]
    # the kernel's CG rounds its search directions (chunk_cg.py): converged and zero-step results
    # equal the reference's; an early exit stops at a residual <= tol, reached at most a few steps later
    want = ref.chunk_fwd(*args64, C, steps if tol == 0 else 200, 0.0)
    for name, got, exp in zip(FWD_NAMES[:4], res["fwd"][:4], want[:4]):
        assert got.dtype == (dtype if name == "o" else torch.float32), name
        bound = _tol(dtype, name) if tol == 0 or name.startswith("h_") else 10 * tol
        assert rel(got, exp) <= bound, (name, rel(got, exp))
    assert res["fwd"][4].dtype == torch.int32
    assert res["fwd"][4].max() <= steps
    if tol > 0:
        steps_ref = ref.chunk_fwd(*args64, C, steps, tol)[4]
        diff = res["fwd"][4] - steps_ref
        assert diff.min() >= -1 and diff.max() <= 3, (diff.min(), diff.max())
        assert res["fwd"][4].float().mean() <= steps_ref.float().mean() + 1


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][-1]])
def test_interp_bwd_matches_reference(interp_results, case):
    B, T, H, K, V, dtype, C, steps, tol, _ = CASES[case]
    res = interp_results[case]
    args64 = [a.double() for a in res["args"]]
    want = ref.chunk_bwd(*args64, res["fwd"][1].double(), *[t.double() for t in res["grads_in"]], C, steps, tol)
    for name, got, exp in zip(BWD_NAMES, res["bwd"], want):
        assert torch.isfinite(got).all(), name
        assert rel(got, exp) <= _tol(dtype, name), (name, rel(got, exp))


def test_interp_readout_scan_matches_state_pass_path(interp_results):
    _check_readout_paths(interp_results["readout_paths"])


def test_interp_upper_state_tiles(interp_results):
    _check_upper_states(interp_results["upper_states"])


def test_interp_relaxed_matvecs(interp_results):
    """Relaxed matvecs (one pass per product, chunk_cg.py NOTE) apply the same operator, rounded: from the
    first step on, 40 steps land within the single pass's rounding (fp16 in the interpreter, ~5e-4 per
    product, times cond) of the exact q*, and not on the full-precision q*."""
    res = interp_results["relaxed"]
    exact = ref.chunk_fwd(*[a.double() for a in res["args"]], 16, 200, 0.0)[1]
    assert rel(res[0.0], exact) <= 1e-5
    assert rel(res[1.0], exact) <= 1e-2
    assert rel(res[1.0], res[0.0]) > 1e-7


def test_interp_converged_matches_exact(interp_results):
    """With cg_steps = K the CG solve is exact: o and every gradient match mesa_net_exact (fp64)."""
    res = interp_results["f32_t37_converged"]
    q, k, v, g, beta, lamb, h_kk, h_kv = [a.double().requires_grad_() for a in res["args"]]
    from mesa_compile.ops import MesaState

    o, (hkk_end, hkv_end), _ = mesa_net_exact(q, k, v, g, beta, lamb, initial_state=MesaState(h_kk, h_kv),
                                              qk_l2norm=False)
    assert rel(res["fwd"][0], o) <= 1e-4
    do, dhkk, dhkv = [t.double() for t in res["grads_in"]]
    loss = (o * do).sum() + (hkk_end * dhkk).sum() + (hkv_end * dhkv).sum()
    grads = torch.autograd.grad(loss, (q, k, v, g, beta, lamb, h_kk, h_kv))
    for name, got, exp in zip(BWD_NAMES, res["bwd"], grads):
        assert rel(got, exp) <= 1e-4, (name, rel(got, exp))


# ------------------------------------------------------------------------------------------------
# GPU (bf16, real sizes)
# ------------------------------------------------------------------------------------------------
def _exact_o(args):
    """Exact fp64 solve of the same (already rounded) inputs; o returned in fp64."""
    return ref.exact_recurrence(*[a.double() for a in args])[0]


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["random", "ill_conditioned"])
def test_gpu_bf16_accuracy_vs_exact(regime):
    """30 CG steps, bf16 inputs: o computed in fp32 (out_dtype) within 1e-3 of the exact solve; the
    default bf16 o within 1e-3 of the exact o rounded to bf16 (bf16 rounding alone is 1.7e-3 rms)."""
    from mesa_compile.ops.kernels import chunk_fwd

    kw = dict(corr=3.0, gate_bias=6.0, lamb=0.25) if regime == "ill_conditioned" else {}
    args = make_inputs(1, 1024, 4, 128, 128, torch.bfloat16, "cuda", state=False, **kw)
    o, x, *_ = chunk_fwd(*args, 64, 30, 0.0)
    o32 = chunk_fwd(*args, 64, 30, 0.0, out_dtype=torch.float32)[0]
    o_ex = _exact_o(args)
    assert torch.isfinite(o).all() and o.dtype == torch.bfloat16 and o32.dtype == torch.float32
    assert rel(o32, o_ex) <= 1e-3
    assert rel(o, o_ex.to(torch.bfloat16)) <= 1e-3
    assert rel(o.float(), o_ex) <= 2.5e-3


@pytest.mark.gpu
@pytest.mark.parametrize(
    "K,V", [(16, 16), (48, 80), (96, 96), (128, 64), (64, 256), (80, 256)]
)
def test_gpu_sizes_match_reference(K, V):
    from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd

    B, T, H = 2, 150, 2
    args = make_inputs(B, T, H, K, V, torch.bfloat16, "cuda")
    fwd = chunk_fwd(*args, 64, 30, 0.0)
    want = ref.chunk_fwd(*[a.double() for a in args], 64, 30, 0.0)
    assert rel(fwd[1], want[1]) <= 1e-4 and rel(fwd[0], want[0]) <= 4e-3
    do = torch.randn(B, T, H, V, device="cuda").bfloat16()
    dh = (torch.randn(B, H, K, K, device="cuda") / K, torch.randn(B, H, K, V, device="cuda") / K)
    got = chunk_bwd(*args, fwd[1], do, *dh, 64, 30, 0.0)
    want = ref.chunk_bwd(*[a.double() for a in args], fwd[1].double(), do.double(), *[d.double() for d in dh],
                         64, 30, 0.0)
    for name, a, b in zip(BWD_NAMES, got, want):
        lowp = name in ("dq", "dk", "dv")
        assert rel(a, b) <= (4e-3 if lowp else 2e-3), (name, rel(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("regime", ["random", "ill_conditioned"])
def test_gpu_bf16_gradients(regime):
    """Gradients from the kernels vs the fp64 reference with a converged adjoint solve: <= 2e-3
    (dq/dk/dv compared in fp32 before their bf16 rounding would add 1.7e-3)."""
    from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd

    kw = dict(corr=3.0, gate_bias=6.0, lamb=0.25) if regime == "ill_conditioned" else {}
    B, T, H, K = 1, 512, 2, 128
    args = make_inputs(B, T, H, K, K, torch.bfloat16, "cuda", state=False, **kw)
    _, x, *_ = chunk_fwd(*args, 64, 30, 0.0)
    do = torch.randn(B, T, H, K, device="cuda").bfloat16()
    dh = (torch.zeros(B, H, K, K, device="cuda"), torch.zeros(B, H, K, K, device="cuda"))
    got = chunk_bwd(*args, x, do, *dh, 64, 30, 0.0)
    a64 = [a.double() for a in args]
    x64 = ref.chunk_fwd(*a64, 64, 200, 0.0)[1]
    want = ref.chunk_bwd(*a64, x64, do.double(), *[d.double() for d in dh], 64, 200, 0.0)
    for name, a, b in zip(BWD_NAMES[:6], got, want):
        lowp = name in ("dq", "dk", "dv")
        assert rel(a, b) <= (3e-3 if lowp else 2e-3), (name, rel(a, b))


def test_occupancy_rule(monkeypatch):
    """The kernels' occupancy rule: per_sm programs per streaming multiprocessor on CUDA, always met off
    CUDA (the interpreter keeps the scans and the 64-tiles)."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from mesa_compile.ops.kernels.chunk_common import fills_device

    props = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _device: props)
    cuda = torch.device("cuda")
    assert fills_device(66, cuda, 0.5) and not fills_device(65, cuda, 0.5)
    assert fills_device(330, cuda, 2.5) and not fills_device(329, cuda, 2.5)
    assert fills_device(1, torch.device("cpu"), 2.5)


def test_large_keys_route_to_aten(monkeypatch):
    """The chunk kernels take K <= CHUNK_K_MAX; the ops run aten above it, and decode any K."""
    pytest.importorskip("triton")
    from mesa_compile.ops import kernels, library

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    small, large = torch.empty(1, 1, 1, kernels.CHUNK_K_MAX), torch.empty(1, 1, 1, kernels.CHUNK_K_MAX + 16)
    assert library._pick("chunk_fwd", small) is kernels.chunk_fwd
    assert library._pick("chunk_bwd", large) is ref.chunk_bwd
    assert library._pick("chunk_fwd", large) is ref.chunk_fwd
    assert library._pick("decode_step", large) is kernels.decode_step
    with pytest.raises(ValueError, match="K <= 128"):
        kernels.chunk_fwd(*make_inputs(1, 4, 1, 144, 16, torch.float32), 16, 2, 0.0)


@pytest.mark.gpu
def test_gpu_readout_scan_matches_state_pass_path():
    _check_readout_paths(_readout_paths("cuda"))


@pytest.mark.gpu
def test_gpu_upper_state_tiles():
    _check_upper_states(_upper_states("cuda"))


@pytest.mark.gpu
def test_gpu_long_sequence_no_nan():
    """T = 8192 with g = 0 (no forgetting): cond(H + lamb) grows with t; no NaN/Inf anywhere."""
    from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd

    B, T, H, K = 1, 8192, 2, 128
    args = make_inputs(B, T, H, K, K, torch.bfloat16, "cuda", state=False)
    args[3] = torch.zeros_like(args[3])
    fwd = chunk_fwd(*args, 64, 30, 0.0)
    assert all(torch.isfinite(t.float()).all() for t in fwd[:4])
    do = torch.randn(B, T, H, K, device="cuda").bfloat16()
    dh = (torch.zeros(B, H, K, K, device="cuda"), torch.zeros(B, H, K, K, device="cuda"))
    assert all(torch.isfinite(t.float()).all() for t in chunk_bwd(*args, fwd[1], do, *dh, 64, 30, 0.0))


@pytest.mark.gpu
def test_gpu_zero_steps_match_reference():
    """cg_steps = 0 returns the Jacobi guess x0 = q / diag(H_t + lamb) unrounded, and the backward's adjoint
    its own guess, so nothing after the CG prologue corrects them: the prologue's products (the diagonal
    takes its A operand from registers, benchmarks/wgmma_operands.py) are checked here directly. q* (fp32)
    within 1e-4 of the fp64 reference; o and gradients as in test_gpu_sizes_match_reference."""
    from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd

    B, T, H, K, V = 2, 300, 4, 128, 96
    args = make_inputs(B, T, H, K, V, torch.bfloat16, "cuda")
    fwd = chunk_fwd(*args, 64, 0, 0.0)
    a64 = [a.double() for a in args]
    want = ref.chunk_fwd(*a64, 64, 0, 0.0)
    assert rel(fwd[1], want[1]) <= 1e-4 and rel(fwd[0], want[0]) <= 4e-3
    assert (fwd[4] == 0).all()
    do = torch.randn(B, T, H, V, device="cuda").bfloat16()
    dh = (torch.randn(B, H, K, K, device="cuda") / K, torch.randn(B, H, K, V, device="cuda") / K)
    got = chunk_bwd(*args, fwd[1], do, *dh, 64, 0, 0.0)
    want = ref.chunk_bwd(*a64, fwd[1].double(), do.double(), *[d.double() for d in dh], 64, 0, 0.0)
    for name, a, b in zip(BWD_NAMES, got, want):
        assert rel(a, b) <= (4e-3 if name in ("dq", "dk", "dv") else 2e-3), (name, rel(a, b))


def _public_op_on_raw_keys(device, B, T, H, K):
    """mesa_net on raw (unnormalised) bf16 q, k with ill-conditioned keys (3 u + noise, one u per head,
    g = logsigmoid(N(6, 1)), lamb = 0.25) against mesa_net_exact of the same bf16 inputs in fp64, which
    normalises in fp64: o within 1e-3 of the exact o rounded to bf16; final states (fp32) within 1e-4 (keys
    normalised and rounded to bf16 would leave ~2.5e-3, tests/test_ops_forward.py); gradients as in
    test_gpu_bf16_gradients."""
    from mesa_compile.ops import mesa_net

    q = torch.randn(B, T, H, K, device=device)
    k = 3 * torch.randn(1, 1, H, K, device=device) + torch.randn(B, T, H, K, device=device)
    v = torch.randn(B, T, H, K, device=device)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 6.0).requires_grad_()
    beta = torch.sigmoid(torch.randn(B, T, H, device=device)).requires_grad_()
    lamb = torch.full((H, K), 0.25, device=device, requires_grad=True)
    leaves = (q, k, v, g, beta, lamb)
    out = mesa_net(*leaves, cg_steps=30, output_final_state=True)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    exact = mesa_net_exact(*exact_leaves)
    assert out.o.dtype == torch.bfloat16
    assert rel(out.o, exact.o.to(torch.bfloat16)) <= 1e-3
    assert rel(out.final_state.h_kk, exact.final_state.h_kk) <= 1e-4
    assert rel(out.final_state.h_kv, exact.final_state.h_kv) <= 1e-4
    do = torch.randn_like(out.o)
    got = torch.autograd.grad(out.o, leaves, do)
    want = torch.autograd.grad(exact.o, exact_leaves, do.double())
    for name, a, b in zip(BWD_NAMES[:6], got, want):
        assert rel(a, b) <= (3e-3 if name in ("dq", "dk", "dv") else 2e-3), (name, rel(a, b))


@pytest.mark.gpu
def test_gpu_public_op_on_raw_bf16_keys():
    """The op folds the keys' norm into beta and v, so its kernels read the raw bf16 keys (ops/api.py)."""
    _public_op_on_raw_keys("cuda", 1, 512, 2, 128)


@pytest.mark.gpu
def test_gpu_runs_repeat_bit_for_bit():
    """The kernels use no atomics and reduce in a fixed order, so repeated runs on the same inputs give the
    same bits; a product corrupted by a register reused before its asynchronous wgmma read it (ptxas before
    CUDA 13.3, benchmarks/wgmma_operands.py) depends on timing and would show as a difference. The
    benchmark's shape (B=8 T=2048 H=16 K=V=128, bf16), 10 CG steps, forward and backward 4 times each."""
    from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd

    B, T, H, K = 8, 2048, 16, 128
    args = make_inputs(B, T, H, K, K, torch.bfloat16, "cuda")
    do = torch.randn(B, T, H, K, device="cuda").bfloat16()
    dh = (torch.randn(B, H, K, K, device="cuda") / K, torch.randn(B, H, K, K, device="cuda") / K)
    first_fwd = chunk_fwd(*args, 64, 10, 0.0)
    first_bwd = chunk_bwd(*args, first_fwd[1], do, *dh, 64, 10, 0.0)
    for _ in range(3):
        fwd = chunk_fwd(*args, 64, 10, 0.0)
        bwd = chunk_bwd(*args, first_fwd[1], do, *dh, 64, 10, 0.0)
        for name, a, b in zip(FWD_NAMES + BWD_NAMES, fwd + bwd, first_fwd + first_bwd):
            assert torch.equal(a, b), name


if __name__ == "__main__":
    _run_cases(sys.argv[1])
