"""Bad input to the public ops raises ValueError/TypeError that names the argument."""

import pytest
import torch

from conftest import mesa_inputs, random_state
from mesa_compile.ops import MesaState, debug_checks, mesa_net, mesa_net_step


@pytest.fixture
def good():
    return mesa_inputs(2, 5, 3, 8, 12)


def _call(inputs, **kwargs):
    return mesa_net(*inputs, cg_steps=4, **kwargs)


def _replace(inputs, index, value):
    out = list(inputs)
    out[index] = value
    return out


CASES = [  # (description, how to break the inputs, exception type, words the message must contain)
    ("q rank", lambda x: _replace(x, 0, x[0][0]), ValueError, ["q", "[B,T,H,K]"]),
    ("k batch", lambda x: _replace(x, 1, x[1][:1]), ValueError, ["k", "B=1", "B=2"]),
    ("v time", lambda x: _replace(x, 2, x[2][:, :4]), ValueError, ["v", "T=4"]),
    ("g heads", lambda x: _replace(x, 3, x[3][..., :2]), ValueError, ["g", "H=2"]),
    ("beta rank", lambda x: _replace(x, 4, x[4][..., None]), ValueError, ["beta"]),
    ("k key size", lambda x: _replace(x, 1, x[1][..., :6]), ValueError, ["k", "K=6", "K=8"]),
    ("lamb shape", lambda x: _replace(x, 5, x[5][:, :4]), ValueError, ["lamb", "K=4"]),
    ("lamb heads", lambda x: _replace(x, 5, x[5][:2]), ValueError, ["lamb", "H=2"]),
    ("mixed dtypes", lambda x: _replace(x, 2, x[2].double()), TypeError, ["v", "float64", "float32"]),
    ("integer q", lambda x: _replace(x, 0, x[0].long()), TypeError, ["q", "floating"]),
    ("not a tensor", lambda x: _replace(x, 3, 0.5), TypeError, ["g", "Tensor"]),
    ("mixed devices", lambda x: _replace(x, 5, x[5].to("meta")), ValueError, ["lamb", "meta", "cpu"]),
]


@pytest.mark.parametrize("desc,breaker,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_tensor_arguments(good, desc, breaker, exc, words):
    with pytest.raises(exc) as err:
        _call(breaker(good))
    for word in words:
        assert word in str(err.value), (desc, str(err.value))


@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(cg_steps=-1), ValueError, "cg_steps"),
        (dict(cg_steps=2.5), TypeError, "cg_steps"),
        (dict(cg_tol=-1e-3), ValueError, "cg_tol"),
        (dict(cg_tol=float("nan")), ValueError, "cg_tol"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_cg_arguments(good, kwargs, exc, word):
    kwargs = {"cg_steps": 4, **kwargs}
    with pytest.raises(exc, match=word):
        mesa_net(*good, **kwargs)


def test_cu_seqlens_errors():
    inputs = mesa_inputs(1, 10, 2, 8, 8)
    with pytest.raises(ValueError, match="cu_seqlens.*B=2"):
        _call(mesa_inputs(2, 10, 2, 8, 8), cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="strictly increasing"):
        _call(inputs, cu_seqlens=torch.tensor([0, 6, 6, 10]))
    with pytest.raises(ValueError, match="strictly increasing"):
        _call(inputs, cu_seqlens=torch.tensor([0, 7, 5, 10]))
    with pytest.raises(ValueError, match="end at T=10"):
        _call(inputs, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(TypeError, match="cu_seqlens"):
        _call(inputs, cu_seqlens=torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match="initial_state.h_kk.*\\[3, 2, 8, 8\\]"):
        _call(inputs, cu_seqlens=torch.tensor([0, 2, 5, 10]), initial_state=random_state(1, 2, 8, 8))


def test_state_errors(good):
    q, k, v, g, beta, lamb = good
    with pytest.raises(ValueError, match="initial_state.h_kv"):
        _call(good, initial_state=MesaState(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 5)))
    with pytest.raises(TypeError, match="state must be a MesaState"):
        mesa_net_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, (1, 2))
    with pytest.raises(ValueError, match="q must have shape \\[B,H,K\\]"):
        mesa_net_step(q, k[:, 0], v[:, 0], g[:, 0], beta[:, 0], lamb, random_state(2, 3, 8, 12))


@pytest.mark.parametrize(
    "index,value,word",
    [(3, 0.1, "g"), (4, 1.5, "beta"), (5, -1.0, "lamb"), (0, float("nan"), "q"), (2, float("inf"), "v")],
)
def test_value_checks_only_in_debug_mode(good, index, value, word):
    bad = list(good)
    bad[index] = bad[index].clone()
    bad[index].view(-1)[0] = value
    _call(bad)  # off by default: no device sync on the hot path
    with debug_checks(), pytest.raises(ValueError, match=word):
        _call(bad)
