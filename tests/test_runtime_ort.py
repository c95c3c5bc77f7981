"""OrtSession: stateful decoding and generation vs torch, input validation, GPU parity (marked gpu).

Tolerances: CPU fp32 1e-4 relative (see test_export_onnx.py); GPU fp16 decode 1e-2 relative to the
fp32 torch logits (fp16 weights and activations, ~5e-4 unit roundoff over a few dozen layers of
matmuls; Mesa states and CG stay fp32 in the graph).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from mesa_compile import MesaConfig, MesaNetLM  # noqa: E402
from mesa_compile.export import to_onnx  # noqa: E402
from mesa_compile.runtimes import OrtSession  # noqa: E402

RTOL = 1e-4
CG_STEPS = 6  # the tiny model's budget here: fixed graphs unroll it, keep the export fast


@pytest.fixture(scope="module")
def model() -> MesaNetLM:
    torch.manual_seed(0)  # the same model as test_export_onnx.py: its fixed graphs are reused
    return MesaNetLM(MesaConfig.from_preset("tiny", cg_steps=CG_STEPS)).eval()


@pytest.fixture(scope="module")
def graphs(model, tmp_path_factory):
    return {
        g: cached_export(tmp_path_factory, model, g, "fixed", CG_STEPS, 0.0) for g in ("decode", "prefill")
    }


@pytest.fixture(scope="module")
def sess(graphs) -> OrtSession:
    return OrtSession(graphs["decode"], provider="cpu", prefill_path=graphs["prefill"])


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


def test_greedy_generation_matches_torch(model, sess):
    prompt = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        want = model.generate(prompt, 32)
    got = sess.generate(prompt.numpy(), 32)
    np.testing.assert_array_equal(got, want.numpy())


def test_prefill_then_steps_match_torch(model, sess):
    prompt = torch.randint(0, model.config.vocab_size, (2, 37))
    logits, state = sess.prefill(prompt.numpy())
    with torch.no_grad():
        want_logits, want_state = model(prompt)
    assert rel_err(logits, want_logits) <= RTOL
    token = torch.randint(0, model.config.vocab_size, (2, 1))
    for _ in range(3):
        logits, state = sess.step(token.numpy(), state)
        with torch.no_grad():
            want_logits, want_state = model(token, want_state)
        assert rel_err(logits, want_logits[:, -1]) <= RTOL
        assert rel_err(state["state.1.h_kk"], want_state[1].mesa.h_kk) <= RTOL
        token = want_logits[:, -1].argmax(-1, keepdim=True)


def test_prefill_through_decode_graph(model, graphs, sess):
    """Without a prefill graph the prompt runs token by token through the decode graph: same state."""
    decode_only = OrtSession(graphs["decode"])
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    logits, state = decode_only.prefill(prompt)
    want_logits, want_state = sess.prefill(prompt)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=RTOL * np.abs(want_logits).max())
    for name in decode_only.state_names:
        np.testing.assert_allclose(
            state[name], want_state[name], rtol=0, atol=RTOL * np.abs(want_state[name]).max()
        )


def test_sampling_is_seeded(sess):
    prompt = np.array([[1, 2, 3]])
    a = sess.generate(prompt, 8, temperature=0.8, top_k=5, seed=3)
    b = sess.generate(prompt, 8, temperature=0.8, top_k=5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 11) and a.dtype == np.int64


def test_bad_provider_and_path(graphs, tmp_path):
    with pytest.raises(ValueError, match="provider must be one of"):
        OrtSession(graphs["decode"], provider="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            OrtSession(graphs["decode"], provider="cuda")
    with pytest.raises(ValueError, match="no ONNX model"):
        OrtSession(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="not prefill"):
        OrtSession(graphs["decode"], prefill_path=graphs["decode"])


def test_bad_tokens(sess, model):
    state = sess.init_state(2)
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
        sess.step(np.array([0, V]), state)
    with pytest.raises(ValueError, match="lie in"):
        sess.prefill(np.array([[-1, 3]]))
    with pytest.raises(ValueError, match="integers"):
        sess.step(np.array([0.5, 1.0]), state)
    with pytest.raises(ValueError, match="shape"):
        sess.step(np.zeros((2, 2), dtype=np.int64), state)


def test_bad_state(sess):
    state = sess.init_state(2)
    token = np.array([1, 2])
    with pytest.raises(ValueError, match="expected \\(2, 2, 32, 32\\)"):
        sess.step(token, {**state, "state.0.h_kk": np.zeros((2, 2, 32, 31), np.float32)})
    with pytest.raises(ValueError, match="batch=3"):
        sess.step(np.array([1, 2, 3]), state)
    with pytest.raises(ValueError, match="dtype"):
        sess.step(token, {**state, "state.1.h_kv": state["state.1.h_kv"].astype(np.float64)})
    with pytest.raises(ValueError, match="missing \\['state.0.conv_k'\\]"):
        sess.step(token, {k: v for k, v in state.items() if k != "state.0.conv_k"})


def test_prefill_graph_cannot_step(graphs):
    prefill_only = OrtSession(graphs["prefill"])
    with pytest.raises(ValueError, match="prefill graph"):
        prefill_only.step(np.array([1]), {})


def test_missing_onnxruntime_is_actionable(graphs, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'mesa-compile\[onnx\]'"):
        OrtSession(graphs["decode"])


# ----------------------------------------------------------------------------------------------
# GPU (onnxruntime-gpu with the CUDA execution provider)
# ----------------------------------------------------------------------------------------------
def _cuda_session(*args, **kwargs) -> OrtSession:
    assert "CUDAExecutionProvider" in ort.get_available_providers(), (
        "install onnxruntime-gpu for the gpu tests"
    )
    return OrtSession(*args, provider="cuda", **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("cg", ["fixed", "loop"])
def test_cuda_ep_matches_torch_cuda(tmp_path, cg):
    """1e-3: fp32 on both sides (TF32 off in OrtSession), different kernels and reduction orders."""
    torch.manual_seed(0)
    steps, tol = (30, 1e-4) if cg == "loop" else (10, 0.0)  # fixed unrolls: fewer steps, faster export
    model = MesaNetLM(MesaConfig.from_preset("tiny", cg_steps=steps, cg_tol=tol)).eval()
    paths = {g: to_onnx(model, tmp_path / f"{g}.onnx", graph=g, cg=cg) for g in ("decode", "prefill")}
    sess = _cuda_session(paths["decode"], prefill_path=paths["prefill"])
    gpu = model.cuda()
    prompt = torch.randint(0, model.config.vocab_size, (3, 37), device="cuda")
    logits, state = sess.prefill(prompt.cpu().numpy())
    assert isinstance(state["state.0.h_kk"], ort.OrtValue)  # states stay on the device
    with torch.no_grad():
        want, want_state = gpu(prompt)
    assert rel_err(logits, want.cpu()) <= 1e-3
    token = want[:, -1:].argmax(-1)
    for _ in range(8):
        logits, state = sess.step(token.cpu().numpy(), state)
        with torch.no_grad():
            want, want_state = gpu(token, want_state)
        assert rel_err(logits, want[:, -1].cpu()) <= 1e-3
        token = want[:, -1].argmax(-1, keepdim=True)
    got = sess.generate(prompt.cpu().numpy(), 16)
    np.testing.assert_array_equal(got, gpu.generate(prompt, 16).cpu().numpy())


@pytest.mark.gpu
def test_cuda_fp16_decode_within_1e2(tmp_path):
    torch.manual_seed(0)
    model = MesaNetLM(MesaConfig.from_preset("tiny")).eval()
    path = to_onnx(model, tmp_path / "decode16.onnx", graph="decode", cg="loop", dtype=torch.float16)
    sess = _cuda_session(path)
    tokens = torch.randint(0, model.config.vocab_size, (2, 64))
    state, want_state = sess.init_state(2), model.init_state(2)
    for t in range(64):  # teacher-forced: both sides see the same tokens
        logits, state = sess.step(tokens[:, t].numpy(), state)
        with torch.no_grad():
            want, want_state = model(tokens[:, t : t + 1], want_state)
        assert rel_err(logits, want[:, -1]) <= 1e-2, t


def test_cli_export_and_run(graphs, tmp_path, capsys):
    from mesa_compile.cli import main

    out = tmp_path / "plugin.onnx"
    assert main(["export", "--preset", "tiny", "--cg", "plugin", "--cg-steps", "2", "-o", str(out)]) == 0
    assert out.is_file()
    assert main(["run", str(graphs["decode"]), "--tokens", "1,2,3", "--max-new-tokens", "4"]) == 0
    tokens = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    assert len(tokens) == 7 and tokens[:3] == ["1", "2", "3"]
    assert main(["export", "--cg-steps", "0", "-o", str(tmp_path / "x.onnx")]) == 2
    assert "cg_steps must be an int >= 1" in capsys.readouterr().err
    assert main(["run", str(graphs["decode"]), "--tokens", "1,999"]) == 2
    assert "[0, 256)" in capsys.readouterr().err
