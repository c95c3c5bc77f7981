"""The working tree's chunk kernels against another commit's, side by side in one process on one card.

A kernel change is judged by a ratio measured in one run (benchmarks/NOTES-kernels.md). This script
copies `ops/kernels` of a commit (git) or a directory into a temporary package, imports it beside the
installed `mesa_compile.ops.kernels`, and times both through their stable entry points `chunk_fwd` /
`chunk_bwd`, their forward state passes, and their forward CG kernel alone (cg_alone says for which
commits), with fla 0.6.0's forward and forward+backward in the same process where it is installed
(inputs like bench_ops.py's: B=8 T=2048 H=16 K=V=128 bf16, pre-normalised q, k). It also compares both
against the exact fp64 solve on random and ill-conditioned (cond ~400) heads, o kept in fp32.
Writes <out>/bench_vs_commit.json and .md.
Usage: python benchmarks/bench_vs_commit.py --base COMMIT|DIR [--out DIR] [--shape B,T,H,D] [--no-fla]
       python benchmarks/bench_vs_commit.py --base COMMIT|DIR --check   (tiny shapes, any device: outputs
       of both trees against each other and the exact solve, no timing; with TRITON_INTERPRET=1 on CPU)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_ops import ms, relerr  # benchmarks/ is on the path as the script's directory
from mesa_compile.ops import reference as ref
from mesa_compile.ops import kernels as ours

ROOT = Path(__file__).resolve().parents[1]


def import_kernels_of(base: str, into: Path):
    """ops/kernels of a commit, or the kernel modules of a directory (for machines whose copy of the
    repository has no git history), as an importable package `base_kernels` under `into`."""
    pkg = into / "base_kernels"
    if Path(base).is_dir():
        shutil.copytree(base, pkg, ignore=shutil.ignore_patterns("__pycache__"))
        sys.path.insert(0, str(into))
        return importlib.import_module("base_kernels")
    commit = base
    pkg.mkdir()
    listing = subprocess.run(["git", "ls-tree", "--name-only", f"{commit}:ops/kernels"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for name in listing:
        if name.endswith(".py"):
            src = subprocess.run(["git", "show", f"{commit}:ops/kernels/{name}"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            (pkg / name).write_text(src)
    sys.path.insert(0, str(into))
    return importlib.import_module("base_kernels")


def make(B, T, H, D, device, corr=0.0, gate_bias=3.0, lamb=None):
    """Inputs like bench_ops.py's (keys normalize(corr * u + noise), one u per head), q and k normalised."""
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    k = corr * torch.randn(1, 1, H, D, device=device) + k
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k = ref.l2_normalize(q).to(dtype), ref.l2_normalize(k).to(dtype)
    g = F.logsigmoid(torch.randn(B, T, H, device=device) + gate_bias)
    beta = torch.rand(B, T, H, device=device)
    lamb = torch.rand(H, D, device=device) + 0.25 if lamb is None else torch.full((H, D), lamb, device=device)
    return q, k, v.to(dtype), g, beta, lamb


def cg_alone(tree, q, k, g, beta, lamb, steps: int, **launch_kw):
    """A closure that launches only the tree's forward CG kernel on states made once here, and the q* it
    writes; for trees whose launch_chunk_cg / chunk_state_pass take the arguments they take at this
    script's commit (launch_kw: further keywords of the tree's launch_chunk_cg)."""
    cg = importlib.import_module(f"{tree.__name__}.chunk_cg")
    states = importlib.import_module(f"{tree.__name__}.chunk_states")
    B, T, H, D = k.shape
    C = cg.chunk_len(64, D)
    split_fp16 = cg._use_fp16_split()
    z = torch.zeros(B, H, D, D, device=k.device)
    # trees whose H_c may be stored as upper tiles get their states as their chunk_fwd does
    if hasattr(states, "state_tiles"):
        out = importlib.import_module(f"{tree.__name__}.chunk_output")
        hs, h_upper, _, _ = out.h_states_with_g(k, k, g, beta, z, z, C, split_fp16, False)
        launch_kw = dict(launch_kw, h_upper=h_upper)
    else:
        hs, _ = states.chunk_state_pass(k, k, g, beta, z, C, False, 1.0, split_fp16)
    x = torch.empty(B, T, H, D, device=k.device)
    st = torch.empty(B, T, H, device=k.device, dtype=torch.int32)
    return (lambda: cg.launch_chunk_cg(q, k, g, beta, lamb, hs, x, st, x, g, lamb, C, steps, 0.0, False,
                                       **launch_kw)), x


def accuracy(trees: dict, device: str, shape: tuple, steps_list: tuple) -> list[dict]:
    """o (fp32) of each tree against the exact fp64 solve, random and ill-conditioned heads."""
    rows = []
    for corr, bias, lamb in ((0.0, 3.0, None), (3.0, 6.0, 0.25)):
        torch.manual_seed(0)
        q, k, v, g, beta, lamb_t = make(*shape, device, corr, bias, lamb)
        z_kk = torch.zeros(shape[0], shape[2], shape[3], shape[3], device=device)
        exact = ref.exact_recurrence(*(t.double() for t in (q, k, v, g, beta, lamb_t, z_kk, z_kk)))[0]
        row = dict(corr=corr, gate_bias=bias)
        for steps in steps_list:
            for tag, tree in trees.items():
                o = tree.chunk_fwd(q, k, v, g, beta, lamb_t, z_kk, z_kk, 64, steps, 0.0,
                                   out_dtype=torch.float32)[0]
                row[f"{tag}_{steps}"] = relerr(o, exact)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def state_passes(tree, k, v, g, beta):
    """A closure that launches the tree's forward state passes (H, and the read-out's G where they share a
    launch) as its chunk_fwd does, from zero states."""
    cg = importlib.import_module(f"{tree.__name__}.chunk_cg")
    out = importlib.import_module(f"{tree.__name__}.chunk_output")
    B, T, H, D = k.shape
    z = torch.zeros(B, H, D, D, device=k.device)
    return lambda: out.h_states_with_g(k, v, g, beta, z, z, cg.chunk_len(64, D), cg._use_fp16_split(), True)


