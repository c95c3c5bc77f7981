"""Per-token decode latency: onnxruntime CUDA vs torch eager vs torch.compile'd decode (GPU).

For each preset (tiny, 145m) and batch size (1, 16): export the decode graph, then time greedy
decoding (next token on the host each step, as a generation loop needs it) after a short prompt.
Writes JSON and a markdown table (default benchmarks/ort_decode.{json,md}).

    python benchmarks/bench_ort_decode.py --presets tiny 145m --batch 1 16 --cg loop fixed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from mesa_compile.export import to_onnx
from mesa_compile.runtimes import OrtSession

from mesa_compile import MesaConfig, MesaNetLM


def _time_loop(step, n_warmup: int, n_steps: int, repeats: int) -> list[float]:
    """Median-ready list of per-token latencies in ms (each repeat runs n_steps tokens)."""
    for _ in range(n_warmup):
        step()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / n_steps * 1e3)
    return out


def _torch_stepper(model: MesaNetLM, prompt: torch.Tensor, compiled: bool):
    decode = torch.compile(model.decode_one_token, fullgraph=True) if compiled else model.decode_one_token
    with torch.no_grad():
        logits, state = model(prompt)
    box = {"token": logits[:, -1:].argmax(-1), "state": state}

    @torch.no_grad()
    def step() -> None:
        logits, box["state"] = decode(box["token"], box["state"])
        box["token"] = logits.argmax(-1, keepdim=True).cpu().cuda()  # the host sees every token

    return step


def _ort_stepper(sess: OrtSession, prompt: np.ndarray):
    logits, state = sess.prefill(prompt)
    box = {"token": logits[:, -1].argmax(-1)[:, None], "state": state}

    def step() -> None:
        logits, box["state"] = sess.step(box["token"], box["state"])
        box["token"] = logits.argmax(-1)[:, None]

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "145m"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument(
        "--cg", nargs="+", default=["loop"], help="ONNX CG forms (fixed unrolls: slow export)"
    )
    parser.add_argument("--cg-steps", type=int, default=30)
    parser.add_argument("--cg-tol", type=float, default=0.0)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-json", default="benchmarks/ort_decode.json")
    parser.add_argument("--out-md", default="benchmarks/ort_decode.md")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            torch.manual_seed(0)
            config = MesaConfig.from_preset(preset, cg_steps=args.cg_steps, cg_tol=args.cg_tol)
            model = MesaNetLM(config).eval()
            paths = {}
            for cg in args.cg:
                t0 = time.perf_counter()
                paths[cg] = to_onnx(model, Path(tmp) / f"{preset}-{cg}.onnx", graph="decode", cg=cg)
                print(f"[{preset}] exported cg={cg} in {time.perf_counter() - t0:.0f} s", flush=True)
            gpu = model.cuda()
            for B in args.batch:
                prompt = torch.randint(0, config.vocab_size, (B, args.prompt_len), device="cuda")
                runners = {"torch eager": _torch_stepper(gpu, prompt, False),
                           "torch.compile": _torch_stepper(gpu, prompt, True)}  # fmt: skip
                for cg, path in paths.items():
                    runners[f"onnxruntime CUDA ({cg})"] = _ort_stepper(
                        OrtSession(path, "cuda"), prompt.cpu().numpy()
                    )
                for name, step in runners.items():
                    ms = _time_loop(step, n_warmup=3, n_steps=args.steps, repeats=args.repeats)
                    row = {"preset": preset, "batch": B, "runner": name, "ms_per_token": float(np.median(ms))}
                    rows.append({**row, "ms_min": float(min(ms)), "ms_max": float(max(ms))})
                    print(rows[-1], flush=True)
            del gpu, model
            torch.cuda.empty_cache()

    import onnxruntime

    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    meta["onnxruntime"] = onnxruntime.__version__
    meta.update(commit=commit, cg_steps=args.cg_steps, cg_tol=args.cg_tol)
    meta.update(steps=args.steps, repeats=args.repeats)
    Path(args.out_json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        (
            f"Decode latency per token (median of {args.repeats} x {args.steps} greedy tokens, next token on "
            f"the host), {meta['gpu']}, torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, "
            f"commit {commit}, cg_steps={args.cg_steps}, cg_tol={args.cg_tol}"
        ),
        "",
        "| preset | batch | runner | ms / token | min | max |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        times = f"{r['ms_per_token']:.3f} | {r['ms_min']:.3f} | {r['ms_max']:.3f}"
        lines.append(f"| {r['preset']} | {r['batch']} | {r['runner']} | {times} |")
    Path(args.out_md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
