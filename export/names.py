"""Every name shared across stacks, defined once: torch ops, ONNX custom domain, TensorRT plugin.

The TensorRT ONNX parser turns a node of unknown op_type into a plugin looked up by op_type,
namespace (the node's domain, TRT >= 10.10) and version, so a rename anywhere but here would break
the plugin silently. Graph input/output names (states, caches, telemetry) live here too: the
exporter writes them and the runtimes read them.
"""

from __future__ import annotations

from mesa_compile.ops.names import CHUNK_FWD, DECODE_STEP, NAMESPACE

__all__ = [
    "BATCH_DIM",
    "INPUT_IDS",
    "LAYER_INPUT",
    "LAYER_OUTPUT",
    "LOGITS",
    "METADATA_PREFIX",
    "ONNX_CHUNK_FWD",
    "ONNX_DECODE_STEP",
    "ONNX_DOMAIN",
    "ONNX_DOMAIN_VERSION",
    "ORT_EXTENSIONS_DOMAIN",
    "SEQ_DIM",
    "STATE_FIELDS",
    "TORCH_CHUNK_FWD",
    "TORCH_DECODE_STEP",
    "TORCH_EXPORT_NAMESPACE",
    "TORCH_NAMESPACE",
    "TRT_PLUGIN_CHUNK_FWD",
    "TRT_PLUGIN_DECODE_STEP",
    "TRT_PLUGIN_NAMESPACE",
    "TRT_PLUGIN_VERSION",
    "cg_iters_output",
    "state_input",
    "state_output",
]

# torch.ops.mesa.* (owned by the ops package; re-exported so that export code imports one module)
TORCH_NAMESPACE = NAMESPACE
TORCH_CHUNK_FWD = CHUNK_FWD
TORCH_DECODE_STEP = DECODE_STEP

# Export-only torch ops standing for one plugin node each while tracing (shape-only fakes).
TORCH_EXPORT_NAMESPACE = "mesa_export"

# ONNX custom-domain nodes of the plugin graphs (one node per Mesa layer).
ONNX_DOMAIN = "mesa"
ONNX_DOMAIN_VERSION = 1
ONNX_CHUNK_FWD = "MesaChunkFwd"
ONNX_DECODE_STEP = "MesaDecodeStep"
# onnxruntime-extensions' Python custom ops only load from this domain (test oracle only).
ORT_EXTENSIONS_DOMAIN = "ai.onnx.contrib"

# TensorRT plugins: name = ONNX op_type, namespace = ONNX domain, version = the parser's default.
TRT_PLUGIN_NAMESPACE = ONNX_DOMAIN
TRT_PLUGIN_VERSION = "1"
TRT_PLUGIN_CHUNK_FWD = ONNX_CHUNK_FWD
TRT_PLUGIN_DECODE_STEP = ONNX_DECODE_STEP

# Graph inputs / outputs.
STATE_FIELDS = ("h_kk", "h_kv", "conv_q", "conv_k")  # per layer, in this order
INPUT_IDS = "input_ids"  # (batch, seq) int64 token ids; seq = 1 in decode graphs
LOGITS = "logits"  # (batch, seq, vocab) in prefill graphs, (batch, vocab) in decode graphs
LAYER_INPUT = "x"  # MesaLayer graphs: (batch, seq, d_model)
LAYER_OUTPUT = "y"
BATCH_DIM = "batch"
SEQ_DIM = "seq"
METADATA_PREFIX = "mesa_compile."  # ONNX metadata_props keys written by the exporter


def state_input(layer: int, field: str) -> str:
    """Name of a state graph input, e.g. ``state.0.h_kk``."""
    return f"state.{layer}.{field}"


def state_output(layer: int, field: str) -> str:
    """Name of an updated-state graph output, e.g. ``new_state.0.h_kk``."""
    return f"new_state.{layer}.{field}"


def cg_iters_output(layer: int) -> str:
    """Loop graphs: CG iterations the ONNX ``Loop`` of layer ``layer`` ran (int64 scalar)."""
    return f"cg_iters.{layer}"
