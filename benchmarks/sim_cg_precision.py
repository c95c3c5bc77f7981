"""CPU fp64 simulation of the chunk kernels' CG solve with its products rounded as on the GPU.

What it answers: which lo passes of the CG matvec could run in fp8 (e4m3) without breaking the
accuracy bound (o within 1e-3 of the exact solve at cond ~400). The matvec of token t in chunk c is
  A(p)_t = e^{b_t} (H_hi + H_lo) p_t + sum_s (S_hi + S_lo)[t, s] k_s + lamb p_t,
  S[t, s] = (k_s . p_t) M[t, s],
with H_c kept in fp32 (the state pass), hi = bf16(x), lo = x - hi, and the CG of chunk_cg.py (search
directions rounded to bf16, x0 = bf16(Jacobi guess)). Variants of the lo products:
  bf16x2    H_lo and S_lo in bf16 (what the kernels compute)
  fp8_h     H_lo and p in fp8, one power-of-two scale per (chunk, head) for H_lo and per token for p
  fp8_s     S_lo in fp8 (scale per chunk), keys exact
  fp8_sk    S_lo and the keys both in fp8, as a tensor-core fp8 product needs
  h16_l8    H_c as a scaled fp16 hi part (scale per (chunk, head); directions are exact in it) plus
            an fp8 lo part as in fp8_h; S as in bf16x2
  h16_l8_sk h16_l8 with S as in fp8_sk
  s16       S as one scaled fp16 pass (power-of-two scale per token; keys exact in fp16), H_c as in
            bf16x2
  single    no lo products (one pass each, like the reference kernels)
  relax_T   bf16x2 while some row of the chunk has ||r|| > T ||r0||, single afterwards (chunk_cg.py's
            relaxed matvecs; the mean number of relaxed steps is recorded too)
fp32 accumulation is not modelled (its error is ~1e-7, below the 16-bit split). Inputs as
bench_ops.py's accuracy rows: B=1 T=1024 H=4 K=V=128 bf16, lambda 0.25, random keys (gate bias 3) and
keys normalize(3 u + noise) with one u per head and gate bias 6 (cond ~350), and normalize(6 u + noise)
with gate bias 8 (cond ~850). Error of q* and of
o = G_t^T q* against the exact fp64 solve of the same inputs.
Writes <out>/sim_cg_precision.json and .md.
Usage: python benchmarks/sim_cg_precision.py [--out DIR] [--variants V ...]
(about 2 minutes per variant set on 2 cores, 2-3 GB of memory).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from mesa_compile.ops import reference as ref

B, T, H, D, C = 1, 1024, 4, 128, 32
NT = T // C
LAMB = 0.25
RELAX = {"relax_1e-3": 1e-3, "relax_1e-2": 1e-2}
VARIANTS = ("bf16x2", "fp8_h", "fp8_s", "fp8_sk", "h16_l8", "h16_l8_sk", "s16", "single", *RELAX)
STEPS = (10, 30)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def scaled(x: torch.Tensor, dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Rounding to dtype with a power-of-two scale per slice (its largest magnitude maps below the
    dtype's maximum)."""
    amax = x.abs().amax(dim=dims, keepdim=True).clamp_min(1e-300)
    scale = torch.exp2(torch.floor(torch.log2(torch.finfo(dtype).max / amax)))
    return (x * scale).to(dtype).to(torch.float64) / scale


