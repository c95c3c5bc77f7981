"""Read-out by scan vs from a G state pass, state passes alone vs paired in one launch, and state-pass tiles
64 x 64 vs 32 x 32, across batch x heads.

The data behind the launchers' choices in ops/kernels/chunk_output.py and chunk_states.py (both
depend on how many programs there are per streaming multiprocessor). K = V = 128, bf16, chunk 32;
kernels launched directly (no HOP dispatch). Writes <out>/bench_passes.json and <out>/bench_passes.md.
Usage: python benchmarks/bench_passes.py [--out DIR] [--shape B,T,H ...] [--readout-chunk C]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch._library.triton import set_wrap_triton_enabled  # what torch.library.triton_op does in eager
from triton.testing import do_bench

from mesa_compile.ops import reference as ref
from mesa_compile.ops.kernels import chunk_output, chunk_states

SHAPES = (
    (1, 8192, 4),
    (4, 4096, 4),
    (8, 4096, 4),
    (12, 4096, 4),
    (16, 4096, 4),
    (24, 4096, 4),
    (8, 2048, 16),
)


def ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def readout_inputs(B: int, T: int, H: int, D: int = 128) -> tuple[torch.Tensor, ...]:
    """Seeded read-out inputs on the GPU: unit bf16 keys, bf16 values and output gradient, gates, fp32
    q* and initial G: (k, v, do, g, beta, x, h_kv)."""
    torch.manual_seed(0)
    kn = ref.l2_normalize(torch.randn(B, T, H, D, device="cuda")).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    do = torch.randn_like(v)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3.0)
    beta = torch.rand(B, T, H, device="cuda")
    x = torch.randn(B, T, H, D, device="cuda")
    h0 = torch.randn(B, H, D, D, device="cuda") / D
    return kn, v, do, g, beta, x, h0


def measure(B: int, T: int, H: int, D: int = 128) -> dict:
    kn, v, do, g, beta, x, h0 = readout_inputs(B, T, H, D)
    o1, o2 = torch.empty_like(v), torch.empty_like(v)
    d1, d2 = torch.empty_like(x), torch.empty_like(x)
    r = dict(B=B, T=T, H=H)
    chunk_output.chunk_readout(x, kn, v, g, beta, h0, o1, False, scan=True)
    chunk_output.chunk_readout(x, kn, v, g, beta, h0, o2, False, scan=False)
    chunk_output.chunk_readout_adjoint(do, kn, v, g, beta, h0, d1, False, scan=True)
    chunk_output.chunk_readout_adjoint(do, kn, v, g, beta, h0, d2, False, scan=False)
    # the paths run at their own chunk lengths (READOUT_CHUNKS): equal up to the order of the updates
    r["o_rel"] = ((o2.float() - o1.float()).norm() / o1.float().norm()).item()
    r["dx_rel"] = ((d2 - d1).norm() / d1.norm()).item()
    # the G state pass that the read-out from states launches first, alone
    chunk = chunk_output.READOUT_CHUNKS["states"]
    r["g_pass_ms"] = ms(lambda: chunk_states.chunk_state_pass(kn, v, g, beta, h0, chunk, False, 1.0, False))
    # the read-out runs from states unless asked to scan; the adjoint picks (None) by adjoint_scans
    for scan in (True, False):
        r[f"readout_scan{scan}_ms"] = ms(
            lambda: chunk_output.chunk_readout(x, kn, v, g, beta, h0, o1, False, scan=scan)
        )
    for scan in (True, False, None):
        r[f"adjoint_scan{scan}_ms"] = ms(
            lambda: chunk_output.chunk_readout_adjoint(do, kn, v, g, beta, h0, d1, False, scan=scan)
        )
    # paired passes (one launch) against the same passes alone: the forward H pass at chunk 32 (whole, and
    # its upper tiles only, as the forward runs it) with the G pass of the read-out from states, and the
    # backward's two reverse passes
    Hp = chunk_states.StatePass(kn, kn, h0)
    Hu = chunk_states.StatePass(kn, kn, h0 + h0.transpose(-1, -2), upper=True)
    Gp = chunk_output.readout_state_pass(kn, v, h0, 32)
    Rh = chunk_states.StatePass(x, x, h0, -1.0)
    Rg = chunk_states.StatePass(x, do, h0)
    for name, passes, rev in (("h", [Hp], False), ("h_upper", [Hu], False), ("hg", [Hu, Gp], False),
                              ("rev_h", [Rh], True),
                              ("rev_g", [Rg], True), ("rev_hg", [Rh, Rg], True)):
        r[f"passes_{name}_ms"] = ms(lambda: chunk_states.chunk_state_passes(passes, g, beta, 32, rev, False))
    # the read-outs from states alone, on the G states of the paired launch
    g_states = chunk_states.chunk_state_passes([Hu, Gp], g, beta, 32, False, False)[1]
    r["readout_from_given_states_ms"] = ms(
        lambda: chunk_output.chunk_readout(x, kn, v, g, beta, h0, o1, False, states=g_states))
    r["adjoint_from_given_states_ms"] = ms(
        lambda: chunk_output.chunk_readout_adjoint(do, kn, v, g, beta, h0, d1, False, states=g_states))
    chunk_output.chunk_readout(x, kn, v, g, beta, h0, o1, False, scan=True)
    chunk_output.chunk_readout(x, kn, v, g, beta, h0, o2, False, states=g_states)
    r["o_rel_paired"] = ((o2.float() - o1.float()).norm() / o1.float().norm()).item()  # vs the scan
    NT = triton.cdiv(T, 32)
    s_all = torch.empty(B, NT, H, 2, D, D, device="cuda", dtype=torch.bfloat16)
    fin = torch.empty_like(h0)
    for rev, nw in ((False, 2), (True, 4)):
        for BA in (64, 32):
            grid = (triton.cdiv(D, BA), triton.cdiv(D, BA), B * H)
            r[f"state_rev{rev}_tile{BA}_ms"] = ms(
                lambda: chunk_states._chunk_state_kernel[grid](
                    kn, kn, h0, s_all, fin, kn, kn, h0, s_all, fin, g, beta, T, H, NT, D, D, 1.0, D, D, 1.0,
                    C=32, BA=BA, BB=BA, REVERSE=rev, PAIRED=False, EVERY=1, EVERY2=1, B_EXACT=True,
                    B2_EXACT=True, SPLIT_FP16=False, num_warps=nw, UPPER=False,
                    UNROLL=1 if rev else 2,  # as the launchers at chunk 32
                )
            )
    return r


def write(out: Path, meta: dict, rows: list) -> None:
    (out / "bench_passes.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        f"# bench_passes: {meta['card']} ({meta['sms']} SMs), torch {meta['torch']}, "
        f"triton {meta['triton']}, read-out chunks {meta['readout_chunks']}",
        "",
        "ms (medians), K = V = 128; picked = what the adjoint's launcher picks without given states",
        "",
        "| B | T | H | read-out scan / states | adjoint scan / states / picked "
        "| G pass of the read-out from states | read-out / adjoint from given states "
        "| H pass whole / upper tiles / H (upper) + G paired | reverse passes H, G / paired "
        "| forward pass 64 / 32 tiles | reverse pass 64 / 32 tiles |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [" / ".join(f"{r[f'readout_scan{s}_ms']:.2f}" for s in (True, False)),
                 " / ".join(f"{r[f'adjoint_scan{s}_ms']:.2f}" for s in (True, False, None))]
        cells += [
            f"{r['g_pass_ms']:.2f}",
            f"{r['readout_from_given_states_ms']:.2f} / {r['adjoint_from_given_states_ms']:.2f}",
            " / ".join(f"{r[f'passes_{n}_ms']:.2f}" for n in ("h", "h_upper", "hg")),
            f"{r['passes_rev_h_ms']:.2f}, {r['passes_rev_g_ms']:.2f} / {r['passes_rev_hg_ms']:.2f}",
        ] + [
            " / ".join(f"{r[f'state_rev{rev}_tile{t}_ms']:.2f}" for t in (64, 32)) for rev in (False, True)
        ]
        lines.append(f"| {r['B']} | {r['T']} | {r['H']} | " + " | ".join(cells) + " |")
    (out / "bench_passes.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shape", action="append", default=[], metavar="B,T,H",
                    help="time this shape (repeatable) instead of the default list")
    ap.add_argument("--readout-chunk", type=int, default=None,
                    help="chunk length of both read-out paths (default: the launchers' READOUT_CHUNKS)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.readout_chunk:
        chunk_output.READOUT_CHUNKS = dict.fromkeys(chunk_output.READOUT_CHUNKS, a.readout_chunk)
    meta = dict(
        card=torch.cuda.get_device_name(),
        sms=torch.cuda.get_device_properties(0).multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        readout_chunks=chunk_output.READOUT_CHUNKS,
    )
    shapes = [tuple(int(n) for n in shape.split(",")) for shape in a.shape] or SHAPES
    rows = []
    with set_wrap_triton_enabled(False):
        for B, T, H in shapes:
            rows.append(measure(B, T, H))
            print(json.dumps(rows[-1]), flush=True)
            write(out, meta, rows)


if __name__ == "__main__":
    main()
