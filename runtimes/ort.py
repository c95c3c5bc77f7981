"""onnxruntime runner for exported MesaNetLM graphs, with the recurrent state kept by the caller.

    sess = OrtSession("decode.onnx", provider="cpu", prefill_path="prefill.onnx")
    tokens = sess.generate(prompt_ids, max_new_tokens=32)

States are dicts ``{"state.{layer}.{field}": array}`` (names from ``mesa_compile.export.names``).
On CUDA the session binds inputs and outputs with IO binding and keeps the states as device
``OrtValue``s between steps; only the logits come back to the host.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from mesa_compile.export import names

__all__ = ["PROVIDERS", "OrtSession"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}  # fmt: skip
State = dict[str, Any]  # name -> np.ndarray (CPU) or onnxruntime.OrtValue (CUDA)


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            "OrtSession requires onnxruntime: pip install 'mesa-compile[onnx]' "
            "(onnxruntime-gpu instead of onnxruntime for provider='cuda')"
        ) from err
    return onnxruntime


class _Graph:
    """One InferenceSession and what the exporter recorded about it."""

    def __init__(self, ort: Any, path: str, provider: str, threads: int | None) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"no ONNX model at {path!r}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # NOTE: the exporter's CastLike nodes make ORT warn on every load
        if threads is not None:
            options.intra_op_num_threads = threads
        # NOTE: TF32 matmuls cost ~1e-3 relative in the CG solve once cond > ~100 (mesanet-math.md 6b),
        # ten times the budget: the CUDA EP runs fp32 graphs in full fp32.
        config = [(PROVIDERS[provider], {"use_tf32": "0"})] if provider == "cuda" else [PROVIDERS[provider]]
        self.session = ort.InferenceSession(path, options, providers=config)
        meta = self.session.get_modelmeta().custom_metadata_map
        props = {
            k[len(names.METADATA_PREFIX) :]: v for k, v in meta.items() if k.startswith(names.METADATA_PREFIX)
        }
        if props.get("kind") != "lm" or props.get("graph") not in ("decode", "prefill"):
            raise ValueError(f"{path!r} is not a MesaNetLM graph exported by mesa_compile.export.to_onnx")
        self.path, self.graph, self.cg = path, props["graph"], props["cg"]
        self.config = json.loads(props["config"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]


class OrtSession:
    """Run an exported MesaNetLM in onnxruntime: ``prefill``, ``step`` and ``generate``.

    path: a decode graph (``to_onnx(..., graph="decode")``) or a prefill graph. prefill_path: an
    optional prefill graph used by ``prefill`` / ``generate`` next to a decode graph (without one,
    prompts run through the decode graph token by token: same result, slower). provider: "cpu" or
    "cuda". threads: onnxruntime intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        provider: str = "cpu",
        *,
        prefill_path: str | os.PathLike | None = None,
        threads: int | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        ort = _import_ort()
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise ValueError(
                f"provider={provider!r} needs {PROVIDERS[provider]}, which this onnxruntime lacks "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu for CUDA"
            )
        self._ort, self.provider = ort, provider
        main = _Graph(ort, os.fspath(path), provider, threads)
        self.decode_graph = main if main.graph == "decode" else None
        self.prefill_graph = main if main.graph == "prefill" else None
        if prefill_path is not None:
            extra = _Graph(ort, os.fspath(prefill_path), provider, threads)
            if extra.graph != "prefill":
                raise ValueError(
                    f"prefill_path {os.fspath(prefill_path)!r} holds a {extra.graph!r} graph, not prefill"
                )
            if extra.config != main.config:
                raise ValueError("prefill_path was exported from a model with a different config")
            self.prefill_graph = extra
        self.config = main.config
        self.vocab_size = int(self.config["vocab_size"])
        self.n_layers = int(self.config["n_layers"])
        self.state_names = [names.state_input(i, f) for i in range(self.n_layers) for f in names.STATE_FIELDS]
        self.last_cg_iters: dict[str, int] = {}  # loop graphs: cg_iters.{layer} of the last run

    # ------------------------------------------------------------------ validation
    def _tokens(self, tokens: Any, *, step: bool) -> np.ndarray:
        ids = np.asarray(tokens)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        if step and ids.ndim == 1:
            ids = ids[:, None]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or (step and ids.shape[1] != 1):
            want = "[batch] or [batch, 1]" if step else "[batch, seq] with batch, seq >= 1"
            raise ValueError(f"token ids must have shape {want}, got {ids.shape}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return ids.astype(np.int64)

    def _check_state(self, state: State, batch: int) -> None:
        graph = self._decode()
        if not isinstance(state, dict):
            raise ValueError(
                f"state must be a dict of {len(self.state_names)} arrays, got {type(state).__name__}"
            )
        missing = [n for n in self.state_names if n not in state]
        extra = sorted(set(state) - set(self.state_names))
        if missing or extra:
            raise ValueError(f"state names do not match the model: missing {missing}, unexpected {extra}")
        for name in self.state_names:
            spec, value = graph.inputs[name], state[name]
            if isinstance(value, self._ort.OrtValue):
                shape, dtype = tuple(value.shape()), _NUMPY_TYPES.get(value.data_type())
            else:
                shape, dtype = np.shape(value), getattr(value, "dtype", None)
            want = tuple(batch if isinstance(d, str) or d is None else d for d in spec.shape)
            if shape != want:
                raise ValueError(f"state[{name!r}] has shape {shape}, expected {want} (batch={batch})")
            if dtype != _NUMPY_TYPES[spec.type]:
                raise ValueError(
                    f"state[{name!r}] has dtype {dtype}, expected {np.dtype(_NUMPY_TYPES[spec.type])}"
                )

    def _decode(self) -> _Graph:
        if self.decode_graph is None:
            raise ValueError(
                f"{self.prefill_graph.path!r} is a prefill graph: step/generate need a decode graph"
            )
        return self.decode_graph

    # ------------------------------------------------------------------ running
    def _run(self, graph: _Graph, feeds: dict[str, Any]) -> tuple[np.ndarray, State]:
        """Run one graph; returns (logits on the host, new state keyed by state input names)."""
        if self.provider == "cpu":
            values = dict(zip(graph.outputs, graph.session.run(None, feeds)))
        else:
            binding = graph.session.io_binding()
            for name, value in feeds.items():
                if isinstance(value, self._ort.OrtValue):
                    binding.bind_ortvalue_input(name, value)
                else:
                    binding.bind_cpu_input(name, value)
            for name in graph.outputs:  # states stay on the device, the rest comes to the host
                binding.bind_output(name, "cuda" if name.startswith("new_state.") else "cpu")
            graph.session.run_with_iobinding(binding)
            values = dict(zip(graph.outputs, binding.get_outputs()))
            values = {k: v if k.startswith("new_state.") else v.numpy() for k, v in values.items()}
        prefix = "cg_iters."
        self.last_cg_iters = {k: int(v) for k, v in values.items() if k.startswith(prefix)}
        state = {
            "state." + k[len("new_state.") :]: v for k, v in values.items() if k.startswith("new_state.")
        }
        return values[names.LOGITS], state

    def init_state(self, batch_size: int) -> State:
        """The zero state (before the first token) for ``batch_size`` sequences."""
        graph = self._decode()
        state = {}
        for name in self.state_names:
            spec = graph.inputs[name]
            shape = tuple(batch_size if isinstance(d, str) or d is None else d for d in spec.shape)
            state[name] = np.zeros(shape, dtype=_NUMPY_TYPES[spec.type])
            if self.provider == "cuda":
                state[name] = self._ort.OrtValue.ortvalue_from_numpy(state[name], "cuda", 0)
        return state

    def step(self, token: Any, state: State) -> tuple[np.ndarray, State]:
        """One token per sequence, ``token`` [B] or [B, 1] -> (logits [B, vocab], new state)."""
        graph = self._decode()
        ids = self._tokens(token, step=True)
        self._check_state(state, ids.shape[0])
        return self._run(graph, {names.INPUT_IDS: ids, **state})

    def prefill(self, tokens: Any) -> tuple[np.ndarray, State]:
        """Prompts ``tokens`` [B, T] from the zero state -> (logits [B, T, vocab], state after them)."""
        ids = self._tokens(tokens, step=False)
        if self.prefill_graph is not None:
            return self._run(self.prefill_graph, {names.INPUT_IDS: ids})
        state, logits = self.init_state(ids.shape[0]), []
        for t in range(ids.shape[1]):
            step_logits, state = self._run(self._decode(), {names.INPUT_IDS: ids[:, t : t + 1], **state})
            logits.append(step_logits)
        return np.stack(logits, axis=1), state

    def generate(
        self,
        prompt: Any,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> np.ndarray:
        """Continue each prompt [B, T] by ``max_new_tokens`` tokens -> int64 [B, T + max_new_tokens].

        temperature 0 is greedy (what ``MesaNetLM.generate`` does too); otherwise sample from
        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens when given,
        with a numpy generator seeded by ``seed``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        ids = self._tokens(prompt, step=False)
        self._decode()
        if max_new_tokens == 0:
            return ids
        rng = np.random.default_rng(seed)
        logits, state = self.prefill(ids)
        tokens = [ids]
        token = _sample(logits[:, -1], temperature, top_k, rng)  # (B, 1)
        for _ in range(max_new_tokens - 1):
            tokens.append(token)
            logits, state = self._run(self._decode(), {names.INPUT_IDS: token, **state})
            token = _sample(logits, temperature, top_k, rng)
        tokens.append(token)
        return np.concatenate(tokens, axis=1)


def _sample(
    logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator
) -> np.ndarray:
    """logits (B, vocab) -> next token ids (B, 1) int64."""
    logits = logits.astype(np.float32)
    if temperature == 0.0:
        return logits.argmax(axis=-1)[:, None].astype(np.int64)
    logits = logits / temperature
    if top_k is not None:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([[rng.choice(probs.shape[-1], p=p)] for p in probs], dtype=np.int64)
