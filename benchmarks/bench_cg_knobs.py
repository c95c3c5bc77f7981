"""The CG kernel's knobs (chunk_cg.py NOTEs): time and accuracy of relaxed matvecs (`relax`) and of the
spacing of the stored H states (`every`).

Times `launch_chunk_cg` alone (bench_vs_commit.cg_alone) for each variant, 10 and 30 steps, inputs like
bench_ops.py's (B=8 T=2048 H=16 K=V=128 bf16), with q* against the first variant of its knob (relax 0:
every lo pass, the kernel's code before relaxation; every 1: H stored at every chunk start), and the
forward H state pass that each `every` needs; then the relative error of o (fp32) against the exact
fp64 solve on random, cond ~400 and cond ~850 heads (B=1 T=1024 H=4), each variant through chunk_fwd.
A variant sets one knob; the other keeps its default. One process, one card.
Writes <out>/bench_cg_knobs.json and .md.
Usage: python benchmarks/bench_cg_knobs.py [--out DIR]
       python benchmarks/bench_cg_knobs.py --check   (tiny shapes, accuracy only; CPU with TRITON_INTERPRET=1)
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
from mesa_compile.ops.kernels.chunk_cg import chunk_len
from mesa_compile.ops.kernels.chunk_states import chunk_state_pass

# (knob, value): the first value of each knob is the reference of its q* comparison
VARIANTS = (("relax", 0.0), ("relax", 1e-3), ("relax", 1e-2), ("relax", 1.0),
            ("every", 1), ("every", 2), ("every", 4))
REGIMES = {"random": {}, "cond ~400": dict(corr=3.0, gate_bias=6.0, lamb=0.25),
           "cond ~850": dict(corr=6.0, gate_bias=8.0, lamb=0.25)}


def label(knob: str, value) -> str:
    return f"{knob} {value:g}"


def timings(shape: tuple) -> dict:
    from triton.testing import do_bench

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    torch.manual_seed(0)
    q, k, _, g, beta, lamb = make(*shape, "cuda")
    B, T, H, D = shape
    z = torch.zeros(B, H, D, D, device="cuda")
    res = {}
    for knob, value in VARIANTS:
        if knob == "every":
            res[f"state_{label(knob, value)}_ms"] = ms(
                lambda: chunk_state_pass(k, k, g, beta, z, chunk_len(64, D), False, 1.0, False, every=value,
                                         compact=False))
    for steps in (10, 30):
        first = {}
        for knob, value in VARIANTS:
            launch, x = cg_alone(kernels, q, k, g, beta, lamb, steps, **{knob: value})
            key = f"cg{steps}_{label(knob, value)}"
            res[f"{key}_ms"] = ms(launch)
            launch()
            first.setdefault(knob, x.clone())
            res[f"{key}_qstar_vs_first"] = relerr(x, first[knob])
        print(json.dumps({key: val for key, val in res.items() if key.startswith(f"cg{steps}_")}), flush=True)
    return res


def accuracy(device: str, shape: tuple) -> dict:
    """o (fp32) against the exact solve for each variant."""
    res = {}
    for name, kw in REGIMES.items():
        torch.manual_seed(0)
        q, k, v, g, beta, lamb = make(*shape, device, **kw)
        z = torch.zeros(shape[0], shape[2], shape[3], shape[3], device=device)
        exact = ref.exact_recurrence(*(t.double() for t in (q, k, v, g, beta, lamb, z, z)))[0]
        for knob, value in VARIANTS:
            setting = {"relax" if knob == "relax" else "state_every": value}
            for steps in (10, 30):
                o = kernels.chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps, 0.0, out_dtype=torch.float32,
                                      **setting)[0]
                res[f"{name}|{label(knob, value)}|{steps}"] = relerr(o, exact)
        print(json.dumps({key: val for key, val in res.items() if key.startswith(name)}), flush=True)
    return res


def write(out: Path, result: dict) -> None:
    meta = result["meta"]
    (out / "bench_cg_knobs.json").write_text(json.dumps(result, indent=1))
    lines = [f"# bench_cg_knobs: {meta['card']}, torch {meta['torch']}", ""]
    if "timings" in result:
        t = result["timings"]
        lines += ["CG kernel alone, B=8 T=2048 H=16 K=V=128 bf16, ms (q* vs the knob's first value); "
                  "the H state pass each `every` needs", "",
                  "| variant | 10 steps | 30 steps | per step (30 - 10) / 20, us | H state pass |",
                  "|---|---|---|---|---|"]
        for knob, value in VARIANTS:
            key = label(knob, value)
            c10, c30 = t[f"cg10_{key}_ms"], t[f"cg30_{key}_ms"]
            d10, d30 = t[f"cg10_{key}_qstar_vs_first"], t[f"cg30_{key}_qstar_vs_first"]
            state = t.get(f"state_{key}_ms")
            state = f"{state:.3f}" if state is not None else "-"
            lines.append(f"| {key} | {c10:.3f} ({d10:.1e}) | {c30:.3f} ({d30:.1e}) | {(c30 - c10) * 50:.1f} "
                         f"| {state} |")
        lines.append("")
    lines += ["rel. error of o (fp32) vs the exact fp64 solve, 10 / 30 steps", "",
              "| heads | " + " | ".join(label(*v) for v in VARIANTS) + " |", "|---|" + "---|" * len(VARIANTS)]
    acc = result["accuracy"]
    for name in REGIMES:
        cells = [" / ".join(f"{acc[f'{name}|{label(*v)}|{steps}']:.2e}" for steps in (10, 30))
                 for v in VARIANTS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "bench_cg_knobs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    write(out, result)


if __name__ == "__main__":
    main()