def timings(trees: dict, shape: tuple, with_fla: bool) -> dict:
    try:
        from fla.ops.mesa_net import chunk_mesa_net
    except ImportError:  # fla's columns stay nan where it is not installed
        chunk_mesa_net = None
    if not with_fla:
        chunk_mesa_net = None
    torch.manual_seed(0)
    q, k, v, g, beta, lamb = make(*shape, "cuda")
    B, T, H, D = shape
    z = torch.zeros(B, H, D, D, device="cuda")
    do = torch.randn_like(v)
    res = {f"{tag}_states": ms(state_passes(tree, k, v, g, beta)) for tag, tree in trees.items()}
    print(json.dumps(res), flush=True)
    for steps in (30, 10):
        for tag, tree in trees.items():
            res[f"{tag}_cg_{steps}"] = ms(cg_alone(tree, q, k, g, beta, lamb, steps)[0])
            res[f"{tag}_fwd_{steps}"] = ms(lambda: tree.chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps,
                                                                  0.0))

            def fwd_bwd():
                _, x, *_ = tree.chunk_fwd(q, k, v, g, beta, lamb, z, z, 64, steps, 0.0)
                tree.chunk_bwd(q, k, v, g, beta, lamb, z, z, x, do, z, z, 64, steps, 0.0)

            res[f"{tag}_fwdbwd_{steps}"] = ms(fwd_bwd)
        if chunk_mesa_net is not None:
            res[f"fla_fwd_{steps}"] = ms(lambda: chunk_mesa_net(q, k, v, g, beta, lamb,
                                                                 max_CG_iteration=steps))
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g, beta, lamb)]

            def fla_fwd_bwd():
                chunk_mesa_net(*leaves, max_CG_iteration=steps)[0].backward(do)

            # includes autograd's few microseconds, which our direct chunk_fwd/chunk_bwd calls skip
            res[f"fla_fwdbwd_{steps}"] = ms(fla_fwd_bwd)
        print(json.dumps({key: val for key, val in res.items() if key.endswith(f"_{steps}")}), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True,
                    help="commit whose ops/kernels to compare against, or a directory holding a copy of them")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shape", default="8,2048,16,128", metavar="B,T,H,D")
    ap.add_argument("--check", action="store_true", help="tiny shapes, outputs only (CPU interpreter or GPU)")
    ap.add_argument("--no-fla", action="store_true", help="leave out fla's columns (and its autotuning time)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": import_kernels_of(a.base, Path(tmp)), "tree": ours}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        meta = dict(base=a.base, card=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    torch=torch.__version__)
        if a.check:
            result = dict(meta=meta, accuracy=accuracy(trees, device, (1, 70, 2, 32), (40,)))
            torch.manual_seed(0)
            q, k, _, g, beta, lamb = make(1, 70, 2, 32, device)
            xs = {}
            for tag, tree in trees.items():
                launch, xs[tag] = cg_alone(tree, q, k, g, beta, lamb, 10)
                launch()
            result["cg_alone_q_star_tree_vs_base"] = relerr(xs["tree"], xs["base"])
            print("CG kernel alone, q* of the tree vs the base:", result["cg_alone_q_star_tree_vs_base"])
        else:
            # our kernels launched as the mesa:: ops launch them in eager (no HOP dispatch per launch)
            from torch._library.triton import set_wrap_triton_enabled

            with set_wrap_triton_enabled(False):
                result = dict(meta=meta, timings=timings(trees, tuple(int(n) for n in a.shape.split(",")),
                                                             not a.no_fla),
                              accuracy=accuracy(trees, device, (1, 1024, 4, 128), (30, 10)))
    (out / "bench_vs_commit.json").write_text(json.dumps(result, indent=1))
    lines = [f"# bench_vs_commit: working tree vs {a.base}, {meta['card']}, torch {meta['torch']}", ""]
    if "timings" in result:
        lines += ["| CG steps | base CG kernel | tree CG kernel | base fwd | tree fwd | fla fwd "
                  "| base fwd+bwd | tree fwd+bwd | fla fwd+bwd |", "|---|---|---|---|---|---|---|---|---|"]
        t = result["timings"]
        for steps in (30, 10):
            keys = ("base_cg", "tree_cg", "base_fwd", "tree_fwd", "fla_fwd", "base_fwdbwd", "tree_fwdbwd",
                    "fla_fwdbwd")
            cells = [t.get(f"{key}_{steps}", float("nan")) for key in keys]
            lines.append(f"| {steps} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
        states = f"state passes alone: base {t['base_states']:.3f} ms, tree {t['tree_states']:.3f} ms"
        lines += ["", states, ""]
    columns = [key for key in result["accuracy"][0] if key not in ("corr", "gate_bias")]
    lines += ["rel. error of o (fp32) vs the exact fp64 solve", "", "| keys | " + " | ".join(columns) + " |",
              "|---|" + "---|" * len(columns)]
    for row in result["accuracy"]:
        keys = "random" if row["corr"] == 0 else "ill-conditioned"
        lines.append(f"| {keys} | " + " | ".join(f"{row[key]:.2e}" for key in columns) + " |")
    (out / "bench_vs_commit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
