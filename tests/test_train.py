"""Training loop: resume continues the same loss curve, checkpoint errors, data sources, schedule, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mesa_compile import MesaConfig, cli
from mesa_compile.data import IGNORE_INDEX, MQARTask, TokenFile, decode_bytes, encode_bytes
from mesa_compile.train import CheckpointError, TrainConfig, latest_checkpoint, lr_at, train

TASK = MQARTask(num_pairs=4, num_queries=3, num_keys=8, num_values=8)
MODEL = MesaConfig(
    vocab_size=TASK.vocab_size, d_model=16, n_layers=1, n_heads=2, head_dim=8, cg_steps=3, chunk_size=8
)


def _config(**overrides) -> TrainConfig:
    fields = {
        "steps": 8,
        "batch_size": 4,
        "lr": 1e-2,
        "warmup_steps": 2,
        "eval_every": 4,
        "eval_batches": 1,
        "checkpoint_every": 2,
        "compile": False,
        "device": "cpu",
    }
    return TrainConfig(**{**fields, **overrides})


class _Stop(Exception):
    """Raised from inside a run to interrupt it, as a crash or a kill would."""


def _stop_at(step: int):
    def on_step(s: int, loss: float) -> None:
        if s == step:
            raise _Stop

    return on_step


def test_resume_continues_the_same_loss_curve(tmp_path):
    full = train(MODEL, _config(), TASK, tmp_path / "full", progress=False)
    assert len(full.losses) == 8 and full.start_step == 0
    # Interrupted after step 4 (0-based), i.e. after the checkpoint of step 4 was written and one
    # more step ran: the resumed run redoes step 4 from the checkpoint.
    with pytest.raises(_Stop):
        train(MODEL, _config(), TASK, tmp_path / "cut", progress=False, on_step=_stop_at(4))
    assert latest_checkpoint(tmp_path / "cut").name == "step-000004"
    resumed = train(MODEL, _config(), TASK, tmp_path / "cut", resume=True, progress=False)
    assert resumed.start_step == 4
    # Eager CPU steps are deterministic: same weights, optimiser moments and batches give the same
    # losses; 1e-6 relative allows only for summation-order noise (observed: exactly equal).
    np.testing.assert_allclose(resumed.losses, full.losses[4:], rtol=1e-6, atol=0)
    for a, b in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_refused_and_nothing_is_overwritten(tmp_path):
    train(MODEL, _config(steps=4), TASK, tmp_path, progress=False)
    ckpt = latest_checkpoint(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        train(MODEL, _config(steps=8), TASK, tmp_path, resume=True, progress=False)
    (ckpt / "optimizer.safetensors").write_bytes(b"")  # truncated file
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(MODEL, _config(steps=8), TASK, tmp_path, resume=True, progress=False)
    assert _snapshot(tmp_path) == before


def test_mismatched_checkpoint_is_refused(tmp_path):
    train(MODEL, _config(steps=2), TASK, tmp_path, progress=False)
    before = _snapshot(tmp_path)
    other = MesaConfig.from_dict({**MODEL.to_dict(), "d_model": 32})
    with pytest.raises(CheckpointError, match=r"another model config: d_model: checkpoint 16, this run 32"):
        train(other, _config(steps=4), TASK, tmp_path, resume=True, progress=False)
    other_task = MQARTask(num_pairs=4, num_queries=3, num_keys=8, num_values=8, seed=1)
    with pytest.raises(CheckpointError, match="other training data: seed"):
        train(MODEL, _config(steps=4), other_task, tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(MODEL, _config(steps=4), TASK, tmp_path, progress=False)  # no resume: refuse to overwrite
    assert _snapshot(tmp_path) == before
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(MODEL, _config(steps=4), TASK, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_reads_raw_ids(tmp_path, dtype):
    high = 70_000 if dtype == "uint32" else 60_000  # uint32 ids beyond uint16's range
    tokens = np.random.default_rng(0).integers(0, high, size=500).astype(dtype)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    source = TokenFile(path, seq_len=16, dtype=dtype, eval_fraction=0.2)
    assert source.vocab_size == int(tokens.max()) + 1
    ids, targets = source.batch(3, 0)
    assert ids.shape == targets.shape == (3, 16) and ids.dtype == torch.int64
    for row_ids, row_targets in zip(ids.numpy(), targets.numpy()):
        (start,) = [s for s in range(len(tokens) - 16) if (tokens[s : s + 16] == row_ids).all()][:1]
        assert start + 17 <= 400  # train windows stay inside the first 80%
        assert (tokens[start + 1 : start + 17] == row_targets).all()  # targets = inputs shifted by one
    eval_ids, _ = source.batch(2, 0, split="eval")
    assert all(any((tokens[s : s + 16] == r).all() for s in range(400, 484)) for r in eval_ids.numpy())
    torch.testing.assert_close(
        source.batch(3, 5)[0], source.batch(3, 5)[0]
    )  # a batch is a function of its index


def test_token_file_text_and_errors(tmp_path):
    text = "héllo wörld, " * 20
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    source = TokenFile(path, seq_len=8, dtype="bytes")
    ids, _ = source.batch(2, 0)
    assert source.vocab_size == 256 and decode_bytes(encode_bytes(text)) == text
    assert bytes(ids[0].tolist()) in text.encode("utf-8")
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a whole number of uint16 tokens"):
        TokenFile(tmp_path / "odd.bin", seq_len=2, dtype="uint16")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenFile(path, seq_len=1000, dtype="bytes")


def test_mqar_batch_layout():
    ids, targets = TASK.batch(5, 0)
    N, Q = TASK.num_pairs, TASK.num_queries
    assert ids.shape == (5, TASK.seq_len) and int(ids.max()) < TASK.vocab_size
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        pairs = dict(zip(row[0 : 2 * N : 2], row[1 : 2 * N : 2]))
        assert len(pairs) == N  # distinct keys
        for j in range(Q):
            key, value = row[2 * N + 2 * j], row[2 * N + 2 * j + 1]
            assert pairs[key] == value == tgt[2 * N + 2 * j]
        assert sum(t != IGNORE_INDEX for t in tgt) == Q


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_train_cli_help_and_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--preset",
        "--config",
        "--data",
        "--token-dtype",
        "--resume",
        "--no-compile",
        "--compile-backend",
    ):
        assert option in out
    (tmp_path / "model.json").write_text(MODEL.to_json())
    args = [
        "train",
        "--config",
        str(tmp_path / "model.json"),
        "--mqar-pairs",
        "4",
        "--mqar-vocab",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "2",
        "--no-compile",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert cli.main(args) == 0
    assert "trained steps 0..3" in capsys.readouterr().out
    saved = json.loads((latest_checkpoint(tmp_path / "run") / "trainer.json").read_text())
    assert saved["step"] == 3 and saved["data"]["num_pairs"] == 4
    assert cli.main(args) == 2  # same --out without --resume: refused
    assert "already holds checkpoints" in capsys.readouterr().err
    assert (
        cli.main([*args[: args.index("--steps") + 1], "5", *args[args.index("--steps") + 2 :], "--resume"])
        == 0
    )
    assert "trained steps 3..5" in capsys.readouterr().out
