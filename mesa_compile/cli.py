"""The ``mesa-compile`` command line.

Each subcommand lives in its own module, imported only when that subcommand is chosen, so that
``mesa-compile --help`` needs nothing beyond the standard library and one broken optional stack
cannot take the other subcommands down. A subcommand module provides two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...          # the process exit status

Adding a subcommand is one entry in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import NamedTuple


class Subcommand(NamedTuple):
    name: str  # what the user types
    module: str  # module with add_arguments(parser) and run(args) -> int
    help: str  # one line for `mesa-compile --help`


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "demo",
        "mesa_compile.demo",
        "train a small MesaNet on associative recall, plot accuracy vs CG steps, export to ONNX and "
        "check onnxruntime against torch (a few minutes on CPU)",
    ),
    Subcommand(
        "train",
        "mesa_compile.cli_train",
        "train a MesaNetLM on a synthetic task or a token file, with checkpoints",
    ),
    Subcommand(
        "doctor",
        "mesa_compile.doctor",
        "report versions and devices, then check every Mesa path available on this machine "
        "against the exact solve (exit 1 if one fails)",
    ),
    Subcommand("export", "mesa_compile.cli_export", "export a model to ONNX (fixed / loop / plugin CG forms)"),
    Subcommand("run", "mesa_compile.cli_export", "generate tokens from an exported ONNX model with onnxruntime"),
)


def _version() -> str:
    try:
        return metadata.version("mesa-compile")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only ``command``'s module is imported to add that subcommand's options."""
    parser = argparse.ArgumentParser(
        prog="mesa-compile",
        description="MesaNet's Mesa layer as PyTorch 2 custom ops: tools for this machine.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for sub in SUBCOMMANDS:
        sub_parser = subparsers.add_parser(sub.name, help=sub.help, description=sub.help)
        sub_parser.set_defaults(module=sub.module)
        if sub.name == command:
            importlib.import_module(sub.module).add_arguments(sub_parser)
    return parser


def _chosen_command(argv: Sequence[str]) -> str | None:
    # NOTE: the top-level parser takes no option with a value, so the first word that is not an
    # option is the subcommand (argparse itself reports it if it is unknown).
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mesa-compile`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Usage errors (an unknown subcommand, a bad option) exit with status 2 via ``SystemExit``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    return importlib.import_module(args.module).run(args)


if __name__ == "__main__":
    sys.exit(main())
