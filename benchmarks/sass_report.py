"""Compile report of the chunk CG kernel for sm_90a without a GPU: registers, spills and, per loop of the
disassembled code, its instruction mix (wgmma, mma.sync, barriers, shuffles, spill loads and stores).

It compiles with the installed triton and the ptxas it picks for sm_90a (cuobjdump beside it), so the
report is the GPU's code only when the installed triton is the GPU machine's version (3.6.0 with its
ptxas 12.8 at the time of writing; benchmarks/NOTES-kernels.md round 9).
Writes <out>/sass_report.json and .md.
Usage: python benchmarks/sass_report.py [--out DIR] [--relax R ...] [--warps N] [--chunk C] [--bk BK]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from mesa_compile.ops.kernels import chunk_cg

COUNTED = {"instructions": r".", "HGMMA": r"HGMMA", "HMMA": r"HMMA", "BAR.SYNC": r"BAR\.SYNC",
           "SHFL": r"SHFL", "STS": r"STS", "LDS": r"LDS", "STL": r"STL", "LDL": r"LDL", "MUFU": r"MUFU"}


def compile_cg(chunk: int, bk: int, warps: int, relax: float, halves: bool) -> triton.compiler.CompiledKernel:
    """The forward CG kernel for bf16 q/k and bf16 (hi, lo) states, as launch_chunk_cg launches it at
    B=8 T=2048 H=16 K=128 (halves: H_c read as its top rows and right columns, launch_chunk_cg's h_upper)."""
    fn = chunk_cg._chunk_cg_kernel
    types = {"rhs_ptr": "*bf16", "k_ptr": "*bf16", "hs_ptr": "*bf16", "steps_ptr": "*i32", "cg_tol": "fp32"}
    consts = dict(C=chunk, BK=bk, BWD=False, K_EXACT=True, SPLIT_FP16=False, RELAX=relax,
                  HALVES=halves)
    signature = {name: "constexpr" if name in consts else types.get(name, "*fp32" if name.endswith("_ptr")
                                                                       else "i32")
                 for name in fn.arg_names}
    # a launch marks pointers and integers divisible by 16 (T, H, K, NT at the benchmark shape) as such;
    # without it the masked loads of K-wide rows are not vectorised and the code is not the GPU's
    aligned = [i for i, name in enumerate(fn.arg_names)
               if name.endswith("_ptr") or name in ("T", "H", "K", "NT")]
    src = ASTSource(fn, signature, consts, attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text) of every instruction of a `cuobjdump -sass` listing."""
    return [(int(m.group(1), 16), m.group(2).strip()) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def back_edge(code: list[tuple[int, str]], index: dict[int, int], i: int) -> int | None:
    """Index of the target of instruction i of parse_sass's list if it branches backwards (closes a loop);
    index maps addresses to positions."""
    m = re.search(r"BRA\s.*?0x([0-9a-f]+)", code[i][1])
    target = index.get(int(m.group(1), 16)) if m else None
    return target if target is not None and target < i else None


def loops(sass: str) -> list[dict]:
    """Instruction counts of each backward-branch range (a loop body) of a disassembly."""
    code = parse_sass(sass)
    index = {addr: i for i, (addr, _) in enumerate(code)}
    found = []
    for i in range(len(code)):
        start = back_edge(code, index, i)
        if start is not None:
            body = [t for _, t in code[start:i + 1]]
            found.append({key: sum(1 for t in body if re.search(pat, t)) for key, pat in COUNTED.items()})
    return found


def report(chunk: int, bk: int, warps: int, relax: float, halves: bool) -> dict:
    kernel = compile_cg(chunk, bk, warps, relax, halves)
    ptxas = get_ptxas(90)  # the assembler triton itself picks for sm_90a
    cuobjdump = Path(ptxas.path).parent / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        info = subprocess.run([ptxas.path, "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(cuobjdump), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    num = lambda pat: int(re.search(pat, info).group(1))  # noqa: E731
    return dict(chunk=chunk, bk=bk, warps=warps, relax=relax, halves=halves, ptxas=ptxas.version,
                global_loads=len(re.findall(r"LDG", sass)),
                shared_bytes=kernel.metadata.shared,
                registers=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), loops=loops(sass))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--relax", type=float, nargs="+", default=[0.0, chunk_cg.CG_RELAX])
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--bk", type=int, default=128)
    ap.add_argument("--whole-h", action="store_true",
                    help="H_c read as one tile (whole stored states), not as its top rows and right columns")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [report(a.chunk, a.bk, a.warps, relax, not a.whole_h) for relax in a.relax]
    (out / "sass_report.json").write_text(json.dumps(dict(triton=triton.__version__, rows=rows), indent=1))
    title = (f"# CG kernel for sm_90a, triton {triton.__version__}, ptxas {rows[0]['ptxas']} "
             f"(C={a.chunk}, BK={a.bk}, {a.warps} warps, H_c read "
             f"{'whole' if a.whole_h else 'as top rows and right columns'})")
    lines = [title, "", "| relax | registers | spill stores / loads, B | shared, B | global loads | loop | "
             + " | ".join(COUNTED) + " |", "|---|---|---|---|---|---|" + "---|" * len(COUNTED)]
    for row in rows:
        head = (f"| {row['relax']:g} | {row['registers']} | {row['spill_stores']} / {row['spill_loads']} "
                f"| {row['shared_bytes']} | {row['global_loads']} ")
        for n, loop in enumerate(row["loops"]):
            counts = " | ".join(str(loop[k]) for k in COUNTED)
            lines.append(head + f"| {n} | {counts} |")
    (out / "sass_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
