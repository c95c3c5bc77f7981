"""Chunkwise MesaNet kernels vs flash-linear-attention (fla) on one GPU: forward and forward+backward.

Writes <out>/bench_ops.json and <out>/bench_ops.md (one process, card name, torch/triton versions).
Ours: mesa_compile.ops.kernels.chunk_fwd / chunk_bwd on pre-normalised q, k. fla: chunk_mesa_net on
the same pre-normalised q, k (use_qk_l2norm_in_kernel=False: kernels against kernels), and with its
in-kernel L2-norm on raw q, k (as fla users call it); our op's L2-norm is an aten step, timed apart.
"our op" is the public `mesa_net` in eager on raw q, k, as users call it: it normalises q and folds the
keys' norm into beta and v (ops/api.py), so its kernels read the raw keys and fp32 values.
Our kernels are called as the mesa:: ops call them in eager (no HOP dispatch per launch).
Also: forward with early exit (cg_tol = 1e-4, at most 30 steps) and its mean CG steps, a breakdown
of our forward and backward into kernels, and accuracy against the exact solve.
Usage: python benchmarks/bench_ops.py [--out DIR] [--quick | --shape B,T,H,D ...]
The breakdown is timed on the first shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch._library.triton import set_wrap_triton_enabled  # what torch.library.triton_op does in eager
from triton.testing import do_bench

from mesa_compile.ops import mesa_net
from mesa_compile.ops import reference as ref
from mesa_compile.ops.api import _prepare_chunk_inputs as prepare_chunk_inputs
from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd
from mesa_compile.ops.kernels.chunk_cg import chunk_len, launch_chunk_cg
from mesa_compile.ops.kernels.chunk_output import (adjoint_scans, chunk_readout, chunk_readout_adjoint,
                                                    h_states_with_g)
from mesa_compile.ops.kernels.chunk_states import StatePass, chunk_state_passes

NAN = float("nan")


def make(B, T, H, D, device="cuda"):
    q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 3.0)
    beta = torch.rand(B, T, H, device=device)
    lamb = torch.rand(H, D, device=device) + 0.25
    return q, k, v, g, beta, lamb


def ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def breakdown(qn, kn, v, g, beta, lamb, do, steps):
    """Time of each launch of our forward and backward as chunk_fwd / chunk_bwd run them, at the chunk
    length the CG kernels pick (the read-out kernels use their own, READOUT_CHUNKS)."""
    B, T, H, K = qn.shape
    C = chunk_len(64, K)
    z = torch.zeros(B, H, K, K, device="cuda")
    zkv = torch.zeros(B, H, K, v.shape[-1], device="cuda")
    res = {"chunk": C}
    # the forward's state passes: H (upper tiles), with the read-out's G in the same launch
    res["states_H_G_ms"] = ms(lambda: h_states_with_g(kn, v, g, beta, z, zkv, C, False, True))
    hs, h_upper, _, g_states = h_states_with_g(kn, v, g, beta, z, zkv, C, False, True)
    x = torch.empty(B, T, H, K, device="cuda")
    o = torch.empty_like(v)
    st = torch.empty(B, T, H, device="cuda", dtype=torch.int32)
    for n in (0, steps):
        res[f"cg_steps{n}_ms"] = ms(lambda: launch_chunk_cg(qn, kn, g, beta, lamb, hs, x, st, x, g, lamb, C, n,
                                                            0.0, False, h_upper=h_upper))
    res["readout_ms"] = ms(lambda: chunk_readout(x, kn, v, g, beta, zkv, o, False, states=g_states))
    _, xq, *_ = chunk_fwd(qn, kn, v, g, beta, lamb, z, zkv, C, steps, 0.0)
    res["bwd_ms"] = ms(lambda: chunk_bwd(qn, kn, v, g, beta, lamb, z, zkv, xq, do, z, zkv, C, steps, 0.0))
    u = torch.empty_like(x)
    dc = torch.empty(B, T, H, device="cuda")
    dl = torch.empty(B, triton.cdiv(T, C), H, K, device="cuda")
    dx = torch.empty_like(x)
    # the adjoint's right-hand side by the path the backward picks (scan, or the forward's G states)
    scan = adjoint_scans(kn, v)
    res["bwd_rhs_ms"] = ms(lambda: chunk_readout_adjoint(do, kn, v, g, beta, zkv, dx, False, scan=scan,
                                                         states=None if scan else g_states))
    res["bwd_cg_ms"] = ms(lambda: launch_chunk_cg(dx, kn, g, beta, lamb, hs, xq, dc, u, dc, dl, C,
                                                  steps, 0.0, True, h_upper=h_upper))
    rev_passes = [StatePass(u, xq, z, -1.0), StatePass(xq, do, zkv)]
    res["bwd_states_rev_ms"] = ms(lambda: chunk_state_passes(rev_passes, g, beta, C, True, False))
    # the launchers called outside the ops, every launch through the HOP dispatch (how this script
    # timed before round 6 of benchmarks/NOTES-kernels.md)
    with set_wrap_triton_enabled(True):
        res["fwd_hop_dispatch_ms"] = ms(lambda: chunk_fwd(qn, kn, v, g, beta, lamb, z, zkv, C, steps, 0.0))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--quick", action="store_true", help="the first shape only")
    ap.add_argument("--shape", action="append", default=[], metavar="B,T,H,D",
                    help="time this shape (repeatable) instead of the default list")
    a = ap.parse_args()
    # Our kernels launch as the mesa:: ops launch them in eager (torch.library.triton_op turns the
    # wrap_triton HOP dispatch off for real tensors); through the HOP every launch costs host time.
    with set_wrap_triton_enabled(False):
        run(a)


def run(a):
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from fla.ops.mesa_net import chunk_mesa_net
    except ImportError:
        chunk_mesa_net = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit, fla=chunk_mesa_net is not None)
    rows, acc, parts = [], [], {}
    # the last shape: few (batch, head) pairs and a long sequence, where the read-out scans have the least
    # parallelism (2 programs per pair)
    shapes = [(8, 2048, 16, 128), (4, 4096, 16, 128), (8, 2048, 16, 64), (1, 8192, 4, 128)]
    if a.shape:
        shapes = [tuple(int(n) for n in s.split(",")) for s in a.shape]
    elif a.quick:
        shapes = shapes[:1]
    for B, T, H, D in shapes:
        torch.manual_seed(0)
        q, k, v, g, beta, lamb = make(B, T, H, D)
        qn, kn = ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()
        z = torch.zeros(B, H, D, D, device="cuda")
        do = torch.randn_like(v)
        for steps, tol in ((30, 0.0), (10, 0.0), (30, 1e-4)):
            row = dict(B=B, T=T, H=H, D=D, cg=steps, cg_tol=tol)
            row["l2norm_ms"] = ms(lambda: (ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()))
            row["ours_fwd_ms"] = ms(lambda: chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, tol))
            row["ours_mean_steps"] = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, tol)[4].float().mean().item()

            def ours_fb():
                o, x, *_ = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, tol)
                chunk_bwd(qn, kn, v, g, beta, lamb, z, z, x, do, z, z, 64, steps, tol)

            if tol == 0.0:
                row["ours_fwdbwd_ms"] = ms(ours_fb)
                row["op_fwd_ms"] = ms(lambda: mesa_net(q, k, v, g, beta, lamb, cg_steps=steps))
                op_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]

                def op_fb():
                    mesa_net(*op_leaves, cg_steps=steps).o.backward(do)

                row["op_fwdbwd_ms"] = ms(op_fb)
            if chunk_mesa_net is not None and tol == 0.0:
                for tag, qq, kk, norm in (("", qn, kn, False), ("l2_", q, k, True)):
                    row[f"fla_{tag}fwd_ms"] = ms(lambda: chunk_mesa_net(qq, kk, v, g, beta, lamb, max_CG_iteration=steps,
                                                                        use_qk_l2norm_in_kernel=norm))
                    leaves = [t.detach().clone().requires_grad_() for t in (qq, kk, v, g, beta, lamb)]

                    def fla_fb():
                        o = chunk_mesa_net(*leaves, max_CG_iteration=steps, use_qk_l2norm_in_kernel=norm)[0]
                        o.backward(do)

                    row[f"fla_{tag}fwdbwd_ms"] = ms(fla_fb)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(out, meta, rows, acc, parts)
        if (B, T, H, D) == shapes[0]:
            # what the op adds in eager around its kernels at any step count: q's norm and the keys' norm
            # folded into beta and v before them, the fp32 o rounded to v's dtype after them
            o32 = torch.empty(v.shape, device="cuda")
            op_aten = {"op_prep_ms": ms(lambda: prepare_chunk_inputs(q, k, v, beta, True)),
                       "op_o_cast_ms": ms(lambda: o32.to(v.dtype))}
            for steps in (30, 10):
                parts[steps] = {**breakdown(qn, kn, v, g, beta, lamb, do, steps), **op_aten}
                print(json.dumps(parts[steps]), flush=True)
            write(out, meta, rows, acc, parts)
    # accuracy vs the exact solve (random and ill-conditioned keys), bf16, 30 and 10 steps
    for corr, bias in ((0.0, 3.0), (3.0, 6.0)):
        torch.manual_seed(0)
        B, T, H, D = 1, 1024, 4, 128
        q, k, v, g, beta, lamb = make(B, T, H, D)
        u = torch.randn(1, 1, H, D, device="cuda")
        k = (corr * u + torch.randn_like(k.float())).bfloat16()
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + bias)
        lamb = torch.full_like(lamb, 0.25)
        qn, kn = ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()
        z = torch.zeros(B, H, D, D, device="cuda")
        exact = ref.exact_recurrence(qn.double(), kn.double(), v.double(), g.double(), beta.double(),
                                     lamb.double(), z.double(), z.double())[0]
        r = dict(corr=corr, gate_bias=bias, bf16_rounding=relerr(exact.bfloat16(), exact))
        for steps in (30, 10):
            o, *_ = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, 0.0)
            r[f"ours_{steps}"] = relerr(o, exact)
            r[f"ours_{steps}_vs_rounded"] = relerr(o, exact.bfloat16(), exact)
            o32 = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, 0.0, out_dtype=torch.float32)[0]
            r[f"ours_fp32_out_{steps}"] = relerr(o32, exact)
            if chunk_mesa_net is not None:
                r[f"fla_{steps}"] = relerr(chunk_mesa_net(qn, kn, v, g, beta, lamb, max_CG_iteration=steps)[0], exact)
        acc.append(r)
        print(json.dumps(r), flush=True)
    write(out, meta, rows, acc, parts)


def relerr(a, b, scale=None):
    return ((a.double() - b.double()).norm() / (b if scale is None else scale).double().norm()).item()


def write(out, meta, rows, acc, parts):
    """JSON + markdown tables (rewritten after every stage, so a cut-off run still leaves results)."""
    (out / "bench_ops.json").write_text(json.dumps(dict(meta=meta, timings=rows, accuracy=acc, breakdown=parts),
                                                   indent=1))
    lines = [f"# bench_ops: {meta['card']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
             "", "times in ms (medians); fla on the same pre-normalised q, k, and fla+l2 with its in-kernel norm", "",
             "| B | T | H | D | CG | cg_tol | mean steps | ours fwd | fla fwd | fla+l2 fwd | ours fwd+bwd | fla fwd+bwd "
             "| fla+l2 fwd+bwd | our l2norm | our op fwd | our op fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r.get(c, NAN):.2f}" for c in ("ours_fwd_ms", "fla_fwd_ms", "fla_l2_fwd_ms", "ours_fwdbwd_ms",
                                                  "fla_fwdbwd_ms", "fla_l2_fwdbwd_ms")]
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['cg']} | {r['cg_tol']:g} | "
                     f"{r['ours_mean_steps']:.1f} | " + " | ".join(cells) + f" | {r['l2norm_ms']:.3f} | "
                     f"{r.get('op_fwd_ms', NAN):.2f} | {r.get('op_fwdbwd_ms', NAN):.2f} |")
    for steps, p in parts.items():
        lines += ["", f"breakdown, first shape, {steps} CG steps (ms): "
                  + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in p.items() if k.endswith("_ms"))]
    lines += ["", "accuracy: rel. error of o vs the exact fp64 solve; ours bf16 o (vs the exact o rounded to bf16 "
              "in ()), ours with o kept in fp32, fla (bf16 o)", "",
              "| key corr | gate bias | CG | ours bf16 o | ours fp32 o | fla | bf16 rounding |",
              "|---|---|---|---|---|---|---|"]
    for r in acc:
        for st in (30, 10):
            lines.append(f"| {r['corr']} | {r['gate_bias']} | {st} | {r[f'ours_{st}']:.2e} "
                         f"({r[f'ours_{st}_vs_rounded']:.2e}) | {r[f'ours_fp32_out_{st}']:.2e} | "
                         f"{r.get(f'fla_{st}', NAN):.2e} | {r['bf16_rounding']:.2e} |")
    (out / "bench_ops.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
