"""``mesa-compile demo``: MesaNet end to end in a few minutes, with no download.

1. train a small MesaNetLM with torch.compile on multi-query associative recall (MQAR);
2. evaluate recall accuracy against a fixed number of CG steps (0..30) and against the early-exit
   tolerance cg_tol (1e-2..1e-6, with the mean CG steps it used): MesaNet's test-time compute knob;
3. export decode and prefill ONNX graphs (early-exit CG in an ONNX Loop), generate greedily with
   onnxruntime and compare with torch token for token, and the logits;
4. write ``summary.json``, ``accuracy_vs_cg.png`` and the weights to the output folder, and print a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

FIXED_STEPS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 25, 30)  # CG steps of the fixed-budget sweep
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # cg_tol of the early-exit sweep (bounded by MAX_STEPS)
MAX_STEPS = 30  # the paper's CG budget
EXPORT_TOL = 1e-4  # early-exit tolerance of the exported graphs (the paper's)

# NOTE: the model (one Mesa layer of width 128, 4 heads of size 32) was chosen by a sweep of 200-step
# runs on an H200: width 64 or heads of size 16 stalled for one seed, two layers learned slower.
# The task and regulariser make the solve matter. At 8 pairs and the config's default lambda (1.0,
# floor 0.25) the Jacobi guess alone recalled 0.974 and 2 CG steps 1.000: a flat curve. A small
# lambda (init 0.05, floor 0.002) leaves H + diag(lambda) far from diagonal, so the guess is poor.
# Measured on 2 CPU cores, 300 compiled steps, accuracy at 0 / 2 / 5 / 30 CG steps:
#   12 pairs, 10 training steps: seeds 0 / 1 / 2: 0.545 / 0.938 / 0.996 / 1.000,
#     0.609 / 0.955 / 0.996 / 0.999 and 0.490 / 0.924 / 0.994 / 0.999
#   12 pairs, 5 training steps: learned slower (final accuracy 0.97 / 0.82 / 0.79 for seeds 0 / 1 / 2)
#   16 pairs, 10 training steps: 0.52 / 0.92 / 0.99 / 0.997 for seed 0, but seed 2 stalled at 0.42
DEFAULT = {
    "steps": 300,
    "batch_size": 32,
    "lr": 1e-2,
    "warmup": 20,
    "pairs": 12,
    "alphabet": 32,
    "d_model": 128,
    "n_layers": 1,
    "n_heads": 4,
    "head_dim": 32,
    "train_cg_steps": 10,
    "lambda_init": 0.05,
    "lambda_floor": 0.002,
    "eval_batches": 8,
}
QUICK = dict(
    DEFAULT,
    steps=12,
    batch_size=8,
    pairs=8,
    d_model=32,
    n_heads=2,
    head_dim=16,
    train_cg_steps=5,
    eval_batches=1,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mesa-compile demo``."""
    parser.add_argument("--out", default="mesa-demo-out", help="output folder (default: mesa-demo-out)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model trained a few steps, decode graph only: checks the pipeline, learns nothing",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps (default: {DEFAULT['steps']})"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when present)")
    parser.add_argument(
        "--no-compile", action="store_true", help="train eagerly instead of with torch.compile"
    )
    parser.add_argument(
        "--compile-backend",
        default="auto",
        help="torch.compile backend (default auto: inductor on CUDA, aot_eager on CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch and onnxruntime (default: 1 on CPU, the libraries' choice on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default: 0)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    parser.add_argument(
        "--no-export", action="store_true", help="skip ONNX export and onnxruntime (no onnx stack needed)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _require(args: argparse.Namespace) -> None:
    """Fail before any work when an optional stack the demo will use is missing."""
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "the demo's plot needs matplotlib: pip install 'mesa-compile[plot]' (or pass --no-plot)"
            ) from err
    if not args.no_export:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "the demo's export needs the onnx stack: "
                "pip install 'mesa-compile[onnx]' (or pass --no-export)"
            ) from err


def _sweeps(model, task, batch_size: int, batches: int) -> dict[str, list[dict[str, float]]]:
    from mesa_compile.train import evaluate

    fixed = [
        {"cg_steps": s, **evaluate(model, task, batch_size, batches, cg_steps=s, cg_tol=0.0)}
        for s in FIXED_STEPS
    ]
    tol = [
        {"cg_tol": t, **evaluate(model, task, batch_size, batches, cg_steps=MAX_STEPS, cg_tol=t)}
        for t in TOLERANCES
    ]
    return {"fixed_steps": fixed, "tolerance": tol}


