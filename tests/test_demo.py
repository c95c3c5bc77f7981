"""`mesa-compile demo --quick` end to end (train, sweeps, ONNX export + onnxruntime, plot, summary)."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from mesa_compile import cli, demo


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--out",
        "--quick",
        "--steps",
        "--threads",
        "--no-compile",
        "--compile-backend",
        "--no-plot",
        "--no-export",
    ):
        assert option in out


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    # ~20 s on 2 CPU cores: 12 compiled (aot_eager) training steps, the sweeps, one decode-graph export.
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo's one CPU thread is restored afterwards
    printed = capsys.readouterr().out
    assert "greedy tokens equal: True" in printed and "total" in printed
    assert (out / "accuracy_vs_cg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["evaluation"]
    assert [r["cg_steps"] for r in ev["fixed_steps"]] == list(demo.FIXED_STEPS)
    assert [r["cg_tol"] for r in ev["tolerance"]] == list(demo.TOLERANCES)
    means = [r["mean_cg_steps"] for r in ev["tolerance"]]
    # Tighter tolerances never stop earlier, and never exceed the bound.
    assert all(a <= b for a, b in itertools.pairwise(means)) and 0 < means[0] and means[-1] <= demo.MAX_STEPS
    onnx = summary["onnx"]
    assert onnx["greedy_tokens_equal"] and onnx["greedy_tokens_compared"] > 0
    # Same algorithm in fp32 on both sides; early exit may stop a token one CG step apart (bound: 1e-2).
    assert onnx["max_abs_logit_diff"] < 1e-2
    assert summary["training"]["compile_backend"] == "aot_eager" and summary["training"]["threads"] == 1
    fixed = {r["cg_steps"]: r["mean_cg_steps"] for r in ev["fixed_steps"]}
    # The telemetry counts the fixed budget; converged tokens stop early on the breakdown guard.
    assert fixed[0] == 0 and all(s / 2 < used <= s for s, used in fixed.items() if s)
    assert set(summary["stage_seconds"]) == {"train", "evaluate", "export + onnxruntime", "plot"}
    assert (out / "model.safetensors").is_file() and (out / "decode.onnx").is_file()


def test_demo_reports_a_missing_optional_stack(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-export"]) == 2
    assert "pip install 'mesa-compile[plot]'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before any work


def test_demo_rejects_a_bad_thread_count(tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--threads", "0", "--no-export"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # failed before any work
