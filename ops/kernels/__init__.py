"""Triton kernels of mesa_compile.ops (optional: Triton has Linux wheels only).

HAS_TRITON tells whether the kernels are importable; without Triton, chunk_fwd / chunk_bwd are None
and the ops fall back to their aten implementations. CHUNK_K_MAX is the largest key size of the
chunk kernels (the ops run aten above it).
"""
from __future__ import annotations

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

if HAS_TRITON:
    from .chunk_bwd import chunk_bwd
    from .chunk_cg import CHUNK_K_MAX, chunk_fwd
    from .decode import decode_step
else:
    chunk_fwd = None
    chunk_bwd = None
    decode_step = None
    CHUNK_K_MAX = 0

__all__ = ["CHUNK_K_MAX", "HAS_TRITON", "chunk_bwd", "chunk_fwd", "decode_step"]
