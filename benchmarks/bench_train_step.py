"""LM training step on one GPU: eager vs torch.compile(fullgraph=True), same model, same batch.

Writes <out>/bench_train_step.json and .md (card, versions, step times in ms, tokens/s).
Usage: python benchmarks/bench_train_step.py [--out DIR] [--preset tiny] [--batch 8] [--seq 2048]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mesa_compile import MesaConfig, MesaNetLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--preset", default="145m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--cg-steps", type=int, default=10)
    args = ap.parse_args()

    config = MesaConfig.from_preset(args.preset, cg_steps=args.cg_steps)
    model = MesaNetLM(config).cuda()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    compiled_loss = torch.compile(loss_fn, fullgraph=True)

    def step(fn) -> None:
        opt.zero_grad(set_to_none=True)
        fn(ids).backward()
        opt.step()

    t0 = time.perf_counter()
    step(compiled_loss)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    rows = {}
    for name, fn in (("eager", loss_fn), ("compiled", compiled_loss)):
        rows[name] = do_bench(lambda: step(fn), warmup=3, rep=10, return_mode="median")
    tokens = args.batch * args.seq
    meta = dict(
        card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        preset=args.preset, batch=args.batch, seq=args.seq, cg_steps=args.cg_steps, first_compiled_step_s=compile_s,
    )  # fmt: skip
    result = dict(meta=meta, step_ms=rows, tokens_per_s={k: tokens / (v / 1e3) for k, v in rows.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_step.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"LM training step ({args.preset}, B={args.batch}, T={args.seq}, {args.cg_steps} CG steps, bf16 autocast, "
        f"AdamW) on {meta['card']}, torch {meta['torch']}, triton {meta['triton']}",
        "",
        "| mode | step ms | tokens/s |",
        "|---|---|---|",
        *(f"| {k} | {v:.1f} | {result['tokens_per_s'][k]:,.0f} |" for k, v in rows.items()),
        "",
        f"first compiled step (compile included): {compile_s:.1f} s; compiled/eager speedup: "
        f"{rows['eager'] / rows['compiled']:.2f}x",
    ]
    (out / "bench_train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
