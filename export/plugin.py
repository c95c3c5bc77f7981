"""The plugin form: each Mesa op becomes ONE node of the ``mesa`` ONNX domain.

A TensorRT plugin (looked up by op_type / namespace / version, see ``names``) consumes these
nodes. ``register_schemas`` registers an ``onnx.defs.OpSchema`` for each (onnxscript refuses
unknown custom ops, and ``onnx.checker`` validates against it). The node is never an ONNX local
function: a runtime would inline that instead of dispatching to the plugin.

While tracing, the mesa ops are swapped for export-only ops (``torch.ops.mesa_export.*``) whose
fakes only compute shapes: the real ops' fakes trace the chunkwise reference, whose padding
``if`` pins a dynamic T to the example size. The custom translation maps those onto the nodes.

Two oracles run plugin graphs without TensorRT, both computing the node with ``ops.reference``:
``reference_evaluator_ops()`` for ``onnx.reference.ReferenceEvaluator`` and
``ort_extensions_session()`` for onnxruntime CPU through an onnxruntime-extensions Python op
(that library only loads custom ops from its own domain, so it runs a renamed copy). They are
test oracles, not a deployment path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mesa_compile.export import names
from mesa_compile.ops import reference
from torch import Tensor

__all__ = [
    "node_ops",
    "ort_extensions_session",
    "reference_evaluator_ops",
    "register_schemas",
    "to_ort_extensions_model",
    "translation_table",
]

_INPUTS = ("q", "k", "v", "g", "beta", "lamb", "h_kk", "h_kv")
_OUTPUTS = ("o", "q_star", "h_kk_out", "h_kv_out", "steps")
# Input / output type constraint names of both nodes (see _schema).
_TYPES = {"q": "TQK", "k": "TQK", "v": "TV", "o": "TV", "steps": "tensor(int32)"}


def _schema(op_type: str, with_chunk_size: bool):
    from onnx import defs

    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    attrs = [
        attr("cg_steps", defs.OpSchema.AttrType.INT, "maximum CG iterations per token"),
        attr("cg_tol", defs.OpSchema.AttrType.FLOAT, "early exit when ||r|| <= cg_tol ||r0|| (0: off)"),
    ]
    if with_chunk_size:
        attrs.insert(0, attr("chunk_size", defs.OpSchema.AttrType.INT, "tokens per chunk"))
    return defs.OpSchema(
        op_type,
        names.ONNX_DOMAIN,
        names.ONNX_DOMAIN_VERSION,
        doc="Mesa layer solve (state update, CG, read-out); same contract as the torch op "
        f"{names.TORCH_CHUNK_FWD if with_chunk_size else names.TORCH_DECODE_STEP}.",
        inputs=[param(n, _TYPES.get(n, "tensor(float)")) for n in _INPUTS],
        outputs=[param(n, _TYPES.get(n, "tensor(float)")) for n in _OUTPUTS],
        type_constraints=[
            ("TQK", ["tensor(float)", "tensor(float16)"], "normalised queries and keys"),
            ("TV", ["tensor(float)", "tensor(float16)"], "values and outputs"),
        ],
        attributes=attrs,
    )


def register_schemas() -> None:
    """Register the ``mesa`` domain's OpSchemas with onnx (idempotent)."""
    from onnx import defs

    for op_type, with_chunk in ((names.ONNX_CHUNK_FWD, True), (names.ONNX_DECODE_STEP, False)):
        if not defs.has(op_type, names.ONNX_DOMAIN):
            defs.register_schema(_schema(op_type, with_chunk))


_Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op(f"{names.TORCH_EXPORT_NAMESPACE}::chunk_fwd", mutates_args=())
def _chunk_fwd_node(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, h_kk: Tensor, h_kv: Tensor,
    chunk_size: int, cg_steps: int, cg_tol: float,
) -> _Outputs:  # fmt: skip
    """Stands for one MesaChunkFwd node while tracing; eager: ``reference.chunk_fwd``."""
    return tuple(
        t.clone()
        for t in reference.chunk_fwd(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size, cg_steps, cg_tol)
    )


@_chunk_fwd_node.register_fake
def _(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size, cg_steps, cg_tol):
    B, T, H, K = q.shape
    f32 = torch.promote_types(q.dtype, torch.float32)
    return (
        v.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, K, dtype=f32), h_kk.new_empty(h_kk.shape),
        h_kv.new_empty(h_kv.shape), q.new_empty(B, T, H, dtype=torch.int32),
    )  # fmt: skip


@torch.library.custom_op(f"{names.TORCH_EXPORT_NAMESPACE}::decode_step", mutates_args=())
def _decode_step_node(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, lamb: Tensor, h_kk: Tensor, h_kv: Tensor,
    cg_steps: int, cg_tol: float,
) -> _Outputs:  # fmt: skip
    """Stands for one MesaDecodeStep node while tracing; eager: ``reference.decode_step``."""
    return tuple(
        t.clone() for t in reference.decode_step(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol)
    )


@_decode_step_node.register_fake
def _(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps, cg_tol):
    B, H, K = q.shape
    f32 = torch.promote_types(q.dtype, torch.float32)
    return (
        v.new_empty(B, H, v.shape[-1]), q.new_empty(B, H, K, dtype=f32), h_kk.new_empty(h_kk.shape),
        h_kv.new_empty(h_kv.shape), q.new_empty(B, H, dtype=torch.int32),
    )  # fmt: skip


