"""``mesa-compile doctor``: what works on this machine.

Reports the Python, torch, CUDA, Triton and ONNX stacks, then runs a small forward and backward
through every Mesa path this machine has and compares each with the exact solve:

- forward: relative L2 error of ``o`` against ``mesa_net_exact`` in fp32;
- backward: relative L2 error of the input gradients against autograd of ``mesa_net_exact`` in fp64
  (the worst input of q, k, v, g, beta, lamb).

Paths that this machine cannot run are reported as skipped, not failed. Exit status 0 when every
check that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import Tensor

# Small problem: T spans several chunks with a ragged last one; V != K. Each eager check takes
# about a second on 2 CPU cores.
B, T, H, K, V = 2, 37, 2, 16, 8
CHUNK_SIZE = 16
CG_STEPS = 30  # >= K: CG on a K x K SPD system is converged, so the exact solve is the oracle.
# NOTE: (forward, backward) tolerances per device. On CPU (fp32 aten CG at convergence, lamb >= 0.5)
# the measured errors are 2.5e-7 / 6.9e-7 (mesa_net) and 2.1e-7 / 3.2e-7 (mesa_net_step); 1e-4 / 1e-3
# leave >100x headroom and still catch any wrong term (~1e-1). On CUDA the kernels' dots run in
# bf16x3 (5e-5 relative error at condition number 400, ops/kernels/chunk_common.py); the bounds are
# the precision policy's 1e-3 forward target and 10x that for the gradients.
TOLERANCES = {"cpu": (1e-4, 1e-3), "cuda": (1e-3, 1e-2)}
GRAD_NAMES = ("q", "k", "v", "g", "beta", "lamb")
PARTS = ("forward", "backward")
COMPILE_BACKENDS = ("eager", "aot_eager", "inductor")
# NOTE: Inductor on CPU spends minutes generating C++ for the unrolled CG of fwd + bwd on 2 cores;
# aot_eager traces the same full graphs (no graph break allowed) in seconds.
DEFAULT_COMPILE_BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}


class Skipped(Exception):
    """A check this machine cannot run; the message is the reason."""


@dataclass
class CheckResult:
    name: str
    status: str  # "ok", "FAIL", "skipped (<reason>)" or "FAIL (<exception>)"
    error: float | None = None
    tol: float | None = None
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mesa-compile doctor``."""
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the torch.compile checks (the slowest ones)"
    )
    parser.add_argument(
        "--compile-backend",
        choices=COMPILE_BACKENDS,
        help="torch.compile backend of the compile checks (default: aot_eager on CPU, which captures "
        "forward and backward graphs without code generation; inductor on CUDA)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the traceback of every check that raises"
    )


# ----------------------------------------------------------------------------- environment report


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _ort_providers() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return ", ".join(onnxruntime.get_available_providers())


def environment() -> list[tuple[str, str]]:
    """(label, value) rows describing this machine's stacks; optional ones say "not installed"."""
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("mesa-compile", _dist_version("mesa-compile")),
        ("torch", torch.__version__),
    ]
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        cuda = f"yes: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {count} device(s))"
    elif torch.version.cuda is None:
        cuda = "no (CPU-only torch build)"
    else:
        cuda = f"no device (torch built for CUDA {torch.version.cuda})"
    rows.append(("cuda", cuda))
    rows.append(("triton", _dist_version("triton")))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "not set")))
    for dist in ("onnx", "onnxscript", "onnxruntime", "onnxruntime-extensions"):
        rows.append((dist, _dist_version(dist)))
    rows.append(("onnxruntime providers", _ort_providers()))
    return rows


# ----------------------------------------------------------------------------- inputs and errors


