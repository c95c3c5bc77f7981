"""``mesa-compile train``: train a MesaNetLM on a synthetic task or a token file, with checkpoints.

mesa-compile train --preset tiny --task mqar --steps 300 --out runs/mqar
mesa-compile train --config model.json --data tokens.bin --token-dtype uint16 --seq-len 256
mesa-compile train --out runs/mqar --resume           # continue from the newest checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mesa-compile train``."""
    from mesa_compile.config import PRESETS

    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model preset (default: tiny; with --resume: the checkpoint's config)",
    )
    source.add_argument(
        "--config", default=None, help="MesaConfig JSON file (e.g. a checkpoint's config.json)"
    )
    model.add_argument(
        "--cg-steps", type=int, default=None, help="CG steps per token in training (default: the config's)"
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--task",
        choices=("mqar", "tokens"),
        default=None,
        help="mqar: multi-query associative recall (default); tokens: next-token prediction on --data",
    )
    data.add_argument("--data", default=None, help="token file: raw token ids (.bin) or text (read as bytes)")
    data.add_argument(
        "--token-dtype",
        choices=("uint16", "uint32", "bytes"),
        default=None,
        help="how --data is read (default: uint16 for .bin files, bytes otherwise)",
    )
    data.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of a token file")
    data.add_argument(
        "--mqar-pairs", type=int, default=8, help="MQAR key-value pairs per sequence (all queried)"
    )
    data.add_argument("--mqar-vocab", type=int, default=32, help="MQAR key and value alphabet sizes")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the batch streams")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--out", default="runs/train", help="output folder for checkpoints (default: runs/train)"
    )
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run.add_argument("--steps", type=int, default=1000, help="total optimiser steps (default: 1000)")
    run.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    run.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    run.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine (default: 0.1)"
    )
    run.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default: 50)")
    run.add_argument(
        "--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default: 0.1)"
    )
    run.add_argument(
        "--grad-clip", type=float, default=1.0, help="global gradient-norm clip, 0 = off (default: 1.0)"
    )
    run.add_argument("--eval-every", type=int, default=100, help="eval loss every N steps (default: 100)")
    run.add_argument("--eval-batches", type=int, default=4, help="batches per evaluation (default: 4)")
    run.add_argument(
        "--checkpoint-every", type=int, default=100, help="checkpoint every N steps (default: 100)"
    )
    run.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default: 2)")
    run.add_argument("--no-compile", action="store_true", help="run eagerly instead of torch.compile")
    run.add_argument(
        "--compile-backend",
        default="auto",
        help="torch.compile backend (default auto: inductor on CUDA, aot_eager on CPU)",
    )
    run.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA when present)"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the weight init (default: 0)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_config(args: argparse.Namespace):
    from mesa_compile.config import MesaConfig
    from mesa_compile.train import latest_checkpoint, load_checkpoint

    if args.config is not None:
        config = MesaConfig.from_json(Path(args.config).read_text())
    elif args.preset is None and args.resume and latest_checkpoint(args.out) is not None:
        config = load_checkpoint(latest_checkpoint(args.out))["model_config"]
    else:
        config = MesaConfig.from_preset(args.preset or "tiny")
    if args.cg_steps is not None:
        config = MesaConfig.from_dict({**config.to_dict(), "cg_steps": args.cg_steps})
    return config


def _source(args: argparse.Namespace):
    from mesa_compile.data import MQARTask, TokenFile

    task = args.task or ("tokens" if args.data else "mqar")
    if task == "mqar":
        if args.data is not None:
            raise ValueError("--data goes with --task tokens")
        pairs, vocab = args.mqar_pairs, args.mqar_vocab
        return MQARTask(
            num_pairs=pairs, num_queries=pairs, num_keys=vocab, num_values=vocab, seed=args.data_seed
        )
    if args.data is None:
        raise ValueError("--task tokens needs --data PATH")
    dtype = args.token_dtype or ("uint16" if args.data.endswith(".bin") else "bytes")
    return TokenFile(args.data, seq_len=args.seq_len, dtype=dtype, seed=args.data_seed)


def run(args: argparse.Namespace) -> int:
    """Train; bad arguments or an unusable checkpoint print one line to stderr and return 2."""
    from mesa_compile.train import TrainConfig, train

    try:
        model_config = _model_config(args)
        source = _source(args)
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            min_lr_ratio=args.min_lr_ratio,
            warmup_steps=args.warmup,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            compile=not args.no_compile,
            compile_backend=args.compile_backend,
            device=args.device,
            seed=args.seed,
        )
        print(f"model: {model_config.num_params():,} parameters; data: {json.dumps(source.describe())}")
        result = train(
            model_config, config, source, args.out, resume=args.resume, progress=not args.no_progress
        )
    except (ValueError, OSError) as err:
        print(f"mesa-compile train: error: {err}", file=sys.stderr)
        return 2
    last = result.evals[-1] if result.evals else {}
    print(
        f"trained steps {result.start_step}..{config.steps} in {result.train_seconds:.1f} s "
        f"({result.tokens_per_s:,.0f} tokens/s); eval loss {last.get('loss', float('nan')):.4f}, "
        f"accuracy {last.get('accuracy', float('nan')):.3f}; checkpoint {result.checkpoint}"
    )
    return 0