def fp8(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """fp8 e4m3 rounding with a power-of-two scale per slice."""
    return scaled(x, dims, torch.float8_e4m3fn)


def chunked_inputs(corr: float, gate_bias: float, seed: int = 0) -> dict:
    """Per (head, chunk) tiles (H, NT, C, ...) in fp64 of bf16-rounded inputs, chunk decays, states."""
    torch.manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
    k = corr * torch.randn(1, 1, H, D) + k
    q, k = (ref.l2_normalize(t.bfloat16().float()).bfloat16().double() for t in (q, k))
    v = v.bfloat16().double()
    g = F.logsigmoid(torch.randn(B, T, H) + gate_bias).double()
    beta = torch.rand(B, T, H).double()

    def tiles(t: torch.Tensor) -> torch.Tensor:
        return t[0].transpose(0, 1).reshape(H, NT, C, *t.shape[3:])

    qc, kc, vc, gc, bc = (tiles(t) for t in (q, k, v, g, beta))
    bcum = gc.cumsum(-1)
    m = torch.tril(torch.exp(bcum[..., :, None] - bcum[..., None, :])) * bc[..., None, :]  # [t, s]
    w = torch.exp(bcum[..., -1:] - bcum) * bc
    hc = torch.zeros(H, NT, D, D, dtype=torch.float64)
    gcs = torch.zeros_like(hc)
    h, gs = torch.zeros(H, D, D, dtype=torch.float64), torch.zeros(H, D, D, dtype=torch.float64)
    for c in range(NT):
        hc[:, c], gcs[:, c] = h, gs
        decay = torch.exp(bcum[:, c, -1])[:, None, None]
        h = decay * h + torch.einsum("hs,hsi,hsj->hij", w[:, c], kc[:, c], kc[:, c])
        gs = decay * gs + torch.einsum("hs,hsi,hsj->hij", w[:, c], kc[:, c], vc[:, c])
    return dict(q=qc, k=kc, v=vc, m=m, eb=torch.exp(bcum), hc=hc.float().double(), gc=gcs)


def read_out(x: torch.Tensor, d: dict) -> torch.Tensor:
    inter = d["eb"][..., None] * torch.einsum("hnti,hnij->hntj", x, d["gc"])
    scores = torch.einsum("hnti,hnsi->hnts", x, d["k"]) * d["m"]
    return inter + torch.einsum("hnts,hnsj->hntj", scores, d["v"])


def matvec(p: torch.Tensor, d: dict, variant: str) -> torch.Tensor:
    """A(p) for directions p (H, NT, C, D) exact in bf16, lo products as the variant rounds them."""
    h_hi = scaled(d["hc"], (-1, -2), torch.float16) if variant.startswith("h16") else bf16(d["hc"])
    h_lo = d["hc"] - h_hi
    hp = torch.einsum("hnij,hntj->hnti", h_hi, p)
    if variant == "fp8_h" or variant.startswith("h16"):
        hp = hp + torch.einsum("hnij,hntj->hnti", fp8(h_lo, (-1, -2)), fp8(p, (-1,)))
    elif variant != "single":
        hp = hp + torch.einsum("hnij,hntj->hnti", bf16(h_lo), p)
    s = torch.einsum("hnti,hnsi->hnts", p, d["k"]) * d["m"]
    if variant == "s16":
        k16 = d["k"].to(torch.float16).to(torch.float64)
        intra = torch.einsum("hnts,hnsi->hnti", scaled(s, (-1,), torch.float16), k16)
        return d["eb"][..., None] * hp + intra + LAMB * p
    s_hi = bf16(s)
    intra = torch.einsum("hnts,hnsi->hnti", s_hi, d["k"])
    if variant == "fp8_s":
        intra = intra + torch.einsum("hnts,hnsi->hnti", fp8(s - s_hi, (-1, -2)), d["k"])
    elif variant in ("fp8_sk", "h16_l8_sk"):
        intra = intra + torch.einsum("hnts,hnsi->hnti", fp8(s - s_hi, (-1, -2)), fp8(d["k"], (-1, -2)))
    elif variant != "single":
        intra = intra + torch.einsum("hnts,hnsi->hnti", bf16(s - s_hi), d["k"])
    return d["eb"][..., None] * hp + intra + LAMB * p


def token_systems(d: dict) -> torch.Tensor:
    """A_t = H_t + lamb I of every token, (H, NT, C, D, D) fp64, from chunked_inputs' tiles."""
    intra = torch.einsum("hnts,hnsi,hnsj->hntij", d["m"], d["k"], d["k"])
    return d["eb"][..., None, None] * d["hc"][:, :, None] + intra + LAMB * torch.eye(D, dtype=torch.float64)


def simulate(corr: float, gate_bias: float, variants: tuple[str, ...] = VARIANTS) -> dict:
    d = chunked_inputs(corr, gate_bias)
    h_t = token_systems(d)
    x_exact = torch.linalg.solve(h_t, d["q"][..., None])[..., 0]
    o_exact = read_out(x_exact, d)
    row = dict(corr=corr, gate_bias=gate_bias, median_cond=torch.linalg.cond(h_t).median().item())
    diag = torch.diagonal(h_t, dim1=-2, dim2=-1)
    del h_t
    for variant in variants:
        x = bf16(d["q"] / diag)
        r = d["q"] - matvec(x, d, "bf16x2" if variant in RELAX else variant)
        p = bf16(r)
        rr, rp = (r * r).sum(-1), (r * p).sum(-1)
        rr0, relaxed = rr, 0.0
        for step in range(1, max(STEPS) + 1):
            if variant in RELAX:
                full = (rr > RELAX[variant] ** 2 * rr0).any(-1)  # per (head, chunk)
                ap = torch.where(full[..., None, None], matvec(p, d, "bf16x2"), matvec(p, d, "single"))
                relaxed += (~full).double().mean().item()
            else:
                ap = matvec(p, d, variant)
            pap = (p * ap).sum(-1)
            ok = pap > 0
            alpha = torch.where(ok, rp / torch.where(ok, pap, 1.0), 0.0)
            x = x + alpha[..., None] * p
            r = r - alpha[..., None] * ap
            rr_new = (r * r).sum(-1)
            go = ok & (rr_new > 0)
            p = bf16(r + torch.where(go, rr_new / torch.where(go, rr, 1.0), 0.0)[..., None] * p)
            rp = (r * p).sum(-1)
            rr = torch.where(go, rr_new, rr)
            if step in STEPS:
                row[f"{variant}_{step}_q"] = ((x - x_exact).norm() / x_exact.norm()).item()
                row[f"{variant}_{step}_o"] = ((read_out(x, d) - o_exact).norm() / o_exact.norm()).item()
                row[f"{variant}_{step}_relaxed"] = relaxed
        print(variant, {k: f"{v:.2e}" for k, v in row.items() if k.startswith(variant)}, flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = tuple(args.variants)
    rows = [simulate(corr, bias, variants) for corr, bias in ((0.0, 3.0), (3.0, 6.0), (6.0, 8.0))]
    (out / "sim_cg_precision.json").write_text(json.dumps(rows, indent=1))
    lines = ["# CG precision simulation (fp64, CPU): rel. error of o (of q*) against the exact solve", "",
             "| keys | median cond | lo products | " + " | ".join(f"{s} steps" for s in STEPS) + " |",
             "|---|---|---|" + "---|" * len(STEPS)]
    for row in rows:
        keys = "random" if row["corr"] == 0 else f"correlated ({row['corr']:g}, bias {row['gate_bias']:g})"
        for variant in variants:
            cells = [f"{row[f'{variant}_{s}_o']:.2e} ({row[f'{variant}_{s}_q']:.2e})" for s in STEPS]
            if variant in RELAX:
                cells = [f"{c}, {row[f'{variant}_{s}_relaxed']:.1f} relaxed" for c, s in zip(cells, STEPS)]
            lines.append(f"| {keys} | {row['median_cond']:.0f} | {variant} | " + " | ".join(cells) + " |")
    (out / "sim_cg_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
