"""Input checks for the public Mesa ops.

Metadata checks (rank, sizes, dtype, device, arguments) always run: they read no tensor data.
Value checks (finite inputs, lamb > 0, g <= 0, 0 <= beta <= 1) read data, which syncs a GPU, so
they run only while debug checks are on: ``set_debug_checks(True)``, the ``debug_checks()``
context manager, or the environment variable ``MESA_COMPILE_DEBUG=1``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["set_debug_checks", "debug_checks", "debug_checks_enabled"]

_debug = os.environ.get("MESA_COMPILE_DEBUG", "0").lower() in ("1", "true", "yes", "on")


def set_debug_checks(enabled: bool) -> None:
    """Turn the value checks (finite, lamb > 0, g <= 0, beta in [0, 1]) on or off globally."""
    global _debug
    _debug = bool(enabled)


def debug_checks_enabled() -> bool:
    """Whether value checks run (they sync the device, so they are off by default)."""
    return _debug


@contextlib.contextmanager
def debug_checks(enabled: bool = True) -> Iterator[None]:
    """Context manager that turns value checks on (or off) inside its block."""
    previous = _debug
    set_debug_checks(enabled)
    try:
        yield
    finally:
        set_debug_checks(previous)


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def check_tensor(name: str, t: object, dims: str) -> Tensor:
    """``t`` must be a floating tensor whose rank matches the layout string ``dims`` ("B,T,H,K")."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    rank = len(dims.split(","))
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape [{dims}] ({rank} dims), got shape {_shape(t)}")
    return t


def check_size(name: str, t: Tensor, dim: int, label: str, expected: int, source: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(
            f"{name} has {label}={t.shape[dim]} at dim {dim} (shape {_shape(t)}), "
            f"but {source} gives {label}={expected}"
        )


def check_same_device(**tensors: Optional[Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}; move them to one device")


def check_same_dtype(**tensors: Tensor) -> None:
    named = list(tensors.items())
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; they must match")


def check_cg_args(cg_steps: object, cg_tol: object) -> None:
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int):
        raise TypeError(f"cg_steps must be an int, got {type(cg_steps).__name__}")
    if cg_steps < 0:
        raise ValueError(f"cg_steps must be >= 0, got {cg_steps}")
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)):
        raise TypeError(f"cg_tol must be a float, got {type(cg_tol).__name__}")
    if not (0.0 <= float(cg_tol) < float("inf")):
        raise ValueError(f"cg_tol must be a finite number >= 0, got {cg_tol}")


def check_chunk_size(chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def check_cu_seqlens(cu_seqlens: Tensor, batch: int, total: int) -> list[int]:
    """Validates cu_seqlens and returns the sequence lengths (reads the values: a host sync)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
        raise TypeError(
            f"cu_seqlens must be a 1-D int32/int64 tensor, got dtype {cu_seqlens.dtype} shape {_shape(cu_seqlens)}"
        )
    if batch != 1:
        raise ValueError(f"cu_seqlens needs the sequences packed into batch size 1, got q with B={batch}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets, got {cu_seqlens.tolist()}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {offsets[0]} ... {offsets[-1]}")
    lengths = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lengths) <= 0:
        raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets}")
    return lengths


def check_state(name: str, state: object, n: int, h: int, dk: int, dv: int, device: torch.device) -> None:
    """``state`` must be a MesaState-like pair (h_kk [N,H,K,K], h_kv [N,H,K,V]) on ``device``."""
    h_kk, h_kv = getattr(state, "h_kk", None), getattr(state, "h_kv", None)
    if not isinstance(h_kk, Tensor) or not isinstance(h_kv, Tensor):
        raise TypeError(f"{name} must be a MesaState(h_kk, h_kv), got {type(state).__name__}")
    for field, t, expected in (("h_kk", h_kk, [n, h, dk, dk]), ("h_kv", h_kv, [n, h, dk, dv])):
        if _shape(t) != expected:
            raise ValueError(f"{name}.{field} must have shape {expected} (N, H, K, K|V), got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}.{field} must be floating point (fp32), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{field} is on {t.device} but q is on {device}")


def check_values(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor) -> None:
    """Debug-only value checks; every message names the argument and the offending value."""
    if not _debug:
        return
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("lamb", lamb)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} holds NaN or Inf values")
    if not bool((lamb > 0).all()):
        raise ValueError(f"lamb must be > 0 everywhere, min is {lamb.min().item():.3g}")
    if not bool((g <= 0).all()):
        raise ValueError(f"g is a log forget gate and must be <= 0, max is {g.max().item():.3g}")
    if not bool(((beta >= 0) & (beta <= 1)).all()):
        raise ValueError(
            f"beta must lie in [0, 1], got range [{beta.min().item():.3g}, {beta.max().item():.3g}]"
        )
