"""Model configuration: one dataclass with commented defaults, named presets, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["MesaConfig", "PRESETS"]


@dataclass
class MesaConfig:
    """Shape and numerics of a MesaNet language model (all Mesa layers share them).

    Build one directly, from a named preset (``MesaConfig.from_preset("tiny", cg_steps=10)``),
    or from a dict / JSON string written by :meth:`to_dict` / :meth:`to_json`.
    Every field is checked on construction; a bad value raises ``ValueError`` naming the field.
    """

    # --- shapes ---
    vocab_size: int = 256  # number of token ids
    d_model: int = 64  # residual stream width D
    n_layers: int = 2  # number of (Mesa layer + MLP) blocks
    n_heads: int = 2  # Mesa heads H per layer
    head_dim: int = 32  # key / query size K per head
    value_head_dim: Optional[int] = None  # value size V per head; None -> head_dim
    intermediate_size: Optional[int] = None  # SwiGLU hidden width; None -> 8/3 * d_model rounded up to 64
    conv_size: int = 4  # causal depthwise short-conv width on q and k (cache keeps conv_size - 1 inputs)

    # --- Mesa solve ---
    cg_steps: int = 30  # conjugate-gradient steps per token (paper: 30 everywhere)
    cg_tol: float = 0.0  # > 0: per-token early exit when ||r|| <= cg_tol * ||r0|| (paper: 1e-4)
    chunk_size: int = 64  # tokens per chunk in the chunkwise-parallel prefill / training path

    # --- layer options ---
    output_gate: bool = True  # gated output RMSNorm: norm(o) * SiLU(W_gate x)
    gamma_cap: bool = False  # paper App. G.5: gamma <- gamma * (1 - (1 - 0.9975) * beta^2)
    lambda_init: float = 1.0  # initial regulariser lambda = softplus(theta) + lambda_floor
    lambda_floor: float = 0.25  # lower bound of lambda (keeps H + diag(lambda) well conditioned)

    # --- model ---
    tie_embeddings: bool = False  # LM head shares the token-embedding matrix
    norm_eps: float = 1e-6  # RMSNorm epsilon (block norms, final norm, per-head output norm)
    init_std: float = 0.02  # std of the normal init of linear / embedding weights

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def value_dim(self) -> int:
        """Value size V per head."""
        return self.head_dim if self.value_head_dim is None else self.value_head_dim

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def num_params(self) -> int:
        """Number of trainable parameters of :class:`~mesa_compile.MesaNetLM` built from this config."""
        D, H, K, V, F = self.d_model, self.n_heads, self.head_dim, self.value_dim, self.mlp_hidden
        mesa = (
            D * H * K * 2  # q, k projections
            + D * H * V  # v projection
            + H * K * self.conv_size * 2  # depthwise conv weights of q, k
            + (D + 1) * H * 2  # forget / input gate projections with bias
            + H * K  # lambda parameter theta
            + V  # per-head output RMSNorm weight (shared by heads)
            + (D * H * V if self.output_gate else 0)  # output gate projection
            + H * V * D  # output projection
        )
        block = mesa + 3 * D * F + 2 * D  # + SwiGLU MLP + two RMSNorm weights
        head = 0 if self.tie_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.n_layers * block + D + head

    # ------------------------------------------------------------------ presets / serialisation
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MesaConfig":
        """Config of a named preset (see ``PRESETS``) with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        return cls.from_dict(fields)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MesaConfig":
        """Inverse of :meth:`to_dict`; missing fields take their defaults, unknown fields raise."""
        if not isinstance(data, dict):
            raise ValueError(f"config data must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MesaConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        """JSON string of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MesaConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        positive_ints = ["vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "conv_size", "chunk_size"]
        for name in positive_ints:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ["value_head_dim", "intermediate_size"]:
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("cg_steps", self.cg_steps, minimum=0)
        for name in ["output_gate", "gamma_cap", "tie_embeddings"]:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MesaConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _check_float("cg_tol", self.cg_tol, minimum=0.0, inclusive=True)
        _check_float("lambda_floor", self.lambda_floor, minimum=0.0, inclusive=False)
        _check_float("lambda_init", self.lambda_init, minimum=self.lambda_floor, inclusive=False)
        _check_float("norm_eps", self.norm_eps, minimum=0.0, inclusive=False)
        _check_float("init_std", self.init_std, minimum=0.0, inclusive=False)


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MesaConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"MesaConfig.{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, minimum: float, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MesaConfig.{name} must be a finite number, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        bound = ">=" if inclusive else ">"
        raise ValueError(f"MesaConfig.{name} must be {bound} {minimum}, got {value}")


# NOTE: the paper (arXiv 2506.05233) trains 145M / 400M / 1B models; its exact widths are not
# restated here. These presets are GPT-style shapes chosen so that num_params() lands near the
# nominal sizes (141M / 394M / 1.01B with the defaults: untied 32000-token vocabulary, the
# tokenizer size assumed, output gate on), with head size 128 (key size of the reference kernels).
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CPU tests and demos (a forward pass takes milliseconds).
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, head_dim=32),
    "145m": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=6, head_dim=128),
    "400m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=8, head_dim=128),
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, head_dim=128),
}
