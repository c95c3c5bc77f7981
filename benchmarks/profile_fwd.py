"""Where the forward's time goes, ours against flash-linear-attention's (fla), kernel by kernel.

Runs each forward (our chunk_fwd, fla 0.6.0's chunk_mesa_net on the same pre-normalised q, k) back to
back under the PyTorch profiler and sums the GPU time of every kernel it launches, per forward. The sum
of a forward's kernels against its time from do_bench shows what is left between launches. Inputs like
bench_ops.py's (B=8 T=2048 H=16 K=V=128 bf16 by default).
Writes <out>/profile_fwd.json and .md.
Usage: python benchmarks/profile_fwd.py [--out DIR] [--shape B,T,H,D] [--steps N ...] [--reps N]
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from bench_ops import make, ms  # benchmarks/ is on the path as the script's directory
from mesa_compile.ops import reference as ref
from mesa_compile.ops.kernels import chunk_fwd
from torch._library.triton import set_wrap_triton_enabled  # what torch.library.triton_op does in eager
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def kernel_times(fn: Callable[[], object], reps: int) -> dict[str, dict[str, float]]:
    """Per kernel name: launches and GPU microseconds per call of fn (mean over reps calls)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    calls: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            calls[event.name] += 1
            micros[event.name] += event.time_range.elapsed_us()
    return {name: {"launches": calls[name] / reps, "us": micros[name] / reps}
            for name in sorted(micros, key=micros.get, reverse=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shape", default="8,2048,16,128", metavar="B,T,H,D")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    from fla.ops.mesa_net import chunk_mesa_net

    B, T, H, D = (int(n) for n in a.shape.split(","))
    torch.manual_seed(0)
    q, k, v, g, beta, lamb = make(B, T, H, D)
    q, k = ref.l2_normalize(q).bfloat16(), ref.l2_normalize(k).bfloat16()
    z = torch.zeros(B, H, D, D, device="cuda")
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": [B, T, H, D], "runs": {}}
    with set_wrap_triton_enabled(False):
        for steps in a.steps:
            forwards = {"ours": lambda n=steps: chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, n, 0.0),
                        "fla": lambda n=steps: chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=n)}
            for tag, fn in forwards.items():
                run = {"ms": ms(fn), "kernels": kernel_times(fn, a.reps)}
                result["runs"][f"{tag}_{steps}"] = run
                print(tag, steps, json.dumps(run), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_fwd.json").write_text(json.dumps(result, indent=1))
    title = (f"# profile_fwd: {result['card']}, torch {result['torch']}, triton {result['triton']}, "
             f"B,T,H,D = {a.shape}")
    lines = [title, ""]
    for key, run in result["runs"].items():
        total = sum(kern["us"] for kern in run["kernels"].values())
        lines += [f"## {key}: {run['ms']:.3f} ms (do_bench), kernels {total / 1e3:.3f} ms", "",
                  "| kernel | launches | ms |", "|---|---|---|"]
        lines += [f"| {name[:60]} | {kern['launches']:g} | {kern['us'] / 1e3:.3f} |"
                  for name, kern in run["kernels"].items()]
        lines.append("")
    (out / "profile_fwd.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
