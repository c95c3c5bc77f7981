"""CPU fp64 simulation: what the CG start rule costs and buys, in exact arithmetic.

The kernels start CG from the Jacobi guess x0 = q / diag(A) (architecture.md: one x0 rule for prefill and
decode), whose residual q - A x0 costs one matvec before the first step: k steps are k + 1 matvecs. The
reference kernels start from x0 = 0 (k steps, k matvecs). A third rule, CG preconditioned by diag(A)
from x0 = 0, also takes k matvecs and its first iterate is the best multiple of the Jacobi guess.
For each rule: the error of q* and of o = G_t^T q* against the exact solve after k steps, and the mean
number of steps a token takes to ||r|| <= tol ||r0|| (at most 30); and the median over tokens of
||r0|| / ||q|| for the Jacobi guess (the other rules start at r0 = q), the reference of tol. Inputs as
sim_cg_precision.py (B=1 T=1024 H=4 K=V=128, bf16-rounded, lambda 0.25; random keys and two
correlated-key regimes), in fp64 throughout, so the figures are the start rules' own, without rounding.
Writes <out>/sim_cg_start.json and .md.
Usage: python benchmarks/sim_cg_start.py [--out DIR]   (about 2 minutes on 2 cores, ~3 GB of memory)
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench_ops import relerr  # benchmarks/ is on the path as the script's directory
from sim_cg_precision import chunked_inputs, read_out, token_systems

RULES = ("jacobi_x0", "zero_x0", "jacobi_pcg")
STEPS = (1, 2, 3, 5, 10, 20, 30)
TOLS = (1e-3, 1e-4)


def cg(a: torch.Tensor, q: torch.Tensor, rule: str, steps: int, tol: float = 0.0
       ) -> tuple[torch.Tensor, torch.Tensor]:
    """CG on A x = q per token (rows of q) under a start rule; returns (x, steps each token took). A token
    stops at ||r|| <= tol ||r0|| (tol > 0) or when its residual vanishes."""
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    if rule == "jacobi_x0":
        x = q / diag
        r = q - (a @ x[..., None])[..., 0]
    else:
        x, r = torch.zeros_like(q), q.clone()
    z = r / diag if rule == "jacobi_pcg" else r
    p, rz, r0 = z.clone(), (r * z).sum(-1), (r * r).sum(-1)
    active = r0 > 0
    taken = torch.zeros_like(r0)
    for _ in range(steps):
        w = (a @ p[..., None])[..., 0]
        alpha = torch.where(active, rz / (p * w).sum(-1).clamp_min(1e-300), 0.0)
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * w
        taken += active
        rr = (r * r).sum(-1)
        active = active & (rr > (tol * tol) * r0) & (rr > 0)
        z = r / diag if rule == "jacobi_pcg" else r
        rz_new = (r * z).sum(-1)
        p = z + torch.where(active, rz_new / rz.clamp_min(1e-300), 0.0)[..., None] * p
        rz = rz_new
    return x, taken


def simulate(corr: float, gate_bias: float) -> dict:
    d = chunked_inputs(corr, gate_bias)
    a = token_systems(d)
    x_exact = torch.linalg.solve(a, d["q"][..., None])[..., 0]
    o_exact = read_out(x_exact, d)
    row = dict(corr=corr, gate_bias=gate_bias, median_cond=torch.linalg.cond(a).median().item())
    x0 = d["q"] / torch.diagonal(a, dim1=-2, dim2=-1)
    r0 = d["q"] - (a @ x0[..., None])[..., 0]
    row["jacobi_r0_over_q"] = (r0.norm(dim=-1) / d["q"].norm(dim=-1)).median().item()
    for rule in RULES:
        for k in STEPS:
            x, _ = cg(a, d["q"], rule, k)
            row[f"{rule}_{k}_q"], row[f"{rule}_{k}_o"] = relerr(x, x_exact), relerr(read_out(x, d), o_exact)
        for tol in TOLS:
            x, taken = cg(a, d["q"], rule, max(STEPS), tol)
            row[f"{rule}_tol{tol:g}_steps"] = taken.mean().item()
            row[f"{rule}_tol{tol:g}_o"] = relerr(read_out(x, d), o_exact)
        print(rule, {k: f"{v:.2e}" for k, v in row.items() if k.startswith(rule)}, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [simulate(corr, bias) for corr, bias in ((0.0, 3.0), (3.0, 6.0), (6.0, 8.0))]
    (out / "sim_cg_start.json").write_text(json.dumps(rows, indent=1))
    lines = [("# CG start rules (fp64, CPU): rel. error of o against the exact solve after k steps; matvecs: "
              "k + 1 for jacobi_x0, k for the others"), "",
             "| keys | median cond | Jacobi r0 / q | start | " + " | ".join(f"{k}" for k in STEPS)
             + " | " + " | ".join(f"tol {t:g}: mean steps, error" for t in TOLS) + " |",
             "|---|---|---|---|" + "---|" * (len(STEPS) + len(TOLS))]
    for row in rows:
        keys = "random" if row["corr"] == 0 else f"correlated ({row['corr']:g}, bias {row['gate_bias']:g})"
        for rule in RULES:
            cells = [f"{row[f'{rule}_{k}_o']:.1e}" for k in STEPS]
            cells += [f"{row[f'{rule}_tol{t:g}_steps']:.1f}, {row[f'{rule}_tol{t:g}_o']:.1e}" for t in TOLS]
            lines.append(f"| {keys} | {row['median_cond']:.0f} | {row['jacobi_r0_over_q']:.2f} | {rule} | "
                         + " | ".join(cells) + " |")
    (out / "sim_cg_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
