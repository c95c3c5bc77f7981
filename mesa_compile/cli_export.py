"""``mesa-compile export`` and ``mesa-compile run``: ONNX export and onnxruntime generation.

One module serves both subcommands (``cli.SUBCOMMANDS`` names it twice); ``add_arguments`` and
``run`` dispatch on the subcommand's name.

    mesa-compile export --preset tiny --graph decode --cg loop --cg-steps 30 --cg-tol 1e-4 -o decode.onnx
    mesa-compile run decode.onnx --prefill prefill.onnx --prompt "Hello" --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import sys


def _command(parser: argparse.ArgumentParser) -> str:
    return parser.prog.split()[-1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``export`` or ``run`` (whichever ``parser`` is for)."""
    if _command(parser) == "export":
        parser.add_argument("-o", "--output", required=True, help="path of the ONNX file to write")
        parser.add_argument("--preset", default="tiny", help="model preset (randomly initialised weights)")
        parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
        parser.add_argument("--layer", action="store_true", help="export one MesaLayer instead of the LM")
        parser.add_argument("--graph", choices=("decode", "prefill"), default="decode")
        parser.add_argument("--cg", choices=("fixed", "loop", "plugin"), default="fixed")
        parser.add_argument("--cg-steps", type=int, default=None, help="CG steps (default: the preset's)")
        parser.add_argument(
            "--cg-tol", type=float, default=None, help="early-exit tolerance (default: the preset's)"
        )
        parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    else:
        parser.add_argument("model", help="decode graph written by `mesa-compile export --graph decode`")
        parser.add_argument("--prefill", default=None, help="optional prefill graph of the same model")
        parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--prompt", help="text, fed as UTF-8 bytes (needs vocab_size >= 256)")
        source.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
        parser.add_argument("--max-new-tokens", type=int, default=32)
        parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        parser.add_argument("--top-k", type=int, default=None)
        parser.add_argument("--seed", type=int, default=None, help="sampling seed")


def run(args: argparse.Namespace) -> int:
    """Run ``export`` or ``run``; bad input prints one line to stderr and returns 2."""
    try:
        return _export(args) if args.command == "export" else _generate(args)
    except (ValueError, ImportError) as err:
        print(f"mesa-compile {args.command}: error: {err}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    import torch

    from mesa_compile import MesaConfig, MesaLayer, MesaNetLM
    from mesa_compile.export import to_onnx

    config = MesaConfig.from_preset(args.preset)
    torch.manual_seed(args.seed)
    model = (MesaLayer if args.layer else MesaNetLM)(config).eval()
    path = to_onnx(
        model, args.output, graph=args.graph, cg=args.cg, cg_steps=args.cg_steps, cg_tol=args.cg_tol,
        dtype=getattr(torch, args.dtype),
    )  # fmt: skip
    print(f"wrote {path} ({args.graph} graph, cg={args.cg}, {args.dtype})")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from mesa_compile.runtimes import OrtSession

    sess = OrtSession(args.model, provider=args.provider, prefill_path=args.prefill)
    if args.prompt is not None:
        if sess.vocab_size < 256:
            raise ValueError(
                f"--prompt needs a byte vocabulary (vocab_size >= 256), got {sess.vocab_size}: use --tokens"
            )
        prompt = list(args.prompt.encode("utf-8"))
    else:
        try:
            prompt = [int(t) for t in args.tokens.split(",")]
        except ValueError as err:
            raise ValueError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from err
    out = sess.generate(
        np.array([prompt]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )[0]
    print(",".join(str(int(t)) for t in out))
    if args.prompt is not None:
        print(bytes(int(t) for t in out if t < 256).decode("utf-8", errors="replace"))
    return 0