def make_inputs(device: str, seed: int = 0) -> dict[str, Tensor]:
    """Fixed random inputs in the ranges the layer produces (g <= 0, beta in (0, 1), lamb > 0)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(B, T, H, K),  # (B, T, H, K)
        "k": randn(B, T, H, K),  # (B, T, H, K)
        "v": randn(B, T, H, V),  # (B, T, H, V)
        "g": torch.nn.functional.logsigmoid(randn(B, T, H) + 2.0),  # (B, T, H) log forget gate
        "beta": torch.sigmoid(randn(B, T, H)),  # (B, T, H)
        "lamb": 0.5 + torch.rand(H, K, generator=gen, dtype=torch.float64),  # (H, K)
    }
    return {name: x.to(device=device, dtype=torch.float32) for name, x in inputs.items()}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _exact(x: dict[str, Tensor]) -> Tensor:
    from mesa_compile.ops import mesa_net_exact

    return mesa_net_exact(x["q"], x["k"], x["v"], x["g"], x["beta"], x["lamb"]).o


def _chunked(fn: Callable[..., object]) -> Callable[[dict[str, Tensor]], Tensor]:
    def run(x: dict[str, Tensor]) -> Tensor:
        out = fn(
            x["q"], x["k"], x["v"], x["g"], x["beta"], x["lamb"], cg_steps=CG_STEPS, chunk_size=CHUNK_SIZE
        )
        return out.o

    return run


def _stepped(x: dict[str, Tensor]) -> Tensor:
    """The sequence token by token through ``mesa_net_step`` from a zero state."""
    from mesa_compile.ops import MesaState, mesa_net_step

    state = MesaState(
        x["q"].new_zeros(B, H, K, K, dtype=torch.float32),  # (B, H, K, K)
        x["q"].new_zeros(B, H, K, V, dtype=torch.float32),  # (B, H, K, V)
    )
    outs = []
    for t in range(T):
        o, state, _ = mesa_net_step(
            x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"][:, t], x["beta"][:, t], x["lamb"], state,
            cg_steps=CG_STEPS,
        )
        outs.append(o)  # (B, H, V)
    return torch.stack(outs, dim=1)  # (B, T, H, V)


# ----------------------------------------------------------------------------- checks


def _timed(name: str, tol: float, measure: Callable[[], float], verbose: bool) -> CheckResult:
    start = time.perf_counter()
    try:
        error = measure()
    except Skipped as reason:
        return CheckResult(name, f"skipped ({reason})")
    except Exception as exc:  # a check that raises is a failure, reported with its cause
        if verbose:
            traceback.print_exc()
        message = (str(exc).strip().splitlines() or [""])[0][:100]
        seconds = time.perf_counter() - start
        return CheckResult(name, f"FAIL ({type(exc).__name__}: {message})", seconds=seconds)
    seconds = time.perf_counter() - start
    ok = error == error and error <= tol  # error == error is False for NaN
    return CheckResult(name, "ok" if ok else "FAIL", error, tol, seconds)


def check_path(
    label: str,
    device: str,
    fn: Callable[[dict[str, Tensor]], Tensor],
    verbose: bool,
    precondition: Callable[[], None],
) -> Iterator[CheckResult]:
    """Forward and backward of ``fn`` on ``device`` against the exact solve.

    One forward with grad enabled serves both rows, so a compiled ``fn`` compiles once.
    """
    run: dict[str, object] = {}

    def forward() -> float:
        precondition()
        inputs = make_inputs(device)
        leaves = {name: x.clone().requires_grad_(True) for name, x in inputs.items()}
        run.update(inputs=inputs, leaves=leaves, o=fn(leaves))
        with torch.no_grad():
            return rel_err(run["o"], _exact(inputs))

    def backward() -> float:
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)  # (B, T, H, V)
        o, leaves = run["o"], run["leaves"]
        grads = torch.autograd.grad(o, [leaves[n] for n in GRAD_NAMES], grad_outputs=do.to(o))
        exact_leaves = {n: x.double().cpu().requires_grad_(True) for n, x in run["inputs"].items()}
        exact = torch.autograd.grad(_exact(exact_leaves), [exact_leaves[n] for n in GRAD_NAMES], do)
        return max(rel_err(a, e) for a, e in zip(grads, exact))

    fwd_tol, bwd_tol = TOLERANCES[device]
    fwd = _timed(f"{label} forward", fwd_tol, forward, verbose)
    yield fwd
    if fwd.status.startswith("skipped"):
        yield CheckResult(f"{label} backward", fwd.status)
    elif "o" not in run:
        yield CheckResult(f"{label} backward", "skipped (forward raised)")
    else:
        yield _timed(f"{label} backward", bwd_tol, backward, verbose)


def _always() -> None:
    """No precondition: the path exists wherever torch does."""


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skipped("no CUDA device")
    if _dist_version("triton") == "not installed":
        raise Skipped("triton not installed")


def _need_cpp_compiler() -> None:
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if cxx):
        raise Skipped("no C++ compiler for Inductor")


def _compiled(backend: str) -> Callable[[dict[str, Tensor]], Tensor]:
    from mesa_compile.ops import mesa_net

    return torch.compile(_chunked(mesa_net), fullgraph=True, dynamic=False, backend=backend)


def run_checks(*, compile_backend: dict[str, str | None], verbose: bool = False) -> list[CheckResult]:
    """Every check, in order; unavailable ones come back as skipped.

    ``compile_backend`` maps "cpu" and "cuda" to a torch.compile backend, or None to skip that check.
    """
    from mesa_compile.ops import mesa_net

    # The ops run their Triton kernels on CPU tensors in eager when the interpreter is on.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and _dist_version("triton") != "not installed"
    cpu_impl = "triton interpreter" if interpreted else "aten"
    results: list[CheckResult] = []
    for device, impl, needs in (("cpu", cpu_impl, _always), ("cuda", "triton", _need_cuda)):
        results += check_path(f"mesa_net {device} ({impl})", device, _chunked(mesa_net), verbose, needs)
        results += check_path(f"mesa_net_step {device} ({impl})", device, _stepped, verbose, needs)
        backend = compile_backend[device]
        if backend is None:
            label = f"torch.compile(mesa_net, fullgraph) {device}"
            results += [CheckResult(f"{label} {part}", "skipped (--no-compile)") for part in PARTS]
            continue
        if device == "cpu" and backend == "inductor":
            needs = _need_cpp_compiler
        label = f"torch.compile(mesa_net, fullgraph, {backend}) {device}"
        results += check_path(label, device, _compiled(backend), verbose, needs)
    return results


# ----------------------------------------------------------------------------- output


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A plain-text table with left-aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> int:
    """Print the environment and the checks; 0 if every check that ran passed, else 1."""
    print(format_table(("component", "version / state"), environment()))
    print()
    print(f"checks: B={B} T={T} H={H} K={K} V={V} chunk_size={CHUNK_SIZE} cg_steps={CG_STEPS}; "
          "error = relative L2 vs mesa_net_exact (backward: fp64 autograd, worst input)")
    backends = {
        device: None if args.no_compile else (args.compile_backend or default)
        for device, default in DEFAULT_COMPILE_BACKEND.items()
    }
    results = run_checks(compile_backend=backends, verbose=args.verbose)
    rows = [
        (r.name, r.status, _fmt(r.error, ".1e"), _fmt(r.tol, ".0e"), _fmt(r.seconds, ".2f"))
        for r in results
    ]
    print(format_table(("check", "status", "error", "tol", "time [s]"), rows))
    failed = [r.name for r in results if r.failed]
    ran = sum(not r.status.startswith("skipped") for r in results)
    print()
    summary = f"{ran - len(failed)}/{ran} checks passed, {len(results) - ran} skipped"
    print(summary + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
