"""MesaNet language model: embedding -> pre-norm (Mesa layer, SwiGLU MLP) blocks -> norm -> LM head."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_compile.config import MesaConfig
from mesa_compile.layer import MesaLayer
from mesa_compile.ops import validation
from mesa_compile.state import MesaLayerState, MesaNetState, check_layer_state

__all__ = ["MesaNetLM", "SwiGLU", "MesaBlock"]


class SwiGLU(nn.Module):
    """``W_down(SiLU(W_gate x) * W_up x)``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D)."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


class MesaBlock(nn.Module):
    """Pre-norm residual block: ``x + Mesa(RMSNorm(x))``, then ``x + MLP(RMSNorm(x))``."""

    def __init__(self, config: MesaConfig) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MesaLayer(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp_hidden)

    def forward(
        self,
        x: Tensor,
        state: Optional[MesaLayerState],
        cg_steps: Optional[int],
        cg_tol: Optional[float],
        return_cg_steps: bool = False,
    ) -> Union[tuple[Tensor, MesaLayerState], tuple[Tensor, MesaLayerState, Tensor]]:
        """x: (B, T, D) -> (B, T, D), new layer state[, CG steps used (B, T, H) int32]."""
        h, *rest = self.mixer(
            self.mixer_norm(x), state, cg_steps=cg_steps, cg_tol=cg_tol, return_cg_steps=return_cg_steps
        )
        x = x + h
        x = x + self.mlp(self.mlp_norm(x))
        return (x, *rest)


class MesaNetLM(nn.Module):
    """MesaNet causal language model.

    ``forward(input_ids [B, T], state=None) -> (logits [B, T, vocab], new_state)``,
    where ``state`` / ``new_state`` are a tuple of one :class:`MesaLayerState` per layer. Pass the
    returned state back in to continue the sequences (chunked prefill, or one-token decoding).
    """

    def __init__(self, config: MesaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(MesaBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std) weights, residual output projections scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.blocks:
            block.mixer.reset_parameters()
            for lin in (block.mlp.gate, block.mlp.up):
                nn.init.normal_(lin.weight, std=std)
            for lin in (block.mixer.o_proj, block.mlp.down):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.config.n_layers))

    def init_state(self, batch_size: int, device: Optional[torch.device | str] = None) -> MesaNetState:
        """Zero state (before the first token) for ``batch_size`` sequences."""
        return tuple(block.mixer.init_state(batch_size, device) for block in self.blocks)

    def forward(
        self,
        input_ids: Tensor,
        state: Optional[MesaNetState] = None,
        *,
        cg_steps: Optional[int] = None,
        cg_tol: Optional[float] = None,
        return_cg_steps: bool = False,
    ) -> Union[tuple[Tensor, MesaNetState], tuple[Tensor, MesaNetState, Tensor]]:
        """Logits (B, T, vocab) for ``input_ids`` (B, T) (int64 or int32), and the state after them.

        With ``state`` (from :meth:`init_state` or a previous call) the sequences continue from it;
        T == 1 with a state takes the one-token decode path. ``cg_steps`` / ``cg_tol`` override the
        config's solver budget for this call. ``return_cg_steps=True`` appends the CG steps each
        token's solve used in each layer, int32 (n_layers, B, T, H): the test-time compute that
        early exit (``cg_tol > 0``) spent; logits and state are unchanged. Token ids are
        range-checked only when the ops debug checks are on (the check reads the ids back to the host).
        """
        self._check_inputs(input_ids, state)
        x = self.embed(input_ids)  # (B, T, D)
        new_state, used = [], []
        for i, block in enumerate(self.blocks):
            x, layer_state, *layer_used = block(
                x, None if state is None else state[i], cg_steps, cg_tol, return_cg_steps
            )
            new_state.append(layer_state)
            used.extend(layer_used)  # one (B, T, H) tensor when return_cg_steps, else none
        logits = self.lm_head(self.norm(x))  # (B, T, vocab)
        if return_cg_steps:
            return logits, tuple(new_state), torch.stack(used)  # ..., (n_layers, B, T, H)
        return logits, tuple(new_state)

    def decode_one_token(
        self,
        token: Tensor,
        state: MesaNetState,
        *,
        cg_steps: Optional[int] = None,
        cg_tol: Optional[float] = None,
    ) -> tuple[Tensor, MesaNetState]:
        """One decode step: ``token`` (B, 1) -> (logits (B, vocab), new state). Compiles with fullgraph=True."""
        logits, new_state = self(token, state, cg_steps=cg_steps, cg_tol=cg_tol)
        return logits[:, -1], new_state

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Continue each prompt of ``input_ids`` (B, T) by ``max_new_tokens`` tokens.

        Prefill the prompt in one call, then decode one token at a time with
        :meth:`decode_one_token` (compile that method to speed decoding up). ``temperature == 0``
        is greedy; otherwise sample from softmax(logits / temperature), restricted to the
        ``top_k`` most likely tokens when given. Returns (B, T + max_new_tokens).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        self._check_inputs(input_ids, None)
        if max_new_tokens == 0:
            return input_ids
        logits, state = self(input_ids)
        tokens = [input_ids]
        next_token = _sample(logits[:, -1], temperature, top_k, generator).to(input_ids.dtype)  # (B, 1)
        for _ in range(max_new_tokens - 1):
            tokens.append(next_token)
            logits, state = self.decode_one_token(next_token, state)
            next_token = _sample(logits, temperature, top_k, generator).to(input_ids.dtype)
        tokens.append(next_token)
        return torch.cat(tokens, dim=1)

    def _check_inputs(self, input_ids: Tensor, state: Optional[MesaNetState]) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token per sequence (T >= 1), got T = 0")
        if validation.debug_checks_enabled():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        if state is not None:
            if not isinstance(state, tuple) or len(state) != self.config.n_layers:
                got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
                raise ValueError(f"state must be a tuple of {self.config.n_layers} MesaLayerState, got {got}")
            cfg = self.config
            for i, layer_state in enumerate(state):
                check_layer_state(
                    layer_state, name=f"state[{i}]", batch_size=input_ids.shape[0], n_heads=cfg.n_heads,
                    head_dim=cfg.head_dim, value_dim=cfg.value_dim, conv_size=cfg.conv_size,
                )  # fmt: skip


def _sample(logits: Tensor, temperature: float, top_k: Optional[int], generator: Optional[torch.Generator]) -> Tensor:
    """logits (B, vocab) -> next token ids (B, 1), int64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
