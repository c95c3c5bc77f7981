"""Read-out and adjoint scans of the working tree (and of another commit's kernels) by read-out chunk length.

Each configuration (tree or base, chunk length of both paths) runs in its own process: an illegal memory
access ends the CUDA context, and a failing configuration must not take the others with it. Each times
`chunk_readout` and `chunk_readout_adjoint` (the launchers' own choice of scan or state pass) on random
inputs (bf16 k, v; fp32 q*, gates, initial G) and saves o, the final G, dX and the adjoint's final G;
the parent compares every configuration's outputs with the tree's at the first chunk length.
Needs a CUDA device. Writes <out>/bench_readout.json and .md.
Usage: python benchmarks/bench_readout.py [--base COMMIT|DIR] [--chunks 32 64] [--shape B,T,H ...] [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def child(which: str, base: str, chunk: int, shapes: list[tuple[int, int, int]], tmp: Path) -> dict:
    """Time one configuration and save its outputs under tmp; returns {shape: {readout_ms, adjoint_ms}}."""
    from torch._library.triton import set_wrap_triton_enabled  # what triton_op does in eager
    from triton.testing import do_bench

    from bench_passes import readout_inputs  # benchmarks/ is on the path as the script's directory

    if which == "tree":
        from mesa_compile.ops.kernels import chunk_output
    else:
        from bench_vs_commit import import_kernels_of

        (tmp / f"pkg{chunk}").mkdir()
        package = import_kernels_of(base, tmp / f"pkg{chunk}")
        chunk_output = importlib.import_module(package.__name__ + ".chunk_output")
    if hasattr(chunk_output, "READOUT_CHUNKS"):
        chunk_output.READOUT_CHUNKS = dict.fromkeys(("scan", "states"), chunk)  # both paths at this length
    else:
        chunk_output.READOUT_CHUNK = chunk  # kernels before round 11: one length for both paths
    res = {}
    for B, T, H in shapes:
        k, v, do, g, beta, x, h_kv = readout_inputs(B, T, H)
        o, dx = torch.empty_like(x), torch.empty_like(x)
        with set_wrap_triton_enabled(False):
            def readout():
                return chunk_output.chunk_readout(x, k, v, g, beta, h_kv, o, False)

            def adjoint():
                return chunk_output.chunk_readout_adjoint(do, k, v, g, beta, h_kv, dx, False)

            outs = (o, readout(), dx, adjoint())
            torch.cuda.synchronize()
            torch.save([t.cpu() for t in outs], tmp / f"{which}_{chunk}_{B}_{T}_{H}.pt")
            res[f"{B},{T},{H}"] = {name: do_bench(fn, warmup=10, rep=50, return_mode="median")
                                   for name, fn in (("readout_ms", readout), ("adjoint_ms", adjoint))}
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default=None, help="a commit or a directory of kernel modules")
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--shape", action="append", default=None, metavar="B,T,H")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--child", nargs=3, metavar=("WHICH", "CHUNK", "TMP"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    shapes = [tuple(int(n) for n in s.split(",")) for s in (a.shape or ["8,2048,16", "1,8192,4"])]
    if a.child:
        which, chunk, tmp = a.child
        res = child(which, a.base, int(chunk), shapes, Path(tmp))
        (Path(tmp) / f"{which}_{chunk}.json").write_text(json.dumps(res))
        return
    configs = [("tree", c) for c in a.chunks] + ([("base", c) for c in a.chunks] if a.base else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which, chunk in configs:
            cmd = [sys.executable, __file__, "--child", which, str(chunk), tmp]
            cmd += [f"--shape={B},{T},{H}" for B, T, H in shapes] + (["--base", a.base] if a.base else [])
            try:
                rc = subprocess.run(cmd, timeout=300).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            times = json.loads((Path(tmp) / f"{which}_{chunk}.json").read_text()) if rc == 0 else {}
            for B, T, H in shapes:
                shape = f"{B},{T},{H}"
                row = dict(kernels=which, chunk=chunk, shape=shape, rc=rc, **times.get(shape, {}))
                ref_file, got_file = (Path(tmp) / f"{w}_{c}_{B}_{T}_{H}.pt" for w, c in
                                      (("tree", a.chunks[0]), (which, chunk)))
                if rc == 0 and ref_file.exists():
                    for name, got, want in zip(("o", "G", "dx", "G_adjoint"), torch.load(got_file),
                                               torch.load(ref_file)):
                        row[f"rel_{name}"] = ((got - want).norm() / want.norm()).item()
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / "bench_readout.json").write_text(json.dumps(dict(device=device, torch=torch.__version__,
                                                            base=a.base, rows=rows), indent=1))
    lines = [f"# bench_readout: {device}, torch {torch.__version__}, base {a.base}", "",
             f"ms; rel. differences against the tree at chunk {a.chunks[0]}", "",
             "| kernels | chunk | B,T,H | read-out | adjoint | o | G | dX | G (adjoint) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["rc"] != 0:
            lines.append(f"| {r['kernels']} | {r['chunk']} | {r['shape']} | failed ({r['rc']}) | | | | | |")
            continue
        rel = " | ".join(f"{r.get(f'rel_{n}', float('nan')):.1e}" for n in ("o", "G", "dx", "G_adjoint"))
        lines.append(f"| {r['kernels']} | {r['chunk']} | {r['shape']} | {r['readout_ms']:.3f} | "
                     f"{r['adjoint_ms']:.3f} | {rel} |")
    (out / "bench_readout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
