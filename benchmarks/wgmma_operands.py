"""Which of our kernels feed a Hopper tensor-core product (wgmma) an operand from registers.

ptxas before CUDA 13.3 (triton 3.6 bundles 12.8) can reuse the registers of a wgmma's register A operand
before the asynchronous product has read them, which corrupts the product or faults (triton-lang/triton
#10486, #11366; the fix in CUDA 13.3's release notes). An operand in shared memory is not affected. This
script launches every chunk and decode kernel on a CUDA device with an empty Triton cache, at the
benchmark's shape and at a few-heads shape (their launch rules pick other tiles and paths there), then
counts in each compiled kernel's PTX the wgmma instructions by where their A operand comes from, and the
`mma.sync` products (registers only, synchronous: not affected).
Writes <out>/wgmma_operands.json and .md.
Usage: python benchmarks/wgmma_operands.py [--out DIR] [--base COMMIT|DIR]  (base: another tree's kernels,
       as bench_vs_commit.py imports them; default: the installed ones)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(\w+)\.\w+\.\w+\.\w+\s+\{[^}]*\},\s*(\{)?")


def count_products(ptx: str) -> dict:
    """wgmma with the A operand in registers / in shared memory (a descriptor), and mma.sync, in PTX."""
    a_sources = [m.group(2) for m in WGMMA.finditer(ptx)]
    return {"wgmma_register_a": sum(1 for s in a_sources if s), "wgmma_shared_a": sum(1 for s in a_sources if not s),
            "mma_sync": len(re.findall(r"\bmma\.sync\.aligned", ptx))}


def scan_cache(cache: Path) -> list[dict]:
    """One row per compiled kernel of a Triton cache directory: its name, cache key and product counts."""
    rows = []
    for ptx in sorted(cache.glob("*/*.ptx")):
        meta = json.loads(ptx.with_suffix(".json").read_text())
        rows.append({"kernel": meta["name"], "key": ptx.parent.name[:12], **count_products(ptx.read_text())})
    return sorted(rows, key=lambda r: (r["kernel"], r["key"]))


def launch_all(kernels) -> None:
    """Forward, backward and decode at B=8 T=2048 H=16 and B=1 T=8192 H=4 (K = V = 128, bf16, 30 steps)."""
    import torch
    from bench_vs_commit import make  # benchmarks/ is on the path as the script's directory

    for B, T, H in ((8, 2048, 16), (1, 8192, 4)):
        q, k, v, g, beta, lamb = make(B, T, H, 128, "cuda")
        z_kk, z_kv = torch.zeros(B, H, 128, 128, device="cuda"), torch.zeros(B, H, 128, 128, device="cuda")
        fwd = kernels.chunk_fwd(q, k, v, g, beta, lamb, z_kk, z_kv, 64, 30, 0.0)
        kernels.chunk_bwd(q, k, v, g, beta, lamb, z_kk, z_kv, fwd[1], torch.randn_like(v), z_kk, z_kv,
                          64, 30, 0.0)
        kernels.decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, z_kk, z_kv, 30, 0.0)
    torch.cuda.synchronize()


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "wgmma_operands.json").write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1))
    lines = [f"# Tensor-core products by operand source ({meta['device']}, triton {meta['triton']})", "",
             "| kernel | cache key | wgmma, A in registers | wgmma, A in shared memory | mma.sync |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['key']} | {r['wgmma_register_a']} | {r['wgmma_shared_a']} | {r['mma_sync']} |"
              for r in rows]
    (out / "wgmma_operands.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--base", help="another tree's kernels (a commit or a directory of kernel modules)")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # before triton compiles anything: every kernel is fresh
    import torch
    import triton

    if args.base:
        from bench_vs_commit import import_kernels_of

        kernels = import_kernels_of(args.base, Path(tempfile.mkdtemp()))
    else:
        from mesa_compile.ops import kernels
    launch_all(kernels)
    write(Path(args.out), scan_cache(cache),
          {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "kernels": args.base or "installed"})


if __name__ == "__main__":
    sys.exit(main())
