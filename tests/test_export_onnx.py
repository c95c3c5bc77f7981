"""ONNX export: graph structure, onnxruntime CPU vs torch eager, the plugin oracles, bad arguments.

Tolerance: 1e-4 relative (max |ort - torch| / max |torch| per output), fp32. Both sides run the
same CG in fp32; the graphs' prefill treats the prompt as one chunk where torch uses 64-token
chunks, which moves results by ~1e-6 (measured 5e-7 on the tiny preset).
Exports are slow (tracing unrolled CG steps), so each graph is exported once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mesa_compile import MesaConfig, MesaLayer, MesaNetLM  # noqa: E402
from mesa_compile.export import names, plugin, read_metadata, to_onnx  # noqa: E402
from mesa_compile.export.onnx_export import _flatten  # noqa: E402

RTOL = 1e-4
# (cg_steps, cg_tol) per form: fixed unrolls, so few steps keep the export fast; loop runs the
# paper's early-exit setting, bounded by 30.
CG = {"fixed": (6, 0.0), "loop": (30, 1e-4), "plugin": (6, 0.0)}


def cached_export(tmp_path_factory, model, graph: str, cg: str, cg_steps: int, cg_tol: float):
    """Export once per test session: the ONNX test modules share files by weights and options."""
    root = tmp_path_factory.getbasetemp() / "onnx-cache"
    root.mkdir(exist_ok=True)
    fingerprint = sum(float(p.double().sum()) for p in model.parameters())
    path = root / f"{graph}-{cg}-{cg_steps}-{cg_tol}-{fingerprint:.12e}.onnx"
    return (
        path if path.exists() else to_onnx(model, path, graph=graph, cg=cg, cg_steps=cg_steps, cg_tol=cg_tol)
    )


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().float().numpy()
    return float(np.abs(got.astype(np.float32) - want).max() / max(np.abs(want).max(), 1e-30))


@pytest.fixture(scope="module")
def model() -> MesaNetLM:
    torch.manual_seed(0)  # the same model as test_runtime_ort.py, which reuses the fixed graphs
    return MesaNetLM(MesaConfig.from_preset("tiny", cg_steps=CG["fixed"][0])).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """graph, cg -> path of the exported file (exported on first use)."""
    return lambda graph, cg: cached_export(tmp_path_factory, model, graph, cg, *CG[cg])


def session(path, cg: str):
    if cg == "plugin":
        return plugin.ort_extensions_session(onnx.load(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_reference(model, graph, cg, B, T):
    """(feeds, expected outputs in graph order) for random tokens (decode: after a random prefix)."""
    steps, tol = CG[cg]
    with torch.no_grad():
        if graph == "prefill":
            ids = torch.randint(0, model.config.vocab_size, (B, T))
            logits, state = model(ids, cg_steps=steps, cg_tol=tol)
            return {names.INPUT_IDS: ids.numpy()}, [logits, *_flatten(state)]
        _, prefix = model(torch.randint(0, model.config.vocab_size, (B, 9)))
        ids = torch.randint(0, model.config.vocab_size, (B, 1))
        logits, state = model(ids, prefix, cg_steps=steps, cg_tol=tol)
        feeds = {names.INPUT_IDS: ids.numpy()}
        fields = [(i, f) for i in range(model.config.n_layers) for f in names.STATE_FIELDS]
        feeds.update({names.state_input(i, f): t.numpy() for (i, f), t in zip(fields, _flatten(prefix))})
        return feeds, [logits[:, -1], *_flatten(state)]


@pytest.mark.parametrize("cg", ["fixed", "loop", "plugin"])
@pytest.mark.parametrize("graph", ["decode", "prefill"])
def test_ort_matches_torch(model, exported, graph, cg):
    sess = session(exported(graph, cg), cg)
    shapes = [(1, 1), (3, 37), (3, 130), (1, 130)] if graph == "prefill" else [(1, 1), (3, 1)]
    for B, T in shapes:
        feeds, want = torch_reference(model, graph, cg, B, T)
        got = sess.run(None, feeds)
        for name, g, w in zip([o.name for o in sess.get_outputs()], got, want):
            assert g.shape == tuple(w.shape), (name, B, T)
            assert rel_err(g, w) <= RTOL, (name, B, T, rel_err(g, w))


@pytest.mark.parametrize("graph", ["decode", "prefill"])
def test_graph_structure(model, exported, graph):
    n_layers = model.config.n_layers
    fixed, loop, plug = (onnx.load(exported(graph, cg)) for cg in ("fixed", "loop", "plugin"))
    for proto in (fixed, loop):
        assert not any(n.domain == names.ONNX_DOMAIN for n in proto.graph.node)
    assert not any(n.op_type == "Loop" for n in fixed.graph.node)
    loops = [n for n in loop.graph.node if n.op_type == "Loop"]
    assert len(loops) == n_layers
    trip = {i.name: onnx.numpy_helper.to_array(i) for i in loop.graph.initializer}
    assert all(int(trip[n.input[0]]) == CG["loop"][0] for n in loops)  # bounded: M = cg_steps
    custom = [n for n in plug.graph.node if n.domain == names.ONNX_DOMAIN]
    op_type = names.ONNX_DECODE_STEP if graph == "decode" else names.ONNX_CHUNK_FWD
    assert [n.op_type for n in custom] == [op_type] * n_layers
    assert not any(n.op_type == "Loop" for n in plug.graph.node)
    assert not plug.functions  # a local function would be inlined instead of reaching a plugin
    assert (names.ONNX_DOMAIN, names.ONNX_DOMAIN_VERSION) in [
        (o.domain, o.version) for o in plug.opset_import
    ]
    first = plug.graph.input[0]
    dims = [d.dim_param or d.dim_value for d in first.type.tensor_type.shape.dim]
    assert first.name == names.INPUT_IDS and dims == (
        [names.BATCH_DIM, 1] if graph == "decode" else [names.BATCH_DIM, names.SEQ_DIM]
    )
    state_outputs = [o.name for o in plug.graph.output][1:]
    assert state_outputs == [names.state_output(i, f) for i in range(n_layers) for f in names.STATE_FIELDS]
    meta = read_metadata(plug)
    assert (meta["kind"], meta["graph"], meta["cg"]) == ("lm", graph, "plugin")
    assert meta["config"]["n_layers"] == n_layers
    for proto in (fixed, loop, plug):
        plugin.register_schemas()
        onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("graph", ["decode", "prefill"])
def test_loop_stops_early_and_matches_early_exit(model, exported, graph):
    """Easy inputs converge (||r|| <= 1e-4 ||r0||) well before 30 steps; torch's early-exit path agrees."""
    sess = session(exported(graph, "loop"), "loop")
    feeds, want = torch_reference(model, graph, "loop", 3, 1 if graph == "decode" else 37)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    iters = [int(out[names.cg_iters_output(i)]) for i in range(model.config.n_layers)]
    assert all(1 <= n < CG["loop"][0] for n in iters), iters
    assert rel_err(out[names.LOGITS], want[0]) <= RTOL


