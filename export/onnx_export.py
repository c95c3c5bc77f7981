"""``to_onnx``: MesaNetLM / MesaLayer -> ONNX (opset 18) with explicit, named recurrent state.

Graphs (architecture.md, "Export graphs"):
- LM decode:   input_ids (batch, 1), state.{i}.{h_kk,h_kv,conv_q,conv_k}
               -> logits (batch, vocab), new_state.{i}.*
- LM prefill:  input_ids (batch, seq) -> logits (batch, seq, vocab), new_state.{i}.*  (zero state in)
- layer:       x (batch, seq|1, d_model) [+ state.0.* for decode] -> y, new_state.0.*
Loop graphs add cg_iters.{i} (int64 scalar: iterations layer i's ``Loop`` ran).
Mesa states are fp32 in every graph; with ``dtype=torch.float16`` weights, activations and conv
caches are fp16 while the state update and CG stay fp32 (the ops compute in fp32 and cast o only).
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mesa_compile.export import names
from mesa_compile.export.decompose import CG_FORMS, decompositions
from mesa_compile.ops import MesaState
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from mesa_compile.config import MesaConfig
from mesa_compile.layer import MesaLayer
from mesa_compile.model import MesaNetLM
from mesa_compile.state import MesaLayerState

__all__ = ["DTYPES", "GRAPHS", "read_metadata", "to_onnx"]

GRAPHS = ("decode", "prefill")
DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_ONNX_IMPORT_HINT = "ONNX export requires onnx and onnxscript: pip install 'mesa-compile[onnx]'"
# Example sizes for tracing: >= 2 so that torch.export does not specialise dynamic dims to 0/1.
_EXAMPLE_BATCH, _EXAMPLE_SEQ = 2, 5


def _flatten(state: tuple[MesaLayerState, ...]) -> list[Tensor]:
    return [t for s in state for t in (s.mesa.h_kk, s.mesa.h_kv, s.conv_q, s.conv_k)]


def _unflatten(flat: tuple[Tensor, ...]) -> tuple[MesaLayerState, ...]:
    n = len(names.STATE_FIELDS)
    return tuple(
        MesaLayerState(MesaState(flat[i], flat[i + 1]), flat[i + 2], flat[i + 3])
        for i in range(0, len(flat), n)
    )


class _Graph(nn.Module):
    """Flat-tensor wrapper around a MesaNetLM or a MesaLayer for one graph kind."""

    def __init__(self, net: nn.Module, decode: bool, cg_steps: int, cg_tol: float) -> None:
        super().__init__()
        self.net, self.decode, self.cg_steps, self.cg_tol = net, decode, cg_steps, cg_tol

    def forward(self, x: Tensor, state: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
        if isinstance(self.net, MesaNetLM):
            out, new = self.net(x, _unflatten(state) or None, cg_steps=self.cg_steps, cg_tol=self.cg_tol)
            out = out[:, -1] if self.decode else out  # decode: (B, vocab)
        else:
            layer_state = _unflatten(state)[0] if state else None
            out, new = self.net(x, layer_state, cg_steps=self.cg_steps, cg_tol=self.cg_tol)
            new = (new,)
        return (out, *_flatten(new))


class _Decomposed(TorchFunctionMode):
    """Trace each mesa op through a replacement: its aten decomposition, or a plugin stand-in."""

    def __init__(self, table: dict) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = self.table.get(func)
        if impl is None:
            return func(*args, **(kwargs or {}))
        return impl(*args, **(kwargs or {}))


def _check_args(graph, cg, cg_steps, cg_tol, dtype, opset) -> None:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    if cg not in CG_FORMS:
        raise ValueError(f"cg must be one of {CG_FORMS}, got {cg!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, int) or cg_steps <= 0:
        raise ValueError(f"cg_steps must be an int >= 1, got {cg_steps!r}")
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not cg_tol >= 0.0:
        raise ValueError(f"cg_tol must be a float >= 0, got {cg_tol!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
    if opset != 18:
        raise ValueError(
            f"only opset 18 is supported (the version the graphs are tested with), got {opset!r}"
        )


def _check_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"cannot write the ONNX file to {str(path)!r}: it is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ValueError(
            f"cannot write the ONNX file to {str(path)!r}: directory {str(parent)!r} does not exist"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write the ONNX file to {str(path)!r}: directory {str(parent)!r} is not writable"
        )


def _examples(net: nn.Module, config: MesaConfig, decode: bool, dtype: torch.dtype):
    """Example inputs, input/output names and dynamic shapes of one graph."""
    B, T = _EXAMPLE_BATCH, 1 if decode else _EXAMPLE_SEQ
    n_layers = config.n_layers if isinstance(net, MesaNetLM) else 1
    batch, seq = torch.export.Dim(names.BATCH_DIM), torch.export.Dim(names.SEQ_DIM)
    if isinstance(net, MesaNetLM):
        x, x_name, out_name = torch.randint(0, config.vocab_size, (B, T)), names.INPUT_IDS, names.LOGITS
    else:
        x, x_name, out_name = (
            torch.randn(B, T, config.d_model, dtype=dtype),
            names.LAYER_INPUT,
            names.LAYER_OUTPUT,
        )
    fields = [(i, f) for i in range(n_layers) for f in names.STATE_FIELDS]
    if decode:
        layer = net.blocks[0].mixer if isinstance(net, MesaNetLM) else net
        state = tuple(_flatten(tuple(layer.init_state(B) for _ in range(n_layers))))
        args = (x, state)
        dynamic = ({0: batch}, tuple({0: batch} for _ in state))
        input_names = [x_name] + [names.state_input(i, f) for i, f in fields]
    else:
        args = (x,)
        dynamic = ({0: batch, 1: seq},)
        input_names = [x_name]
    output_names = [out_name] + [names.state_output(i, f) for i, f in fields]
    return args, dynamic, input_names, output_names


def _rename_dims(model: Any, input_names: list[str], decode: bool) -> None:
    """Replace the exporter's dim symbols (s37, ...) by batch / seq everywhere in the graph."""
    mapping = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in input_names and len(dims) >= 1 and dims[0].dim_param:
            mapping.setdefault(dims[0].dim_param, names.BATCH_DIM)
        if value.name == input_names[0] and not decode and len(dims) >= 2 and dims[1].dim_param:
            mapping.setdefault(dims[1].dim_param, names.SEQ_DIM)
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in mapping) + r")\b")

    def fix(values) -> None:
        for value in values:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.dim_param = pattern.sub(lambda m: mapping[m.group(1)], dim.dim_param)

    def visit(graph) -> None:
        fix(graph.input), fix(graph.output), fix(graph.value_info)
        for node in graph.node:
            for attr in node.attribute:
                if attr.g.node:
                    visit(attr.g)

    visit(model.graph)


