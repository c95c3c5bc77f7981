"""CLI smoke tests: `mesa-compile --help`, usage errors, and `mesa-compile doctor` on this machine."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from mesa_compile import cli, doctor

README = Path(__file__).resolve().parents[1] / "README.md"


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesa_compile.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_console_script_points_at_main():
    (script,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "mesa-compile"]
    assert script.value == "mesa_compile.cli:main"
    assert script.load() is cli.main


def test_help_lists_every_subcommand():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for sub in cli.SUBCOMMANDS:
        assert sub.name in result.stdout


@pytest.mark.parametrize("name", [sub.name for sub in cli.SUBCOMMANDS])
def test_subcommand_help_exits_0(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"mesa-compile {name}" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["no-such-command"], [], ["doctor", "--no-such-option"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: mesa-compile" in capsys.readouterr().err


def _check_names(backends: dict[str, str]) -> list[str]:
    names = []
    for device, impl in (("cpu", "aten"), ("cuda", "triton")):
        for label in (
            f"mesa_net {device} ({impl})",
            f"mesa_net_step {device} ({impl})",
            f"torch.compile(mesa_net, fullgraph, {backends[device]}) {device}",
        ):
            names += [f"{label} {part}" for part in doctor.PARTS]
    return names


@pytest.mark.slow  # ~30 s on 2 CPU cores, most of it tracing the compiled forward and backward
def test_doctor_passes_on_this_machine():
    result = _run_cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for name in _check_names(doctor.DEFAULT_COMPILE_BACKEND):
        (row,) = [line for line in lines if line.startswith(name + " ")]
        if not torch.cuda.is_available() and " cuda" in name:
            assert "skipped (no CUDA device)" in row
        else:
            assert " ok " in row, row
    for component in ("python", "torch", "cuda", "triton", "TRITON_INTERPRET", "onnxruntime providers"):
        assert any(line.startswith(component + " ") for line in lines), component


def test_doctor_exits_1_when_a_check_fails(monkeypatch, capsys):
    # Zero tolerance: every check that runs must be reported as failed, and the exit status says so.
    monkeypatch.setattr(doctor, "TOLERANCES", {"cpu": (0.0, 0.0), "cuda": (0.0, 0.0)})
    assert cli.main(["doctor", "--no-compile"]) == 1
    out = capsys.readouterr().out
    assert "mesa_net cpu (aten) forward" in out
    assert "skipped (--no-compile)" in out
    assert "FAILED: mesa_net cpu (aten) forward" in out


def test_readme_usage_lines_match_the_parser(capsys):
    names = [sub.name for sub in cli.SUBCOMMANDS]
    documented = re.findall(rf"^mesa-compile (?:{'|'.join(names)})\b.*$", README.read_text(), re.MULTILINE)
    assert any(line.startswith("mesa-compile doctor ") for line in documented)
    for line in documented:
        with pytest.raises(SystemExit):
            cli.main([line.split()[1], "--help"])
        usage = capsys.readouterr().out.split("\n\n")[0]  # "usage: mesa-compile NAME ...", maybe wrapped
        assert " ".join(usage.split()[1:]) == line


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)[:3]
    assert len(blocks) == 3, "README: ops, model and export examples"
    monkeypatch.chdir(tmp_path)  # the export example writes decode.onnx
    ops_example, model_example = {}, {}
    exec(compile(blocks[0], "README.md (ops example)", "exec"), ops_example)
    exec(compile(blocks[1], "README.md (model example)", "exec"), model_example)
    exec(compile(blocks[2], "README.md (export example)", "exec"), model_example)  # uses the model
    o, ref, steps = ops_example["o"], ops_example["ref"], ops_example["steps"]
    assert o.shape == ref.shape == (2, 50, 2, 8) and steps.dtype == torch.int32
    # cg_tol=1e-4 stops each token once its residual fell by 1e-4: o stays within 1e-3 of the exact solve.
    assert ((o - ref).norm() / ref.norm()).item() < 1e-3
    assert ops_example["o_next"].shape == (2, 2, 8)
    assert model_example["logits"].shape == (2, 16, 256) and model_example["out"].shape == (2, 20)
    assert model_example["next_logits"].shape == (2, 256)
    # onnxruntime's greedy tokens equal torch's (the comment in the README says so)
    assert (torch.as_tensor(model_example["tokens"]) == model_example["out"]).all()