def test_plugin_reference_evaluator(model, exported):
    from onnx.reference import ReferenceEvaluator

    proto = onnx.load(exported("prefill", "plugin"))
    evaluator = ReferenceEvaluator(proto, new_ops=plugin.reference_evaluator_ops())
    feeds, want = torch_reference(model, "prefill", "plugin", 2, 37)
    for got, w in zip(evaluator.run(None, feeds), want):
        assert rel_err(got, w) <= RTOL


def test_layer_alone(tmp_path):
    """A MesaLayer exports on its own (decode graph with its state, loop form)."""
    layer = MesaLayer(MesaConfig.from_preset("tiny")).eval()
    path = to_onnx(layer, tmp_path / "layer.onnx", graph="decode", cg="loop", cg_steps=30, cg_tol=1e-4)
    sess = session(path, "loop")
    x = torch.randn(3, 1, layer.config.d_model)
    with torch.no_grad():
        _, prefix = layer(torch.randn(3, 6, layer.config.d_model))
        y, state = layer(x, prefix, cg_steps=30, cg_tol=1e-4)
    feeds = {names.LAYER_INPUT: x.numpy()}
    feeds.update(
        {names.state_input(0, f): t.numpy() for f, t in zip(names.STATE_FIELDS, _flatten((prefix,)))}
    )
    got = sess.run(None, feeds)
    for g, w in zip(got, [y, *_flatten((state,))]):
        assert rel_err(g, w) <= RTOL


def test_float16_decode(model, tmp_path):
    """fp16 weights / activations / conv caches, fp32 Mesa states and CG.

    32 teacher-forced tokens on onnxruntime CPU (the gpu test runs 64 on CUDA) stay within 1e-2 of
    the fp32 torch logits (fp16 roundoff ~5e-4 per op; measured 1.3e-3 on the tiny preset).
    """
    from mesa_compile.runtimes import OrtSession

    path = to_onnx(model, tmp_path / "fp16.onnx", graph="decode", cg="loop", cg_steps=30, dtype=torch.float16)
    proto = onnx.load(path)
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.input, *proto.graph.output]}
    F32, F16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types[names.state_input(0, "h_kk")] == F32 and types[names.state_output(1, "h_kv")] == F32
    assert types[names.state_input(0, "conv_q")] == F16 and types[names.LOGITS] == F16
    sess = OrtSession(path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 32))
    state, want_state = sess.init_state(2), model.init_state(2)
    for t in range(32):
        logits, state = sess.step(tokens[:, t].numpy(), state)
        with torch.no_grad():
            want, want_state = model(tokens[:, t : t + 1], want_state, cg_steps=30)
        assert rel_err(logits, want[:, -1]) <= 1e-2, t


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cg_steps=0), "cg_steps"),
        (dict(cg_steps=-3), "cg_steps"),
        (dict(cg_tol=-1.0), "cg_tol"),
        (dict(graph="train"), "graph"),
        (dict(cg="scan"), "cg"),
        (dict(dtype=torch.bfloat16), "dtype"),
        (dict(opset=13), "opset"),
    ],
)
def test_to_onnx_bad_arguments(model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        to_onnx(model, tmp_path / "m.onnx", **kwargs)
    assert not any(tmp_path.iterdir())


def test_to_onnx_bad_model_and_paths(model, tmp_path):
    with pytest.raises(ValueError, match="MesaNetLM or a MesaLayer"):
        to_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(model, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="is a directory"):
        to_onnx(model, tmp_path)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """to_onnx writes through _save_atomic: a failing write leaves neither the target nor a temp file."""
    from mesa_compile.export.onnx_export import _save_atomic

    proto = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))

    def fail(model, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", fail)
    with pytest.raises(OSError, match="disk full"):
        _save_atomic(proto, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