def node_ops() -> dict:
    """``{mesa op: export-only stand-in}`` to trace the plugin form with (see the module docstring)."""
    return {
        torch.ops.mesa.chunk_fwd.default: torch.ops.mesa_export.chunk_fwd.default,
        torch.ops.mesa.decode_step.default: torch.ops.mesa_export.decode_step.default,
    }


def translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each stand-in -> one ``mesa`` node."""
    import onnxscript

    register_schemas()
    domain = onnxscript.values.Opset(names.ONNX_DOMAIN, names.ONNX_DOMAIN_VERSION)
    chunk_node = getattr(domain, names.ONNX_CHUNK_FWD)
    decode_node = getattr(domain, names.ONNX_DECODE_STEP)

    def chunk_fwd(q, k, v, g, beta, lamb, h_kk, h_kv, chunk_size: int, cg_steps: int, cg_tol: float):
        return chunk_node(
            q, k, v, g, beta, lamb, h_kk, h_kv,
            chunk_size=chunk_size, cg_steps=cg_steps, cg_tol=cg_tol, _outputs=len(_OUTPUTS),
        )  # fmt: skip

    def decode_step(q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps: int, cg_tol: float):
        return decode_node(
            q, k, v, g, beta, lamb, h_kk, h_kv, cg_steps=cg_steps, cg_tol=cg_tol, _outputs=len(_OUTPUTS)
        )

    return {
        torch.ops.mesa_export.chunk_fwd.default: chunk_fwd,
        torch.ops.mesa_export.decode_step.default: decode_step,
    }


# ----------------------------------------------------------------------------------------------
# Oracles: the node computed by ops.reference
# ----------------------------------------------------------------------------------------------
def _run_reference(inputs: tuple[np.ndarray, ...], chunk_size: int | None, cg_steps: int, cg_tol: float):
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    with torch.no_grad():
        if chunk_size is None:
            out = reference.decode_step(*tensors, int(cg_steps), float(cg_tol))
        else:
            out = reference.chunk_fwd(*tensors, int(chunk_size), int(cg_steps), float(cg_tol))
    return tuple(t.numpy() for t in out)


def reference_evaluator_ops() -> list[type]:
    """``OpRun`` classes for ``ReferenceEvaluator(model, new_ops=...)`` (plugin graphs)."""
    from onnx.reference.op_run import OpRun

    class MesaChunkFwd(OpRun):
        op_domain = names.ONNX_DOMAIN

        def _run(self, *inputs, chunk_size=None, cg_steps=None, cg_tol=None):
            return _run_reference(inputs, chunk_size, cg_steps, cg_tol)

    class MesaDecodeStep(OpRun):
        op_domain = names.ONNX_DOMAIN

        def _run(self, *inputs, cg_steps=None, cg_tol=None):
            return _run_reference(inputs, None, cg_steps, cg_tol)

    MesaChunkFwd.__name__ = names.ONNX_CHUNK_FWD  # ReferenceEvaluator matches op_type by class name
    MesaDecodeStep.__name__ = names.ONNX_DECODE_STEP
    return [MesaChunkFwd, MesaDecodeStep]


def to_ort_extensions_model(model: Any) -> Any:
    """A copy of a plugin ``onnx.ModelProto`` with the ``mesa`` domain renamed to ai.onnx.contrib."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.domain == names.ONNX_DOMAIN:
            node.domain = names.ORT_EXTENSIONS_DOMAIN
    for opset in copy.opset_import:
        if opset.domain == names.ONNX_DOMAIN:
            opset.domain = names.ORT_EXTENSIONS_DOMAIN
    return copy


_ORT_OPS_REGISTERED = False


def _register_ort_extensions_ops() -> None:
    global _ORT_OPS_REGISTERED
    if _ORT_OPS_REGISTERED:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i32 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int32
    outputs = [f32, f32, f32, f32, i32]

    @onnx_op(
        op_type=names.ONNX_CHUNK_FWD, inputs=[f32] * len(_INPUTS), outputs=outputs,
        attrs={"chunk_size": PyCustomOpDef.dt_int64, "cg_steps": PyCustomOpDef.dt_int64,
               "cg_tol": PyCustomOpDef.dt_float},
    )  # fmt: skip
    def _chunk_fwd(*inputs, **attrs):
        return _run_reference(inputs, attrs["chunk_size"], attrs["cg_steps"], attrs["cg_tol"])

    @onnx_op(
        op_type=names.ONNX_DECODE_STEP, inputs=[f32] * len(_INPUTS), outputs=outputs,
        attrs={"cg_steps": PyCustomOpDef.dt_int64, "cg_tol": PyCustomOpDef.dt_float},
    )  # fmt: skip
    def _decode_step(*inputs, **attrs):
        return _run_reference(inputs, None, attrs["cg_steps"], attrs["cg_tol"])

    _ORT_OPS_REGISTERED = True


def ort_extensions_session(model: Any):
    """onnxruntime CPU session of a fp32 plugin graph (ModelProto), the nodes run by ops.reference."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register_ort_extensions_ops()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.log_severity_level = 3
    return ort.InferenceSession(
        to_ort_extensions_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
