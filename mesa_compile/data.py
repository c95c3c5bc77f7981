"""Training data: synthetic in-context tasks and token-file datasets.

Every source hands out ``(input_ids [B, T] int64, targets [B, T] int64)`` batches, targets set to
``IGNORE_INDEX`` where no loss is taken. A batch is a pure function of ``(seed, index)``, so a
resumed training run sees exactly the batches an uninterrupted one would (no data state in
checkpoints).

- :class:`MQARTask`: multi-query associative recall (key-value pairs, then queries of some keys; the
  model must answer each query with its value). Chance accuracy is ``1 / num_pairs`` for a model that
  only learned to answer with some value of the context.
- :class:`TokenFile`: next-token prediction on a token file, either raw ``uint16`` / ``uint32``
  token ids (``.bin``, read through ``numpy.memmap``) or UTF-8 text mapped byte by byte to ids 0..255.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "TOKEN_DTYPES",
    "MQARTask",
    "TokenFile",
    "accuracy",
    "decode_bytes",
    "encode_bytes",
    "load_source",
]

IGNORE_INDEX = -100  # targets with this value take no loss (torch.nn.functional.cross_entropy's default)
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BYTE_VOCAB = 256  # the byte-level tokenizer's vocabulary: one id per byte value

# Separate seed streams for training and evaluation batches (any two distinct constants do).
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) * 1_000_033 + index)


@dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall.

    A sequence is ``num_pairs`` key-value pairs ``k_1 v_1 ... k_N v_N`` (distinct keys, random values),
    then ``num_queries`` of those keys again, each followed by its value: ``k_a v_a k_b v_b ...``.
    The loss (and accuracy) is taken at the query keys only, where the next token is the value.
    Token ids: 0 unused, keys ``1 .. num_keys``, values ``num_keys + 1 .. num_keys + num_values``.
    """

    num_pairs: int = 16  # key-value pairs in the context
    num_queries: int = 16  # queried keys (each at most once), <= num_pairs
    num_keys: int = 64  # size of the key alphabet, >= num_pairs
    num_values: int = 64  # size of the value alphabet
    seed: int = 0  # seed of the batch streams

    def __post_init__(self) -> None:
        for name in ("num_pairs", "num_queries", "num_keys", "num_values"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MQARTask.{name} must be an int >= 1, got {value!r}")
        if self.num_queries > self.num_pairs:
            raise ValueError(
                f"MQARTask.num_queries ({self.num_queries}) must be <= num_pairs ({self.num_pairs})"
            )
        if self.num_keys < self.num_pairs:
            raise ValueError(f"MQARTask.num_keys ({self.num_keys}) must be >= num_pairs ({self.num_pairs})")

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every token id of the task."""
        return 1 + self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return 2 * (self.num_pairs + self.num_queries)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (checkpoints compare it on resume)."""
        return {"task": "mqar", **asdict(self)}

    def batch(self, batch_size: int, index: int, *, split: str = "train") -> tuple[Tensor, Tensor]:
        """Batch number ``index`` of the ``split`` ("train" or "eval") stream, on the CPU."""
        gen = _generator(self.seed, _stream(split), index)
        B, N, Q = batch_size, self.num_pairs, self.num_queries
        keys = torch.rand(B, self.num_keys, generator=gen).argsort(dim=-1)[:, :N] + 1  # (B, N) distinct
        values = torch.randint(0, self.num_values, (B, N), generator=gen) + 1 + self.num_keys  # (B, N)
        which = torch.rand(B, N, generator=gen).argsort(dim=-1)[:, :Q]  # (B, Q) queried pair indices
        q_keys, q_values = keys.gather(1, which), values.gather(1, which)  # (B, Q)
        context = torch.stack([keys, values], dim=-1).reshape(B, 2 * N)  # k_1 v_1 k_2 v_2 ...
        queries = torch.stack([q_keys, q_values], dim=-1).reshape(B, 2 * Q)
        ids = torch.cat([context, queries], dim=1)  # (B, T)
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[:, 2 * N :: 2] = q_values  # at each query key, the next token is its value
        return ids, targets


class TokenFile:
    """Next-token prediction on random windows of a token file.

    path: a ``.bin`` file of raw token ids (``dtype`` "uint16" or "uint32", read through
    ``numpy.memmap``) or, with ``dtype="bytes"``, any file read as bytes (UTF-8 text -> ids 0..255).
    The last ``eval_fraction`` of the tokens is held out for evaluation batches.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seq_len: int,
        dtype: str = "uint16",
        eval_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        if dtype not in (*TOKEN_DTYPES, "bytes"):
            raise ValueError(f"dtype must be one of {[*TOKEN_DTYPES, 'bytes']}, got {dtype!r}")
        if not self.path.is_file():
            raise ValueError(f"token file {os.fspath(path)!r} does not exist")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction!r}")
        self.dtype, self.seq_len, self.seed, self.eval_fraction = dtype, seq_len, seed, eval_fraction
        np_dtype = np.uint8 if dtype == "bytes" else TOKEN_DTYPES[dtype]
        size = self.path.stat().st_size
        if size % np.dtype(np_dtype).itemsize:
            raise ValueError(f"{self.path} has {size} bytes, not a whole number of {dtype} tokens")
        self.tokens = np.memmap(self.path, dtype=np_dtype, mode="r") if size else np.zeros(0, np_dtype)
        n_eval = int(len(self.tokens) * eval_fraction)
        self._splits = {
            "train": (0, len(self.tokens) - n_eval),
            "eval": (len(self.tokens) - n_eval, len(self.tokens)),
        }
        for split, (lo, hi) in self._splits.items():
            if hi - lo < seq_len + 1:
                raise ValueError(
                    f"{self.path}: the {split} split holds {hi - lo} tokens, "
                    f"fewer than seq_len + 1 = {seq_len + 1} "
                    f"({len(self.tokens)} tokens in all, eval_fraction={eval_fraction})"
                )
        self.vocab_size = BYTE_VOCAB if dtype == "bytes" else int(self.tokens.max()) + 1

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (checkpoints compare it on resume)."""
        return {
            "task": "tokens",
            "path": os.fspath(self.path.resolve()),
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "eval_fraction": self.eval_fraction,
            "seed": self.seed,
        }

    def batch(self, batch_size: int, index: int, *, split: str = "train") -> tuple[Tensor, Tensor]:
        """Batch number ``index`` of the ``split`` ("train" or "eval") stream: random windows."""
        gen = _generator(self.seed, _stream(split), index)
        lo, hi = self._splits[split]
        starts = torch.randint(lo, hi - self.seq_len, (batch_size,), generator=gen).tolist()
        windows = np.stack(
            [np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts]
        )
        windows = torch.from_numpy(windows)  # (B, T + 1)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _stream(split: str) -> int:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return _TRAIN_STREAM if split == "train" else _EVAL_STREAM


def encode_bytes(text: str) -> list[int]:
    """Byte-level tokenizer: the UTF-8 bytes of ``text`` as ids 0..255."""
    return list(text.encode("utf-8"))


def decode_bytes(ids: Any, errors: str = "replace") -> str:
    """Inverse of :func:`encode_bytes`; ids outside 0..255 raise ``ValueError``."""
    values = [int(i) for i in ids]
    bad = [i for i in values if not 0 <= i < BYTE_VOCAB]
    if bad:
        raise ValueError(f"byte-level ids must lie in [0, 256), got {bad[:5]}")
    return bytes(values).decode("utf-8", errors=errors)


def accuracy(logits: Tensor, targets: Tensor) -> tuple[int, int]:
    """(correct, counted) greedy predictions at the positions whose target is not ``IGNORE_INDEX``."""
    mask = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & mask
    return int(correct.sum()), int(mask.sum())


def load_source(spec: dict[str, Any], *, seq_len: int | None = None) -> MQARTask | TokenFile:
    """Rebuild a data source from :meth:`describe` output (``seq_len`` overrides a token file's)."""
    spec = dict(spec)
    task = spec.pop("task", None)
    if task == "mqar":
        return MQARTask(**spec)
    if task == "tokens":
        if seq_len is not None:
            spec["seq_len"] = seq_len
        return TokenFile(spec.pop("path"), **spec)
    raise ValueError(f"unknown data task {task!r}; expected 'mqar' or 'tokens'")
