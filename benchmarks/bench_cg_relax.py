"""The CG kernel's relaxed matvecs (chunk_cg.py NOTE): time and accuracy against the relaxation threshold.

Times `launch_chunk_cg` alone (bench_vs_commit.cg_alone) at several `relax` values, 10 and 30 steps,
inputs like bench_ops.py's (B=8 T=2048 H=16 K=V=128 bf16), with q* of each against relax = 0 (every
lo pass; the kernel compiles to the code it had before relaxation); then the relative error of o (fp32)
against the exact fp64 solve on random, cond ~400 and cond ~850 heads (B=1 T=1024 H=4), each relax
value through chunk_fwd. One process, one card. Writes <out>/bench_cg_relax.json and .md.
Usage: python benchmarks/bench_cg_relax.py [--out DIR]
       python benchmarks/bench_cg_relax.py --check   (tiny shapes, accuracy only; CPU with
       TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench_ops import relerr  # benchmarks/ is on the path as the script's directory
from bench_vs_commit import cg_alone, make
from mesa_compile.ops import kernels
from mesa_compile.ops import reference as ref

RELAXES = (0.0, 1e-3, 1e-2, 1.0)
REGIMES = {"random": {}, "cond ~400": dict(corr=3.0, gate_bias=6.0, lamb=0.25),
           "cond ~850": dict(corr=6.0, gate_bias=8.0, lamb=0.25)}


def timings(shape: tuple) -> dict:
    from triton.testing import do_bench

    torch.manual_seed(0)
    q, k, _, g, beta, lamb = make(*shape, "cuda")
    res = {}
    for steps in (10, 30):
        xs = {}
        for relax in RELAXES:
            launch, x = cg_alone(kernels, q, k, g, beta, lamb, steps, relax=relax)
            res[f"cg{steps}_relax{relax:g}_ms"] = do_bench(launch, warmup=25, rep=100, return_mode="median")
            launch()
            xs[relax] = x
            res[f"cg{steps}_relax{relax:g}_qstar_vs_relax0"] = relerr(x, xs[0.0])
        print(json.dumps({key: val for key, val in res.items() if key.startswith(f"cg{steps}_")}), flush=True)
    return res


def accuracy(device: str, shape: tuple) -> dict:
    """o (fp32) against the exact solve at each relax value."""
    res = {}
    for name, kw in REGIMES.items():
        torch.manual_seed(0)
        q, k, v, g, beta, lamb = make(*shape, device, **kw)
        z = torch.zeros(shape[0], shape[2], shape[3], shape[3], device=device)
        exact = ref.exact_recurrence(*(t.double() for t in (q, k, v, g, beta, lamb, z, z)))[0]
        for relax in RELAXES:
            for steps in (10, 30):
                o = kernels.chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps, 0.0, out_dtype=torch.float32,
                                      relax=relax)[0]
                res[f"{name}|{relax:g}|{steps}"] = relerr(o, exact)
        print(json.dumps({key: val for key, val in res.items() if key.startswith(name)}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--check", action="store_true",
                    help="tiny shapes, accuracy only (CPU interpreter or GPU)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = dict(card=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__)
    if a.check:
        result = dict(meta=meta, accuracy=accuracy(device, (1, 70, 2, 32)))
    else:
        # our kernels launched as the mesa:: ops launch them in eager (no HOP dispatch per launch)
        from torch._library.triton import set_wrap_triton_enabled

        with set_wrap_triton_enabled(False):
            result = dict(meta=meta, timings=timings((8, 2048, 16, 128)),
                          accuracy=accuracy(device, (1, 1024, 4, 128)))
    (out / "bench_cg_relax.json").write_text(json.dumps(result, indent=1))
    lines = [f"# bench_cg_relax: {meta['card']}, torch {meta['torch']}", ""]
    if "timings" in result:
        t = result["timings"]
        lines += ["CG kernel alone, B=8 T=2048 H=16 K=V=128 bf16, ms (q* vs relax 0)", "",
                  "| relax | 10 steps | 30 steps | per step (30 - 10) / 20, us |", "|---|---|---|---|"]
        for relax in RELAXES:
            c10, c30 = t[f"cg10_relax{relax:g}_ms"], t[f"cg30_relax{relax:g}_ms"]
            d10, d30 = t[f"cg10_relax{relax:g}_qstar_vs_relax0"], t[f"cg30_relax{relax:g}_qstar_vs_relax0"]
            per_step = (c30 - c10) * 50  # us
            lines.append(f"| {relax:g} | {c10:.3f} ({d10:.1e}) | {c30:.3f} ({d30:.1e}) | {per_step:.1f} |")
        lines.append("")
    lines += ["rel. error of o (fp32) vs the exact fp64 solve, 10 / 30 steps", "",
              "| heads | " + " | ".join(f"relax {r:g}" for r in RELAXES) + " |",
              "|---|" + "---|" * len(RELAXES)]
    acc = result["accuracy"]
    for name in REGIMES:
        cells = [f"{acc[f'{name}|{r:g}|10']:.2e} / {acc[f'{name}|{r:g}|30']:.2e}" for r in RELAXES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "bench_cg_relax.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
