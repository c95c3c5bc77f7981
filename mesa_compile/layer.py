"""The Mesa layer (MesaNet, arXiv 2506.05233): projections, short convs, gates, Mesa solve, output."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mesa_compile.config import MesaConfig
from mesa_compile.ops import mesa_net, mesa_net_step
from mesa_compile.state import MesaLayerState, check_layer_state, init_layer_state

__all__ = ["MesaLayer"]

# Paper App. G.5: gamma_t <- gamma_t * (1 - (1 - GAMMA_CAP) * beta_t^2) keeps gamma < 1 when beta -> 1.
GAMMA_CAP = 0.9975


def short_conv(x: Tensor, weight: Tensor, cache: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over time followed by SiLU, continuing from a cache.

    x: (B, T, C); weight: (C, 1, W); cache: (B, C, W - 1) (the previous W - 1 inputs, oldest first)
    or None (zeros: start of sequence). Returns (SiLU(conv(x)) (B, T, C), new cache (B, C, W - 1)).
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)  # (B, C, T)
    if cache is None:
        cache = xt.new_zeros(B, C, W - 1)
    xp = torch.cat([cache.to(xt.dtype), xt], dim=-1)  # (B, C, W - 1 + T)
    y = F.conv1d(xp, weight, groups=C)  # (B, C, T)
    new_cache = xp[..., T:].contiguous()  # (B, C, W - 1): the last W - 1 inputs (a copy: frees xp)
    return F.silu(y).transpose(1, 2), new_cache


class MesaLayer(nn.Module):
    """One Mesa token mixer: ``forward(x [B, T, D], state=None) -> (y [B, T, D], new_state)``.

    q = SiLU(conv(W_q x)), k = SiLU(conv(W_k x)), v = W_v x, beta = sigmoid(W_b x + b_b),
    g = logsigmoid(W_a x + b_a) (log forget gate), lambda = softplus(theta) + lambda_floor;
    o = Mesa solve (q, k L2-normalised inside the op); y = W_o(RMSNorm_head(o) [* SiLU(W_gate x)]).

    Paths: ``state`` given and T == 1 -> one-token decode (``mesa_net_step``); otherwise the
    chunkwise prefill / training path (``mesa_net``), continuing from ``state`` when given.
    """

    def __init__(self, config: MesaConfig) -> None:
        super().__init__()
        self.config = config
        D, H, K, V = config.d_model, config.n_heads, config.head_dim, config.value_dim
        self.n_heads, self.head_dim, self.value_dim = H, K, V
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        # Depthwise causal conv weights, (C, 1, W) as F.conv1d(groups=C) expects.
        self.q_conv = nn.Parameter(torch.empty(H * K, 1, config.conv_size))
        self.k_conv = nn.Parameter(torch.empty(H * K, 1, config.conv_size))
        self.a_proj = nn.Linear(D, H, bias=True)  # forget-gate logits
        self.b_proj = nn.Linear(D, H, bias=True)  # input-gate logits
        # lambda = softplus(lambda_theta) + lambda_floor, (H, K). Exclude from weight decay.
        self.lambda_theta = nn.Parameter(torch.empty(H, K))
        self.o_norm = nn.RMSNorm(V, eps=config.norm_eps)  # per head, weight shared by heads
        self.gate_proj = nn.Linear(D, H * V, bias=False) if config.output_gate else None
        self.o_proj = nn.Linear(H * V, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise all parameters (linear weights are re-initialised by MesaNetLM too)."""
        cfg = self.config
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.o_proj, self.gate_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=cfg.init_std)
        bound = 1.0 / math.sqrt(cfg.conv_size)  # nn.Conv1d's default bound for a depthwise conv
        nn.init.uniform_(self.q_conv, -bound, bound)
        nn.init.uniform_(self.k_conv, -bound, bound)
        # NOTE: forget gates start slow and spread over heads, gamma = sigmoid(b_a) from 0.9 to 0.999
        # (time scales 10 to 1000 tokens), like multi-timescale decay inits of other gated RNNs; a
        # zero bias would start every head at gamma = 0.5 (memory of ~2 tokens).
        gamma0 = 1.0 - torch.logspace(-1, -3, self.n_heads, dtype=torch.float64)
        self.a_proj.bias.copy_(torch.log(gamma0 / (1.0 - gamma0)))
        nn.init.zeros_(self.b_proj.bias)  # beta = 0.5
        # lambda_floor + softplus(theta) = lambda_init  <=>  theta = log(expm1(lambda_init - lambda_floor)).
        self.lambda_theta.fill_(math.log(math.expm1(cfg.lambda_init - cfg.lambda_floor)))
        self.o_norm.reset_parameters()

    def regulariser(self) -> Tensor:
        """lambda (H, K), fp32, > lambda_floor."""
        return F.softplus(self.lambda_theta.float()) + self.config.lambda_floor

    def init_state(self, batch_size: int, device: Optional[torch.device | str] = None) -> MesaLayerState:
        """Zero state for ``batch_size`` sequences (conv caches in the weights' dtype, Mesa state fp32)."""
        return init_layer_state(
            batch_size, self.n_heads, self.head_dim, self.value_dim, self.config.conv_size,
            device=device, dtype=self.q_proj.weight.dtype,
        )  # fmt: skip

    def forward(
        self,
        x: Tensor,
        state: Optional[MesaLayerState] = None,
        *,
        cg_steps: Optional[int] = None,
        cg_tol: Optional[float] = None,
        return_cg_steps: bool = False,
    ) -> Union[tuple[Tensor, MesaLayerState], tuple[Tensor, MesaLayerState, Tensor]]:
        """Mix ``x`` (B, T, D) over time; returns (y (B, T, D), state after the last token).

        ``cg_steps`` / ``cg_tol`` override the config's solver budget for this call.
        ``return_cg_steps=True`` appends the CG steps each token's solve used, int32 (B, T, H): at
        most ``cg_steps``, fewer where early exit (``cg_tol > 0``) or the breakdown guard stopped a
        token; outputs are unchanged.
        """
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x must have shape [B, T, {cfg.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.head_dim, self.value_dim
        if state is not None:
            check_layer_state(
                state, name="state", batch_size=B, n_heads=H, head_dim=K, value_dim=V, conv_size=cfg.conv_size
            )
        steps = cfg.cg_steps if cg_steps is None else cg_steps
        tol = cfg.cg_tol if cg_tol is None else cg_tol

        q, conv_q = short_conv(self.q_proj(x), self.q_conv, None if state is None else state.conv_q)
        k, conv_k = short_conv(self.k_proj(x), self.k_conv, None if state is None else state.conv_k)
        q = q.view(B, T, H, K)  # (B, T, H, K)
        k = k.view(B, T, H, K)  # (B, T, H, K)
        v = self.v_proj(x).view(B, T, H, V)  # (B, T, H, V)
        beta = torch.sigmoid(self.b_proj(x).float())  # (B, T, H) fp32
        g = F.logsigmoid(self.a_proj(x).float())  # (B, T, H) fp32, log gamma <= 0
        if cfg.gamma_cap:
            g = g + torch.log1p(-(1.0 - GAMMA_CAP) * beta * beta)
        lamb = self.regulariser()  # (H, K) fp32

        if state is not None and T == 1:
            out = mesa_net_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, state.mesa,
                cg_steps=steps, cg_tol=tol, qk_l2norm=True, return_cg_steps=return_cg_steps,
            )  # fmt: skip
            o = out.o.unsqueeze(1)  # (B, 1, H, V)
            used = None if out.cg_steps is None else out.cg_steps.unsqueeze(1)  # (B, 1, H)
        else:
            out = mesa_net(
                q, k, v, g, beta, lamb,
                cg_steps=steps, cg_tol=tol, chunk_size=cfg.chunk_size, qk_l2norm=True,
                initial_state=None if state is None else state.mesa, output_final_state=True,
                return_cg_steps=return_cg_steps,
            )  # fmt: skip
            o = out.o  # (B, T, H, V)
            used = out.cg_steps  # (B, T, H) or None

        o = self.o_norm(o)  # (B, T, H, V)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x)).view(B, T, H, V)
        y = self.o_proj(o.reshape(B, T, H * V))  # (B, T, D)
        new_state = MesaLayerState(out.final_state, conv_q, conv_k)
        return (y, new_state, used) if return_cg_steps else (y, new_state)