def _bound_loops(model: Any, cg_steps: int, n_layers: int) -> None:
    """Set every CG Loop's trip count M = cg_steps and expose its iteration count as cg_iters.{i}."""
    import onnx
    from onnx import TensorProto, helper

    loops = [node for node in model.graph.node if node.op_type == "Loop"]
    if len(loops) != n_layers:
        raise RuntimeError(
            f"expected one CG Loop per Mesa layer ({n_layers}), the exported graph has {len(loops)}"
        )
    trip = "cg_trip_count"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(cg_steps, dtype=np.int64), trip))
    for i, node in enumerate(loops):
        body = next(a.g for a in node.attribute if a.name == "body")
        # Body outputs: (condition, carried...); the first carried value is the iteration counter.
        if body.output[1].type.tensor_type.elem_type != TensorProto.INT64 or not node.output[0]:
            raise RuntimeError(f"Loop {node.name!r}: first carried value is not the int64 iteration counter")
        node.input[0] = trip
        name = names.cg_iters_output(i)
        model.graph.node.append(helper.make_node("Identity", [node.output[0]], [name]))
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, []))


def to_onnx(
    model: MesaNetLM | MesaLayer,
    path: str | os.PathLike,
    *,
    graph: str = "decode",
    cg: str = "fixed",
    cg_steps: int | None = None,
    cg_tol: float | None = None,
    dtype: torch.dtype = torch.float32,
    opset: int = 18,
) -> Path:
    """Export ``model`` to an ONNX file at ``path`` (written atomically); returns the path.

    graph: "decode" (one token, states in and out) or "prefill" (a prompt of any length from the
    zero state). cg: "fixed" (CG unrolled in standard ops), "loop" (ONNX Loop with early exit,
    bounded by cg_steps) or "plugin" (one ``mesa`` custom-domain node per layer). cg_steps / cg_tol
    default to the model config's. dtype: torch.float32 or torch.float16 (weights and activations;
    Mesa states and the CG solve stay fp32). Batch is dynamic; so is seq in prefill graphs.
    Raises ValueError for bad arguments or an unwritable path (before any work is done).
    """
    if not isinstance(model, (MesaNetLM, MesaLayer)):
        raise ValueError(f"model must be a MesaNetLM or a MesaLayer, got {type(model).__name__}")
    config: MesaConfig = model.config
    cg_steps = config.cg_steps if cg_steps is None else cg_steps
    cg_tol = config.cg_tol if cg_tol is None else cg_tol
    _check_args(graph, cg, cg_steps, cg_tol, dtype, opset)
    path = Path(path)
    _check_path(path)
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter's translator)
    except ImportError as err:
        raise ImportError(_ONNX_IMPORT_HINT) from err
    from mesa_compile.export import plugin

    decode = graph == "decode"
    net = copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()  # traced on CPU, any source device
    args, dynamic, input_names, output_names = _examples(net, config, decode, dtype)
    wrapper = _Graph(net, decode, int(cg_steps), float(cg_tol))
    options = dict(dynamo=True, opset_version=opset, dynamic_shapes=dynamic, optimize=True,
                   input_names=input_names, output_names=output_names, verbose=False)  # fmt: skip
    with torch.no_grad():
        table = plugin.node_ops() if cg == "plugin" else decompositions(cg)
        table.update({op.overloadpacket: impl for op, impl in list(table.items())})
        if cg == "plugin":
            options["custom_translation_table"] = plugin.translation_table()
        with _Decomposed(table):
            program = torch.onnx.export(wrapper, args, **options)
    proto = program.model_proto
    _rename_dims(proto, input_names, decode)
    n_layers = config.n_layers if isinstance(model, MesaNetLM) else 1
    if cg == "loop":
        _bound_loops(proto, int(cg_steps), n_layers)
    meta = {
        "kind": "lm" if isinstance(model, MesaNetLM) else "layer", "graph": graph, "cg": cg,
        "cg_steps": str(int(cg_steps)), "cg_tol": repr(float(cg_tol)), "dtype": DTYPES[dtype],
        "n_layers": str(n_layers), "config": config.to_json(),
    }  # fmt: skip
    onnx.helper.set_model_props(proto, {names.METADATA_PREFIX + k: v for k, v in meta.items()})
    if cg == "plugin":
        plugin.register_schemas()
    onnx.checker.check_model(proto, full_check=True)
    _save_atomic(proto, path)
    return path


def _save_atomic(proto: Any, path: Path) -> None:
    """Write to a temporary file next to ``path``, then rename: a failure leaves nothing at ``path``."""
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(model: Any) -> dict[str, Any]:
    """The exporter's metadata of an ``onnx.ModelProto`` (kind, graph, cg, cg_steps, config, ...)."""
    props = {p.key[len(names.METADATA_PREFIX):]: p.value for p in model.metadata_props
             if p.key.startswith(names.METADATA_PREFIX)}  # fmt: skip
    if "config" in props:
        props["config"] = json.loads(props["config"])
    return props
