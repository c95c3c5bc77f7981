"""Which of our kernels feed a Hopper tensor-core product (wgmma) an operand from registers, and whether
the machine code writes such an operand before the product has read it.

ptxas before CUDA 13.3 (triton 3.6 bundles 12.8) can reuse the registers of a wgmma's register A operand
before the asynchronous product has read them, which corrupts the product (triton-lang/triton #11781; the
fix in CUDA 13.3's release notes). An operand in shared memory is not affected. This script launches every
chunk and decode kernel with an empty Triton cache, at the benchmark's shape and at a few-heads shape
(their launch rules pick other tiles and paths there), then reports per compiled kernel:
- from its PTX, the wgmma instructions by where their A operand comes from, and the `mma.sync` products
  (registers only, synchronous: not affected);
- from its machine code (`cuobjdump -sass` beside triton's ptxas), hazards before the wait that covers an
  asynchronous product: a write to one of its A registers, or any use of its accumulator registers. Every
  backward branch is followed once. A static check of the listing: evidence, not proof.
With --compile-only no GPU is needed: launches become compile-only warm-ups for sm_90a (this replaces
triton's active driver; written against triton 3.6), and the launch rules that depend on the number of
multiprocessors see an H100's 132, so the few-heads paths compile as on that card. Writes
<out>/wgmma_operands.json and .md.
Usage: python benchmarks/wgmma_operands.py [--out DIR] [--base COMMIT|DIR] [--compile-only]
       (base: another tree's kernels, as bench_vs_commit.py imports them; default: the installed ones)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.(\w+)\.\w+\.\w+\.\w+\s+\{[^}]*\},\s*(\{)?")
# opcodes whose first register operand is not written
NO_DEST = ("ST", "RED", "BAR", "BRA", "WARPGROUP", "MEMBAR", "FENCE", "EXIT", "BSYNC", "BSSY", "NOP",
           "WARPSYNC", "CALL", "RET", "BREAK", "DEPBAR", "CCTL", "ERRBAR", "SYNCS", "UTMA")


def count_products(ptx: str) -> dict:
    """wgmma with the A operand in registers / in shared memory (a descriptor), and mma.sync, in PTX."""
    a_sources = [m.group(2) for m in WGMMA.finditer(ptx)]
    in_registers = sum(1 for s in a_sources if s)
    return {"wgmma_register_a": in_registers, "wgmma_shared_a": len(a_sources) - in_registers,
            "mma_sync": len(re.findall(r"\bmma\.sync\.aligned", ptx))}


def _dest_width(op: str) -> int:
    """Registers an instruction's destination spans (the vector widths these kernels use)."""
    if op.startswith("HGMMA"):
        return int(re.match(r"HGMMA\.64x(\d+)x", op).group(1)) // 2  # 64 x N fp32 over 128 threads
    if op.startswith("HMMA"):
        return 4 if ".F32" in op else 2
    if op.startswith("LDSM") and re.search(r"\.\d$", op):
        return int(op.rsplit(".", 1)[1])
    return 4 if ".128" in op else 2 if (".64" in op or ".WIDE" in op) else 1


def _register_range(operand: str, width: int) -> set[int]:
    """The registers a register operand (`R24`) spans; empty for any other operand."""
    return set(range(int(operand[1:]), int(operand[1:]) + width)) if re.fullmatch(r"R\d+", operand) else set()


def sass_hazards(sass: str) -> dict:
    """Hazards of asynchronous HGMMA groups in a listing, until `WARPGROUP.DEPBAR.LE gsb0, 0x0` (module
    docstring): writes to a pending register A operand, uses of a pending accumulator."""
    from sass_report import back_edge, parse_sass  # imports triton: not before main() sets the cache

    code = parse_sass(sass)
    index = {a: i for i, (a, _) in enumerate(code)}
    found = {"a_writes": 0, "acc_uses": 0}

    def walk(start: int, stop: int, a_regs: set, acc: set, followed: set) -> None:
        for i in range(start, stop):
            body = re.sub(r"^@!?U?P\w+\s+", "", code[i][1])
            op = body.split()[0]
            operands = [o.strip() for o in body[len(op):].split(",")]
            if op.startswith("WARPGROUP.DEPBAR") and operands[-1] == "0x0":
                a_regs.clear()
                acc.clear()
                continue
            if op.startswith("HGMMA"):
                acc |= _register_range(operands[0], _dest_width(op))
                if len(operands) > 1:
                    a_regs |= _register_range(operands[1], 4)
                continue
            if not (a_regs or acc):
                continue
            dest = set() if op.startswith(NO_DEST) else _register_range(operands[0], _dest_width(op))
            used = {int(r) for r in re.findall(r"\bR(\d+)\b", body[len(op):])} | dest
            found["a_writes"] += len(dest & a_regs)
            found["acc_uses"] += len(used & acc)
            target = back_edge(code, index, i)
            if target is not None and i not in followed:
                followed.add(i)  # the back edge once, with the groups still pending
                walk(target, i, set(a_regs), set(acc), followed)

    walk(0, len(code), set(), set(), set())
    return found


