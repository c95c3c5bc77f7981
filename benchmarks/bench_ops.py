"""Chunkwise MesaNet kernels vs flash-linear-attention (fla) on one GPU: forward and forward+backward.

Writes <out>/bench_ops.json and <out>/bench_ops.md (one process, card name, torch/triton versions).
Ours: mesa_compile.ops.kernels.chunk_fwd / chunk_bwd on pre-normalised q, k (the op's L2-norm is
a separate cheap aten step, timed apart as "l2norm"); fla: chunk_mesa_net with its in-kernel L2-norm.
Usage: python benchmarks/bench_ops.py [--out DIR] [--quick]
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
from triton.testing import do_bench

from mesa_compile.ops import reference as ref
from mesa_compile.ops.kernels import chunk_bwd, chunk_fwd
from mesa_compile.ops.kernels.chunk_cg import _chunk_cg_kernel, launch_chunk_cg
from mesa_compile.ops.kernels.chunk_states import chunk_state_pass


def make(B, T, H, D, device="cuda"):
    q = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, T, H, D, device=device, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + 3.0)
    beta = torch.rand(B, T, H, device=device)
    lamb = torch.rand(H, D, device=device) + 0.25
    return q, k, v, g, beta, lamb


def fwd_variant(q, k, v, g, beta, lamb, h_kk, h_kv, C, steps, warps, refresh):
    """chunk_fwd (mixed-precision CG) with an explicit warp count and residual-refresh period."""
    B, T, H, K = q.shape
    hs, _ = chunk_state_pass(k, k, g, beta, h_kk, C, False, 1.0, False)
    gs, _ = chunk_state_pass(k, v, g, beta, h_kv, C, False, 1.0, False)
    x = torch.empty(B, T, H, K, device=q.device)
    o = torch.empty_like(v)
    st = torch.empty(B, T, H, device=q.device, dtype=torch.int32)
    launch_chunk_cg(q, k, v, g, beta, lamb, hs, gs, x, o, st, o, x, g, lamb, C, steps, 0.0, False, warps,
                    mixed=True, refresh=refresh)
    return o


def ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--quick", action="store_true", help="one shape only")
    a = ap.parse_args()
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
    rows, acc = [], []
    shapes = [(8, 2048, 16, 128)] if a.quick else [(8, 2048, 16, 128), (4, 4096, 16, 128), (8, 2048, 16, 64)]
    inputs = {}
    for B, T, H, D in shapes:
        q, k, v, g, beta, lamb = make(B, T, H, D)
        qn, kn = ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()
        z = torch.zeros(B, H, D, D, device="cuda")
        do = torch.randn_like(v)
        inputs[(B, T, H, D)] = (q, k, v, g, beta, lamb, do)
        for steps in (30, 10):
            row = dict(B=B, T=T, H=H, D=D, cg=steps)
            row["l2norm_ms"] = ms(lambda: (ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()))
            for tag, mixed in (("", True), ("acc_", False)):
                row[f"ours_{tag}fwd_ms"] = ms(lambda: chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, 0.0,
                                                                mixed=mixed))

                def ours_fb():
                    o, x, *_ = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, 0.0, mixed=mixed)
                    chunk_bwd(qn, kn, v, g, beta, lamb, z, z, x, do, z, z, 64, steps, 0.0, mixed=mixed)

                row[f"ours_{tag}fwdbwd_ms"] = ms(ours_fb)
            if (B, T, H, D) == shapes[0]:
                row["ours_fwd_refresh5_ms"] = ms(lambda: fwd_variant(qn, kn, v, g, beta, lamb, z, z, 64, steps, 8, 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(out, meta, rows, acc)
    # accuracy vs the exact solve (random and ill-conditioned keys), bf16, 30 steps
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
            for tag, mixed in (("", True), ("acc_", False)):
                o, *_ = chunk_fwd(qn, kn, v, g, beta, lamb, z, z, 64, steps, 0.0, mixed=mixed)
                r[f"ours_{tag}{steps}"] = relerr(o, exact)
                r[f"ours_{tag}{steps}_vs_rounded"] = relerr(o, exact.bfloat16(), exact)
            if chunk_mesa_net is not None:
                r[f"fla_{steps}"] = relerr(chunk_mesa_net(qn, kn, v, g, beta, lamb, max_CG_iteration=steps)[0], exact)
        acc.append(r)
        print(json.dumps(r), flush=True)
    meta["cg_kernel_resources"] = [
        dict(n_regs=getattr(kern, "n_regs", None), n_spills=getattr(kern, "n_spills", None))
        for dev_cache in getattr(_chunk_cg_kernel, "device_caches", {}).values() for kern in dev_cache[0].values()]
    write(out, meta, rows, acc)
    if chunk_mesa_net is None:
        return
    for row in rows:
        q, k, v, g, beta, lamb, do = inputs[(row["B"], row["T"], row["H"], row["D"])]
        steps = row["cg"]
        row["fla_fwd_ms"] = ms(lambda: chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=steps,
                                                      use_qk_l2norm_in_kernel=True))
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]

        def fla_fb():
            o = chunk_mesa_net(*leaves, max_CG_iteration=steps, use_qk_l2norm_in_kernel=True)[0]
            o.backward(do)

        row["fla_fwdbwd_ms"] = ms(fla_fb)
        print(json.dumps(row), flush=True)
        write(out, meta, rows, acc)


def relerr(a, b, scale=None):
    return ((a.double() - b.double()).norm() / (b if scale is None else scale).double().norm()).item()


def write(out, meta, rows, acc):
    """JSON + markdown table (rewritten after every stage, so a cut-off run still leaves results)."""
    (out / "bench_ops.json").write_text(json.dumps(dict(meta=meta, timings=rows, accuracy=acc), indent=1))
    nan = float("nan")
    lines = [f"# bench_ops: {meta['card']}, torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
             "", "ours = mixed-precision CG (fp16 matvecs, accurate residual every 8 steps); acc = all 3-pass", "",
             "| B | T | H | D | CG | ours fwd | acc fwd | refresh-5 fwd | fla fwd | ours fwd+bwd | acc fwd+bwd "
             "| fla fwd+bwd | l2norm |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r.get(c, nan):.2f}" for c in ("ours_fwd_ms", "ours_acc_fwd_ms", "ours_fwd_refresh5_ms",
                                                  "fla_fwd_ms", "ours_fwdbwd_ms", "ours_acc_fwdbwd_ms",
                                                  "fla_fwdbwd_ms")]
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | {r['D']} | {r['cg']} | " + " | ".join(cells)
                     + f" | {r['l2norm_ms']:.3f} |")
    lines += ["", "times in ms; accuracy: rel. error of o vs the exact fp64 solve (vs its bf16 rounding in ())", "",
              "| key corr | gate bias | CG | ours | acc | fla | bf16 rounding |", "|---|---|---|---|---|---|---|"]
    for r in acc:
        for st in (30, 10):
            lines.append(f"| {r['corr']} | {r['gate_bias']} | {st} | {r[f'ours_{st}']:.2e} "
                         f"({r[f'ours_{st}_vs_rounded']:.2e}) | {r[f'ours_acc_{st}']:.2e} "
                         f"({r[f'ours_acc_{st}_vs_rounded']:.2e}) | {r.get(f'fla_{st}', nan):.2e} | "
                         f"{r['bf16_rounding']:.2e} |")
    (out / "bench_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
