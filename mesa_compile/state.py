"""Recurrent state of the Mesa layer and of the whole model.

States are NamedTuples, so they are pytrees: torch.compile, torch.export and ``torch.utils._pytree``
flatten them without registration. They are passed in and returned explicitly, never hidden in
modules.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from mesa_compile.ops import MesaState

__all__ = ["MesaState", "MesaLayerState", "MesaNetState", "check_layer_state", "init_layer_state"]


class MesaLayerState(NamedTuple):
    """State one Mesa layer carries from token to token.

    mesa:   ``MesaState(h_kk [B, H, K, K] fp32, h_kv [B, H, K, V] fp32)``, the decayed sums of
            ``beta k k^T`` and ``beta k v^T``.
    conv_q: ``[B, H*K, conv_size - 1]``, the last ``conv_size - 1`` inputs of q's short conv
            (the q projections, before the conv), oldest first.
    conv_k: same for k.
    """

    mesa: MesaState
    conv_q: Tensor
    conv_k: Tensor


# One MesaLayerState per layer, in layer order.
MesaNetState = tuple[MesaLayerState, ...]


def init_layer_state(
    batch_size: int,
    n_heads: int,
    head_dim: int,
    value_dim: int,
    conv_size: int,
    *,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> MesaLayerState:
    """The state before the first token: all zeros.

    The conv caches take ``dtype`` (the model's); the Mesa state is fp32 (fp64 for an fp64 model).
    """
    state_dtype = torch.promote_types(dtype, torch.float32)
    B, H, K, V = batch_size, n_heads, head_dim, value_dim
    mesa = MesaState(
        torch.zeros(B, H, K, K, device=device, dtype=state_dtype),  # h_kk
        torch.zeros(B, H, K, V, device=device, dtype=state_dtype),  # h_kv
    )
    conv_q = torch.zeros(B, H * K, conv_size - 1, device=device, dtype=dtype)
    conv_k = torch.zeros(B, H * K, conv_size - 1, device=device, dtype=dtype)
    return MesaLayerState(mesa, conv_q, conv_k)


def check_layer_state(
    state: object,
    *,
    name: str,
    batch_size: int,
    n_heads: int,
    head_dim: int,
    value_dim: int,
    conv_size: int,
) -> None:
    """Raise naming ``name`` (and the field) if ``state`` does not fit the layer.

    ``ValueError`` for a wrong structure or shape (batch size included), ``TypeError`` for a wrong
    state dtype (the Mesa state must be fp32, or fp64 for an fp64 model).
    """
    if not isinstance(state, MesaLayerState):
        raise ValueError(f"{name} must be a MesaLayerState, got {type(state).__name__}")
    if not isinstance(state.mesa, MesaState):
        raise ValueError(f"{name}.mesa must be a MesaState, got {type(state.mesa).__name__}")
    B, H, K, V = batch_size, n_heads, head_dim, value_dim
    expected = {
        "mesa.h_kk": (state.mesa.h_kk, (B, H, K, K)),
        "mesa.h_kv": (state.mesa.h_kv, (B, H, K, V)),
        "conv_q": (state.conv_q, (B, H * K, conv_size - 1)),
        "conv_k": (state.conv_k, (B, H * K, conv_size - 1)),
    }
    for field, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name}.{field} must be a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.{field} has shape {tuple(tensor.shape)}, expected {shape} ([B, ...] with B={B})")
    for field in ("mesa.h_kk", "mesa.h_kv"):
        tensor = expected[field][0]
        if tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name}.{field} must be float32 (float64 for an fp64 model), got {tensor.dtype}")
