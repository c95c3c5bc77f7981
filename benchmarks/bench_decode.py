"""Fused one-token decode step vs flash-linear-attention's (fla) mesa_net_decoding_one_step on one GPU.

Writes <out>/bench_decode.json and <out>/bench_decode.md (one process: card name, torch/triton versions,
commit). Inputs: bf16 q/k/v (q, k L2-normalised), fp32 gates, lambda and states, H = 16, K = V = 128.
Timings: "eager" = triton.testing.do_bench medians of back-to-back calls (CUDA events, launch included,
like the fla baseline; wrap_triton's tracing HOP disabled as torch.library.triton_op does in eager, it
costs ~0.5 ms a call); "graph" = device time per call from CUDA-graph replays (no host overhead).
``state copy`` is a device-to-device copy of both states (read + write once): the bandwidth floor.
Accuracy: relative L2 error of o (and q*) against an fp64 torch.linalg.solve of the same inputs.

    python benchmarks/bench_decode.py --out DIR [--sweep]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled  # what torch.library.triton_op does in eager
from triton.testing import do_bench

from mesa_compile.ops import reference as ref
from mesa_compile.ops.kernels import decode_step

H, K, V = 16, 128, 128


def make_inputs(B: int, *, dtype=torch.bfloat16, corr: float = 0.0, device="cuda"):
    """Random decode inputs; states as left by 4K earlier tokens (PSD h_kk); corr > 0 correlates keys."""
    u = torch.randn(1, H, 1, K, device=device)
    keys = ref.l2_normalize(corr * u + torch.randn(B, H, 4 * K, K, device=device))
    h_kk = keys.transpose(-1, -2) @ keys * 0.5  # (B, H, K, K)
    h_kv = keys.transpose(-1, -2) @ torch.randn(B, H, 4 * K, V, device=device) * 0.1  # (B, H, K, V)
    q = ref.l2_normalize(torch.randn(B, H, K, device=device)).to(dtype)
    k = ref.l2_normalize(corr * u[:, :, 0] + torch.randn(B, H, K, device=device)).to(dtype)
    v = torch.randn(B, H, V, device=device).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, H, device=device) + 3.0)
    beta = torch.sigmoid(torch.randn(B, H, device=device))
    lamb = torch.full((H, K), 0.25, device=device) if corr > 0 else torch.rand(H, K, device=device) + 0.25
    return [q, k, v, g, beta, lamb, h_kk.contiguous(), h_kv.contiguous()]


def exact(args):
    """fp64 linalg.solve of the same inputs: (o, q_star)."""
    q, k, v, g, beta, lamb, h_kk, h_kv = [a.double() for a in args]
    gamma, bt = g.exp()[..., None, None], beta[..., None, None]
    hkk = gamma * h_kk + bt * k[..., :, None] * k[..., None, :]
    hkv = gamma * h_kv + bt * k[..., :, None] * v[..., None, :]
    x = torch.linalg.solve(hkk + torch.diag_embed(lamb).expand_as(hkk), q[..., None])[..., 0]
    return torch.einsum("bhkv,bhk->bhv", hkv, x), x


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def us(fn) -> float:
    """Eager: do_bench median over back-to-back calls (host launch overhead included where it dominates)."""
    with set_wrap_triton_enabled(False):
        return 1e3 * do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_us(fn, n: int = 10) -> float:
    """Device time per call: n calls captured in one CUDA graph, replays timed with do_bench."""
    with set_wrap_triton_enabled(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        return 1e3 * do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / n


def compiled_resources() -> list[dict]:
    """Registers / spills / warps / constexprs of every compiled decode kernel (triton's in-process cache)."""
    from mesa_compile.ops.kernels.decode import _decode_step_fwd_kernel as kern

    out = []
    try:
        for cache in kern.device_caches.values():
            for key, ck in cache[0].items():
                ck._init_handles()
                out.append(dict(key=str(key)[-160:], n_regs=ck.n_regs, n_spills=ck.n_spills,
                                num_warps=ck.metadata.num_warps))
    except Exception as exc:  # the cache layout differs between triton versions: report, don't fail
        out.append(dict(error=repr(exc)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sweep", action="store_true", help="also time tile chunking x num_warps variants")
    opts = ap.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        from fla.ops.mesa_net import mesa_net_decoding_one_step as fla_step
    except ImportError:
        fla_step = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit, fla=fla_step is not None, H=H, K=K, V=V)
    print(json.dumps(meta), flush=True)

    def fla(args, steps):
        q, k, v, g, beta, lamb, h_kk, h_kv = args
        return fla_step(q, k, v, g, lamb, beta, h_kk, h_kv, max_CG_iteration=steps)

    acc, rows, sweep = [], [], []
    for corr in (0.0, 3.0):  # accuracy, 30 steps: random and correlated keys (cond in the hundreds)
        args = make_inputs(16, corr=corr)
        o_ex, x_ex = exact(args)
        o, x, *_ = decode_step(*args, 30, 0.0)
        r = dict(corr=corr, ours_o=rel(o, o_ex), ours_q_star=rel(x, x_ex),
                 bf16_rounding=rel(o_ex.to(torch.bfloat16), o_ex))
        if fla_step is not None:
            r["fla_o"] = rel(fla(args, 30)[0], o_ex)
        acc.append(r)
        print(json.dumps(r), flush=True)

    for B in (1, 16, 128):
        args = make_inputs(B)
        for steps in (30, 10):
            row = dict(B=B, cg=steps, ours_us=us(lambda: decode_step(*args, steps, 0.0)),
                       ours_graph_us=graph_us(lambda: decode_step(*args, steps, 0.0)))
            row["ours_tol1e-4_graph_us"] = graph_us(lambda: decode_step(*args, steps, 1e-4))
            row["tol1e-4_mean_steps"] = decode_step(*args, steps, 1e-4)[4].float().mean().item()
            if fla_step is not None:
                row["fla_us"] = us(lambda: fla(args, steps))
                row["fla_graph_us"] = graph_us(lambda: fla(args, steps))
            row["copy_graph_us"] = graph_us(lambda: (args[6].clone(), args[7].clone()))
            rows.append(row)
            print(json.dumps(row), flush=True)
        if opts.sweep:
            for cols, nw in [(16, 8), (32, 8), (64, 8), (128, 8), (16, 16), (32, 16)]:
                t = graph_us(lambda: decode_step(*args, 30, 0.0, num_warps=nw, cols=cols))
                sweep.append(dict(B=B, cols=cols, num_warps=nw, graph_us=t))
                print(json.dumps(sweep[-1]), flush=True)
            if B == 1:
                t = graph_us(lambda: decode_step(*args, 30, 0.0, num_splits=1))
                sweep.append(dict(B=B, cols=32, num_warps=8, num_splits=1, graph_us=t))
                print(json.dumps(sweep[-1]), flush=True)
            sweep.append(dict(B=B, cg=0, graph_us=graph_us(lambda: decode_step(*args, 0, 0.0))))
            print(json.dumps(sweep[-1]), flush=True)

    kernels = compiled_resources()
    print(json.dumps(kernels), flush=True)
    (opts.out / "bench_decode.json").write_text(json.dumps(dict(meta=meta, timings=rows, accuracy=acc,
                                                                 sweep=sweep, kernels=kernels), indent=1))
    nan = float("nan")
    lines = [f"Card: {meta['card']}; torch {meta['torch']}, triton {meta['triton']}, commit {commit}; "
             f"H={H} K=V={K}, bf16 q/k/v, fp32 states; do_bench medians (us).", "",
             "| B | CG | ours eager us | fla eager us | speedup eager | ours graph us | fla graph us | "
             "speedup graph | ours graph, cg_tol=1e-4 (mean steps) | state copy graph us |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f_e, f_g = r.get("fla_us", nan), r.get("fla_graph_us", nan)
        lines.append(f"| {r['B']} | {r['cg']} | {r['ours_us']:.1f} | {f_e:.1f} | {f_e / r['ours_us']:.2f}x | "
                     f"{r['ours_graph_us']:.1f} | {f_g:.1f} | {f_g / r['ours_graph_us']:.2f}x | "
                     f"{r['ours_tol1e-4_graph_us']:.1f} ({r['tol1e-4_mean_steps']:.1f}) | {r['copy_graph_us']:.1f} |")
    lines += ["", "| key corr | ours o rel err | ours q* rel err | bf16 rounding of exact o | fla o rel err |",
              "|---|---|---|---|---|"]
    for r in acc:
        lines.append(f"| {r['corr']} | {r['ours_o']:.2e} | {r['ours_q_star']:.2e} | {r['bf16_rounding']:.2e} | "
                     f"{r.get('fla_o', nan):.2e} |")
    lines += ["", "Compiled kernels: " + "; ".join(
        f"{k.get('n_regs')} regs, {k.get('n_spills')} spill B, {k.get('num_warps')} warps" for k in kernels)]
    if sweep:
        lines += ["", "| B | cols | num_warps | num_splits | graph us (30 CG) |", "|---|---|---|---|---|"]
        lines += [f"| {s['B']} | {s.get('cols', '-')} | {s.get('num_warps', '-')} | "
                  f"{s.get('num_splits', 'default' if 'cols' in s else 'cg=0')} | {s['graph_us']:.1f} |"
                  for s in sweep]
    (opts.out / "bench_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