def _cuobjdump() -> Path | None:
    from triton.backends.nvidia.compiler import get_ptxas

    tool = Path(get_ptxas(90).path).parent / "cuobjdump"
    return tool if tool.exists() else None


def scan_cache(cache: Path) -> list[dict]:
    """One row per compiled kernel of a Triton cache directory: its name, cache key and the counts."""
    tool = _cuobjdump()
    rows = []
    for ptx in sorted(cache.glob("*/*.ptx")):
        meta = json.loads(ptx.with_suffix(".json").read_text())
        row = {"kernel": meta["name"], "key": ptx.parent.name[:12], **count_products(ptx.read_text())}
        cubin = ptx.with_suffix(".cubin")
        if tool and cubin.exists():
            row.update(sass_hazards(subprocess.run([str(tool), "-sass", str(cubin)], check=True,
                                                   capture_output=True, text=True).stdout))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["kernel"], r["key"]))


def compile_only() -> None:
    """Make kernel launches compile for sm_90a without running, on a machine without a GPU (tensors on the
    CPU): triton's active driver answers device 0, stream 0 and that target."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, jit

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    run = jit.JITFunction.run
    jit.JITFunction.run = lambda self, *a, grid, warmup, **kw: run(self, *a, grid=grid, warmup=True, **kw)


def follow_launch_rules_of_gpu(kernels, multiprocessors: int = 132) -> None:
    """Off CUDA `fills_device` says yes at every size (the interpreter's rule), so CPU launches never pick the
    tiles and paths meant for few programs; make the kernel modules answer as a GPU with this many SMs."""
    import importlib

    for name in ("chunk_output", "chunk_states"):
        module = importlib.import_module(f"{kernels.__name__}.{name}")
        module.fills_device = lambda programs, device, per_sm: programs >= per_sm * multiprocessors


def launch_all(kernels, device: str) -> None:
    """Forward, backward and decode at B=8 T=2048 H=16 and B=1 T=8192 H=4 (K = V = 128, bf16, 30 steps)."""
    import torch
    from bench_vs_commit import make  # benchmarks/ is on the path as the script's directory

    for B, T, H in ((8, 2048, 16), (1, 8192, 4)):
        q, k, v, g, beta, lamb = make(B, T, H, 128, device)
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()  # make() keeps fp32 off CUDA
        z = torch.zeros(B, H, 128, 128, device=device)
        fwd = kernels.chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, 30, 0.0)
        kernels.chunk_bwd(q, k, v, g, beta, lamb, z, z, fwd[1], torch.randn_like(v), z, z, 64, 30, 0.0)
        kernels.decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, z, z, 30, 0.0)
    if device == "cuda":
        torch.cuda.synchronize()


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "wgmma_operands.json").write_text(json.dumps({"meta": meta, "kernels": rows}, indent=1))
    lines = [f"# Tensor-core products by operand source ({meta['device']}, triton {meta['triton']})", "",
             ("| kernel | cache key | wgmma, A in registers | wgmma, A in shared memory | mma.sync "
              "| A registers written before the wait | accumulators used before the wait |"),
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['key']} | {r['wgmma_register_a']} | {r['wgmma_shared_a']} "
              f"| {r['mma_sync']} | {r.get('a_writes', 'n/a')} | {r.get('acc_uses', 'n/a')} |" for r in rows]
    (out / "wgmma_operands.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--base", help="another tree's kernels (a commit or a directory of kernel modules)")
    ap.add_argument("--compile-only", action="store_true", help="no GPU: compile the launches for sm_90a")
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-"))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # before triton compiles anything: every kernel is fresh
    import torch
    import triton

    if args.compile_only:
        compile_only()
    if args.base:
        from bench_vs_commit import import_kernels_of

        kernels = import_kernels_of(args.base, Path(tempfile.mkdtemp()))
    else:
        from mesa_compile.ops import kernels
    if args.compile_only:
        follow_launch_rules_of_gpu(kernels)
    launch_all(kernels, "cpu" if args.compile_only else "cuda")
    write(Path(args.out), scan_cache(cache),
          {"device": "sm_90a, compiled only" if args.compile_only else torch.cuda.get_device_name(),
           "triton": triton.__version__, "torch": torch.__version__, "kernels": args.base or "installed"})


if __name__ == "__main__":
    sys.exit(main())
