"""Does the forward gain from running its three launches for different batch groups at the same time?

The state passes and the read-out wait on memory; the CG kernel on its issue slots. A CG program and a
read-out or state-pass program can share an SM (each takes at most half its registers), so a forward split
into batch groups, with group i's read-out and group i+1's state pass running beside CG programs, may hide
part of the passes. This times, in one process on one card (B=8 T=2048 H=16 K=V=128 bf16, 10 and 30 steps):
- `sequential`: chunk_fwd's launches for the whole batch, one stream;
- `pipeline/N`: N batch groups; the state passes on one stream, each group's CG on a second once its
  states are written, its read-out on a third once its q* is written;
and fla's forward beside them. o of every split is compared with the sequential one.
Writes <out>/bench_streams.json and .md. Usage: python benchmarks/bench_streams.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from triton.testing import do_bench

from bench_vs_commit import make  # benchmarks/ is on the path as the script's directory
from mesa_compile.ops.kernels.chunk_cg import chunk_fwd, chunk_len, launch_chunk_cg
from mesa_compile.ops.kernels.chunk_output import chunk_readout, h_states_with_g


def pipelined_forward(q, k, v, g, beta, lamb, steps: int, groups: int, streams) -> torch.Tensor:
    """chunk_fwd's launches (bf16 split, zero initial state) over `groups` batch groups on three streams."""
    B, T, H, K = q.shape
    C = chunk_len(64, K)
    o = torch.empty_like(v)
    main = torch.cuda.current_stream()
    for s in streams:
        s.wait_stream(main)
    s_states, s_cg, s_out = streams
    keep = []  # every tensor stays alive until all streams are done
    size = B // groups
    for i in range(groups):
        b = slice(i * size, (i + 1) * size)
        qi, ki, vi, gi, bi = q[b], k[b], v[b], g[b], beta[b]
        with torch.cuda.stream(s_states):
            z = torch.zeros(size, H, K, K, device=q.device)
            zkv = torch.zeros(size, H, K, v.shape[-1], device=q.device)
            hs, upper, _, g_states = h_states_with_g(ki, vi, gi, bi, z, zkv, C, False, True)
            x = torch.empty(size, T, H, K, device=q.device)
            st = torch.empty(size, T, H, device=q.device, dtype=torch.int32)
            states_done = torch.cuda.Event()
            states_done.record(s_states)
        s_cg.wait_event(states_done)
        with torch.cuda.stream(s_cg):
            launch_chunk_cg(qi, ki, gi, bi, lamb, hs, x, st, x, gi, lamb, C, steps, 0.0, False, h_upper=upper)
            cg_done = torch.cuda.Event()
            cg_done.record(s_cg)
        s_out.wait_event(cg_done)
        with torch.cuda.stream(s_out):
            chunk_readout(x, ki, vi, gi, bi, zkv, o[b], False, states=g_states)
        keep.append((z, zkv, hs, g_states, x, st))
    for s in streams:
        main.wait_stream(s)
    return o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    try:
        from fla.ops.mesa_net import chunk_mesa_net
    except ImportError:
        chunk_mesa_net = None
    torch.manual_seed(0)
    B, T, H, D = 8, 2048, 16, 128
    q, k, v, g, beta, lamb = make(B, T, H, D, "cuda")
    z = torch.zeros(B, H, D, D, device="cuda")
    streams = [torch.cuda.Stream() for _ in range(3)]
    ms = lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    rows = []
    for steps in (10, 30):
        row = {"steps": steps}
        ref_o = chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps, 0.0)[0]
        row["sequential_ms"] = ms(lambda: chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps, 0.0))
        for groups in (2, 4, 8):
            o = pipelined_forward(q, k, v, g, beta, lamb, steps, groups, streams)
            torch.cuda.synchronize()
            row[f"pipeline{groups}_max_abs_diff"] = (o.float() - ref_o.float()).abs().max().item()
            row[f"pipeline{groups}_ms"] = ms(lambda: pipelined_forward(q, k, v, g, beta, lamb, steps, groups,
                                                                       streams))
        if chunk_mesa_net is not None:
            row["fla_ms"] = ms(lambda: chunk_mesa_net(q, k, v, g, beta, lamb, max_CG_iteration=steps))
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "shape": [B, T, H, D]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_streams.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["sequential_ms", "pipeline2_ms", "pipeline4_ms", "pipeline8_ms", "fla_ms"]
    lines = [f"# Forward over batch groups on three streams ({meta['card']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, B,T,H,D = {B},{T},{H},{D}, ms)", "",
             "| CG steps | " + " | ".join(c[:-3] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['steps']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "n/a" for c in cols) + " |"
              for r in rows]
    (out / "bench_streams.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    with set_wrap_triton_enabled(False):  # launches as the mesa:: ops make them in eager
        main()
