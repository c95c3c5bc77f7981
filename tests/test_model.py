"""Model side on CPU: config, MesaLayer, MesaNetLM (state carrying, decoding, training, bad inputs)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mesa_compile import MesaConfig, MesaLayer, MesaLayerState, MesaNetLM, MesaState
from mesa_compile.config import PRESETS
from mesa_compile.ops import debug_checks

# Tolerance for "same computation, different split" in fp32: max |a - b| / max |b|. Prefill,
# split prefill and decode agree to ~1e-6 once CG has converged (cg_steps > head_dim); the budget
# leaves two orders of magnitude for fp32 reassociation across chunk / step boundaries.
REL_TOL = 1e-4


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def tiny(**overrides) -> MesaConfig:
    # cg_steps = head_dim + 8: CG converges (exact arithmetic: K steps), so paths agree to fp32 noise.
    return MesaConfig.from_preset("tiny", **{"cg_steps": 40, **overrides})


# Variants: defaults (one chunk per prompt); everything switched, V != K, several chunks per prompt.
VARIANTS = [
    {},
    {"output_gate": False, "gamma_cap": True, "value_head_dim": 16, "chunk_size": 8, "tie_embeddings": True},
]


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("name, nominal", [("145m", 145e6), ("400m", 400e6), ("1b", 1e9)])
def test_paper_presets_have_nominal_size(name, nominal):
    cfg = MesaConfig.from_preset(name)
    assert abs(cfg.num_params() / nominal - 1) < 0.05, cfg.num_params()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_num_params_counts_the_model(overrides):
    cfg = tiny(**overrides)
    model = MesaNetLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert (model.lm_head.weight is model.embed.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = MesaConfig.from_preset(name, cg_tol=1e-4, gamma_cap=True, value_head_dim=16)
    assert MesaConfig.from_json(cfg.to_json()) == cfg
    assert MesaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.cg_tol == 1e-4 and cfg.value_dim == 16


def test_config_defaults_follow_the_paper():
    cfg = MesaConfig()
    assert (cfg.cg_steps, cfg.cg_tol, cfg.chunk_size, cfg.conv_size) == (30, 0.0, 64, 4)
    assert (cfg.lambda_init, cfg.lambda_floor) == (1.0, 0.25)


@pytest.mark.parametrize(
    "field, value",
    [
        ("d_model", 0),
        ("n_heads", 1.5),
        ("head_dim", True),
        ("value_head_dim", -2),
        ("cg_steps", -1),
        ("cg_tol", -1e-3),
        ("cg_tol", float("nan")),
        ("chunk_size", 0),
        ("output_gate", "yes"),
        ("lambda_floor", 0.0),
        ("lambda_init", 0.25),
        ("norm_eps", 0),
    ],
)
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=f"MesaConfig.{field} "):
        MesaConfig.from_preset("tiny", **{field: value})


def test_config_rejects_unknown_field_and_preset():
    with pytest.raises(ValueError, match="d_modle"):
        MesaConfig.from_dict({"d_modle": 64})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        MesaConfig.from_preset("huge")


# ----------------------------------------------------------------------------------------- layer
def test_layer_init_lambda_and_state_paths():
    cfg = tiny(chunk_size=8)
    layer = MesaLayer(cfg)
    torch.testing.assert_close(layer.regulariser(), torch.full((2, 32), 1.0), rtol=0, atol=1e-6)
    x = torch.randn(3, 19, cfg.d_model)
    y, state = layer(x)
    y0, state0 = layer(x, layer.init_state(3))  # explicit zero state == no state
    assert max_rel(y0, y) < REL_TOL
    assert isinstance(state, MesaLayerState) and isinstance(state.mesa, MesaState)
    assert state.mesa.h_kk.shape == (3, 2, 32, 32) and state.mesa.h_kk.dtype == torch.float32
    assert state.conv_q.shape == (3, 64, cfg.conv_size - 1)
    # The conv cache holds the last conv_size - 1 projections, oldest first.
    torch.testing.assert_close(state.conv_k, layer.k_proj(x[:, -3:]).transpose(1, 2))
    for a, b in zip(torch.utils._pytree.tree_leaves(state0), torch.utils._pytree.tree_leaves(state)):
        assert max_rel(a, b) < REL_TOL


# ----------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("overrides", VARIANTS)
def test_prefill_then_decode_matches_full_forward(overrides):
    model = MesaNetLM(tiny(**overrides))
    ids = torch.randint(0, 256, (3, 37))
    full, full_state = model(ids)  # (3, 37, 256)
    logits, state = model(ids[:, :21])  # prefill 21 tokens, then decode 16 one by one
    steps = [logits]
    for t in range(21, 37):
        step_logits, state = model.decode_one_token(ids[:, t : t + 1], state)  # (3, 256)
        steps.append(step_logits[:, None])
    assert max_rel(torch.cat(steps, dim=1), full) < REL_TOL
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(full_state)):
        assert max_rel(a, b) < REL_TOL


@pytest.mark.parametrize("overrides", VARIANTS)
def test_split_prefill_matches_one_prefill(overrides):
    model = MesaNetLM(tiny(**overrides))
    ids = torch.randint(0, 256, (2, 40), dtype=torch.int32)
    full, full_state = model(ids)
    first, state = model(ids[:, :13])  # 13 + 27 crosses chunk boundaries mid-chunk (chunk_size 8)
    second, state = model(ids[:, 13:], state)
    assert max_rel(torch.cat([first, second], dim=1), full) < REL_TOL
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(full_state)):
        assert max_rel(a, b) < REL_TOL


def test_return_cg_steps_reports_steps_and_changes_no_output():
    model = MesaNetLM(tiny(n_layers=2, chunk_size=8))
    ids = torch.randint(0, 256, (3, 19))
    logits, state = model(ids, cg_steps=30, cg_tol=1e-3)
    logits2, state2, used = model(ids, cg_steps=30, cg_tol=1e-3, return_cg_steps=True)
    assert used.shape == (2, 3, 19, 2) and used.dtype == torch.int32  # (n_layers, B, T, H)
    assert 0 < used.min() and used.max() <= 30 and used.float().mean() < 30  # early exit spent fewer
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)  # same computation, bit for bit
    for a, b in zip(torch.utils._pytree.tree_leaves(state2), torch.utils._pytree.tree_leaves(state)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # No tolerance: every token runs the budget, except the first, whose diagonal-plus-rank-one system
    # is solved early and may stop a step short on the breakdown guard (measured: 6 or 7 of 7).
    _, _, fixed = model(ids, cg_steps=7, return_cg_steps=True)
    assert torch.equal(fixed[:, :, 1:], torch.full_like(fixed[:, :, 1:], 7)) and fixed.min() >= 1
    _, _, step = model.blocks[0].mixer(torch.randn(3, 1, 64), state[0], cg_steps=3, return_cg_steps=True)
    assert step.shape == (3, 1, 2) and torch.equal(step, torch.full_like(step, 3))  # decode path


def test_generate_greedy_matches_full_forward_argmax():
    model = MesaNetLM(tiny())
    prompt = torch.randint(0, 256, (2, 7))
    out = model.generate(prompt, 6)
    assert out.shape == (2, 13) and torch.equal(out[:, :7], prompt)
    logits, _ = model(out[:, :-1])  # (2, 12, 256): every generated token is the argmax after its prefix
    torch.testing.assert_close(out[:, 7:], logits[:, 6:].argmax(-1), rtol=0, atol=0)


def test_generate_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = MesaNetLM(tiny(cg_steps=8))
    prompt = torch.randint(0, 256, (2, 5))
    a = model.generate(prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 5, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top1 = model.generate(prompt, 5, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(top1, model.generate(prompt, 5))


def test_tiny_model_learns():
    # Copy task: 12 random tokens from a 16-token alphabet, then the same 12 again; loss on the copy.
    # Chance is ln(256) = 5.55; ln(16) = 2.77 needs the alphabet only, below it needs the copy.
    torch.manual_seed(0)
    model = MesaNetLM(tiny(cg_steps=10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(50):
        x = torch.randint(0, 16, (16, 12))
        ids = torch.cat([x, x], dim=1)  # (16, 24)
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits[:, 11:].reshape(-1, 256), ids[:, 12:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 5.0
    assert sum(losses[-5:]) / 5 < 0.55 * losses[0], losses


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_input_ids():
    model = MesaNetLM(tiny(cg_steps=2))
    with pytest.raises(TypeError, match="input_ids must be int64 or int32, got torch.float32"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\], got \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\], got \(1, 2, 5\)"):
        model(torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        model(torch.zeros(2, 0, dtype=torch.long))
    bad_ids = torch.tensor([[3, 256]])
    with debug_checks(True):
        with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 256\), got values in \[3, 256\]"):
            model(bad_ids)


def test_bad_states():
    model = MesaNetLM(tiny(cg_steps=2))
    ids = torch.zeros(2, 1, dtype=torch.long)
    state = model.init_state(2)
    with pytest.raises(ValueError, match="state must be a tuple of 2 MesaLayerState, got 1"):
        model(ids, state[:1])
    with pytest.raises(ValueError, match=r"state\[0\].mesa.h_kk has shape \(3, 2, 32, 32\), expected \(2, 2, 32, 32\)"):
        model(ids, model.init_state(3))
    bad = state[1]._replace(conv_k=state[1].conv_k[..., :2])
    with pytest.raises(ValueError, match=r"state\[1\].conv_k has shape \(2, 64, 2\), expected \(2, 64, 3\)"):
        model(ids, (state[0], bad))
    bad = state[0]._replace(mesa=MesaState(state[0].mesa.h_kk.half(), state[0].mesa.h_kv))
    with pytest.raises(TypeError, match=r"state\[0\].mesa.h_kk must be float32"):
        model(ids, (bad, state[1]))
    with pytest.raises(ValueError, match=r"state\[0\] must be a MesaLayerState, got tuple"):
        model(ids, (tuple(state[0]), state[1]))
    layer = model.blocks[0].mixer
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, 64\], got \(2, 3, 32\)"):
        layer(torch.randn(2, 3, 32))