def _torch_greedy(model, prompt: torch.Tensor, new: int, cg_steps: int, cg_tol: float) -> torch.Tensor:
    """Greedy continuation with explicit CG settings: prefill, then one token at a time."""
    logits, state = model(prompt, cg_steps=cg_steps, cg_tol=cg_tol)
    tokens = [prompt, logits[:, -1:].argmax(-1)]
    for _ in range(new - 1):
        logits, state = model.decode_one_token(tokens[-1], state, cg_steps=cg_steps, cg_tol=cg_tol)
        tokens.append(logits.argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def _export_and_compare(model, task, out: Path, quick: bool, threads: int | None) -> dict[str, Any]:
    import numpy as np

    from mesa_compile.export import to_onnx
    from mesa_compile.runtimes import OrtSession

    cpu_model = copy.deepcopy(model).cpu().float().eval()
    times, paths = {}, {}
    for graph in ("decode",) if quick else ("decode", "prefill"):
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the exporter's deprecation chatter, not actionable here
            warnings.simplefilter("ignore")
            paths[graph] = to_onnx(
                cpu_model,
                out / f"{graph}.onnx",
                graph=graph,
                cg="loop",
                cg_steps=MAX_STEPS,
                cg_tol=EXPORT_TOL,
            )
        times[graph] = time.perf_counter() - t0
    session = OrtSession(paths["decode"], provider="cpu", prefill_path=paths.get("prefill"), threads=threads)

    ids, targets = task.batch(8, 0, split="eval")
    with torch.no_grad():
        ref_logits = cpu_model(ids, cg_steps=MAX_STEPS, cg_tol=EXPORT_TOL)[0].numpy()
    t0 = time.perf_counter()
    ort_logits, _ = session.prefill(ids.numpy())
    prompt = ids[:, : 2 * task.num_pairs + 1]  # the context and the first query key
    new = 2 * task.num_queries - 1
    ort_tokens = session.generate(prompt.numpy(), max_new_tokens=new)
    ort_seconds = time.perf_counter() - t0
    with torch.no_grad():
        ref_tokens = _torch_greedy(cpu_model, prompt, new, MAX_STEPS, EXPORT_TOL).numpy()
    mask = (targets != -100).numpy()
    return {
        "graphs": {g: os.fspath(p) for g, p in paths.items()},
        "cg": "loop",
        "cg_steps": MAX_STEPS,
        "cg_tol": EXPORT_TOL,
        "export_seconds": times,
        "onnxruntime_seconds": ort_seconds,
        "max_abs_logit_diff": float(np.abs(ort_logits - ref_logits).max()),
        "greedy_tokens_equal": bool((ort_tokens == ref_tokens).all()),
        "greedy_tokens_compared": int(ort_tokens[:, prompt.shape[1] :].size),
        "onnxruntime_accuracy": float((ort_logits.argmax(-1) == targets.numpy())[mask].mean()),
    }


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed, tol = summary["evaluation"]["fixed_steps"], summary["evaluation"]["tolerance"]
    chance = 1.0 / summary["task"]["num_pairs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ax1.plot([r["cg_steps"] for r in fixed], [r["accuracy"] for r in fixed], "o-")
    ax1.axvline(summary["model"]["cg_steps"], color="grey", ls=":", label="training CG steps")
    ax1.set(xlabel="CG steps (fixed)", ylabel="recall accuracy", title="Accuracy vs CG steps")
    ax2.plot([r["mean_cg_steps"] for r in tol], [r["accuracy"] for r in tol], "s-", color="C1")
    for r in tol:
        ax2.annotate(
            f"{r['cg_tol']:.0e}",
            (r["mean_cg_steps"], r["accuracy"]),
            textcoords="offset points",
            xytext=(4, -10),
        )
    ax2.set(xlabel="mean CG steps used (early exit)", title=f"Accuracy vs cg_tol (at most {MAX_STEPS} steps)")
    for ax in (ax1, ax2):
        ax.axhline(chance, color="red", ls="--", lw=0.8, label=f"chance (1/{summary['task']['num_pairs']})")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(
        f"MesaNet on MQAR ({summary['task']['num_pairs']} pairs), {summary['model']['params']:,} parameters"
    )
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".plot-", suffix=".png", dir=path.parent)
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".summary-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage; returns the summary (also written to ``<out>/summary.json``).

    torch's CPU thread count is set for the run (``--threads``) and restored afterwards.
    """
    from mesa_compile.train import resolve_device

    _require(args)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    device = resolve_device(args.device)
    # NOTE: one thread by default on CPU. With another process busy on one of 2 cores, a compiled
    # training step of the default model took 4.3 s with 2 threads (each parallel region waits for
    # the descheduled thread) against 0.26 s with 1, and the whole default demo 266 s against 129 s;
    # on 2 idle cores 2 threads took 105 s and 1 thread 135 s.
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_stages(args, device, threads)
    finally:
        torch.set_num_threads(previous)


def _run_stages(args: argparse.Namespace, device: torch.device, threads: int | None) -> dict[str, Any]:
    from safetensors.torch import save_model

    from mesa_compile.config import MesaConfig
    from mesa_compile.data import MQARTask
    from mesa_compile.train import TrainConfig, resolve_backend, train

    p = QUICK if args.quick else DEFAULT
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    task = MQARTask(
        num_pairs=p["pairs"],
        num_queries=p["pairs"],
        num_keys=p["alphabet"],
        num_values=p["alphabet"],
        seed=args.seed,
    )
    config = MesaConfig(
        vocab_size=task.vocab_size,
        d_model=p["d_model"],
        n_layers=p["n_layers"],
        n_heads=p["n_heads"],
        head_dim=p["head_dim"],
        cg_steps=p["train_cg_steps"],
        chunk_size=task.seq_len,
        lambda_init=p["lambda_init"],
        lambda_floor=p["lambda_floor"],
    )
    steps = args.steps or p["steps"]
    tconf = TrainConfig(
        steps=steps,
        batch_size=p["batch_size"],
        lr=p["lr"],
        warmup_steps=p["warmup"],
        eval_every=0,
        eval_batches=p["eval_batches"],
        checkpoint_every=0,
        compile=not args.no_compile,
        compile_backend=args.compile_backend,
        device=args.device,
        seed=args.seed,
    )
    backend = resolve_backend(args.compile_backend, device) if tconf.compile else "none (eager)"
    print(
        f"[demo] MQAR: {task.num_pairs} key-value pairs, {task.num_keys}-token alphabets, "
        f"{task.seq_len} tokens a sequence"
    )
    print(
        f"[demo] MesaNetLM: {config.num_params():,} parameters, {config.n_layers} layer(s), "
        f"{config.n_heads} heads of size {config.head_dim}, {config.cg_steps} CG steps in training; "
        f"device {device}, torch.compile backend {backend}, "
        f"{'default' if threads is None else threads} CPU thread(s)"
    )

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mesa-demo-") as tmp:
        result = train(config, tconf, task, tmp, progress=not args.no_progress)
    model = result.model.eval()
    stages["train"] = time.perf_counter() - t0
    save_model(model, os.fspath(out / "model.safetensors"))
    (out / "config.json").write_text(config.to_json() + "\n")

    t0 = time.perf_counter()
    print("[demo] evaluating accuracy vs CG steps and vs cg_tol ...")
    evaluation = _sweeps(model, task, 64, p["eval_batches"])
    stages["evaluate"] = time.perf_counter() - t0

    summary: dict[str, Any] = {
        "task": task.describe(),
        "model": {**config.to_dict(), "params": config.num_params()},
        "training": {
            "steps": steps,
            "batch_size": tconf.batch_size,
            "device": str(device),
            "compile_backend": backend,
            "threads": threads,
            "final_loss": result.losses[-1],
            "tokens_per_s": result.tokens_per_s,
            "final_eval": result.evals[-1] if result.evals else None,
        },
        "evaluation": evaluation,
    }
    if not args.no_export:
        t0 = time.perf_counter()
        print("[demo] exporting ONNX graphs and running them in onnxruntime ...")
        summary["onnx"] = _export_and_compare(model, task, out, args.quick, threads)
        stages["export + onnxruntime"] = time.perf_counter() - t0
    if not args.no_plot:
        t0 = time.perf_counter()
        _plot(summary, out / "accuracy_vs_cg.png")
        stages["plot"] = time.perf_counter() - t0
    summary["stage_seconds"] = stages
    summary["total_seconds"] = sum(stages.values())
    _write_json(out / "summary.json", summary)
    return summary


def _report(summary: dict[str, Any], out: Path) -> None:
    ev = summary["evaluation"]
    print("\nCG steps   " + " ".join(f"{r['cg_steps']:>5d}" for r in ev["fixed_steps"]))
    print("accuracy   " + " ".join(f"{r['accuracy']:5.3f}" for r in ev["fixed_steps"]))
    print("\ncg_tol      mean steps  accuracy")
    for r in ev["tolerance"]:
        print(f"{r['cg_tol']:<10.0e}  {r['mean_cg_steps']:10.2f}  {r['accuracy']:8.3f}")
    if "onnx" in summary:
        o = summary["onnx"]
        print(
            f"\nonnxruntime vs torch ({o['cg']} CG, cg_tol {o['cg_tol']:.0e}, "
            f"at most {o['cg_steps']} steps): "
            f"greedy tokens equal: {o['greedy_tokens_equal']} ({o['greedy_tokens_compared']} tokens), "
            f"max |logit diff| {o['max_abs_logit_diff']:.2e}, "
            f"onnxruntime accuracy {o['onnxruntime_accuracy']:.3f}"
        )
    print("\nstage                     seconds")
    for name, seconds in summary["stage_seconds"].items():
        print(f"{name:<24} {seconds:8.1f}")
    print(f"{'total':<24} {summary['total_seconds']:8.1f}")
    print(
        f"\nwrote {out / 'summary.json'}"
        + ("" if "plot" not in summary["stage_seconds"] else f", {out / 'accuracy_vs_cg.png'}")
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; a missing optional stack prints one line to stderr and returns 2."""
    try:
        summary = run_demo(args)
    except (ImportError, ValueError) as err:
        print(f"mesa-compile demo: error: {err}", file=sys.stderr)
        return 2
    _report(summary, Path(args.out))
    return 0
