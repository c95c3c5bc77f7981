"""Training loop for MesaNetLM: AdamW, warmup + cosine, grad clipping, bf16 autocast on CUDA,
torch.compile, periodic eval, atomic checkpoints and resume.

    from mesa_compile.train import TrainConfig, train
    result = train(MesaConfig.from_preset("tiny"), TrainConfig(steps=200), MQARTask(), "runs/mqar")

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNN/`` holding ``model.safetensors`` (weights),
``optimizer.safetensors`` (AdamW moments and step counts, RNG states), ``config.json`` (the
MesaConfig) and ``trainer.json`` (step, train config, data description, param groups, SHA-256 of the
other files). It is written to a temporary folder and renamed into place (``os.replace``), so a
crash leaves either the whole checkpoint or none. Batches are a pure function of (seed, step)
(:mod:`mesa_compile.data`), so a resumed run repeats the uninterrupted run's batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mesa_compile.config import MesaConfig
from mesa_compile.data import IGNORE_INDEX, MQARTask, TokenFile, accuracy
from mesa_compile.model import MesaNetLM

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "resolve_backend",
    "resolve_device",
    "train",
]

CHECKPOINT_FORMAT = 1
_FILES = ("model.safetensors", "optimizer.safetensors", "config.json")

Source = Union[MQARTask, TokenFile]  # noqa: UP007 (a runtime alias: Python 3.10 needs Union)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or written for another model or data set."""


@dataclass
class TrainConfig:
    """Optimiser, schedule and bookkeeping of one training run."""

    steps: int = 1000  # optimiser steps in all (a resumed run continues up to this number)
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # peak learning rate (after warmup)
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decay of matrices (not of biases, norms or lambda)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    eval_every: int = 100  # eval loss every this many steps (0: only at the end)
    eval_batches: int = 4  # batches of the eval split per evaluation
    checkpoint_every: int = 100  # checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    compile: bool = True  # torch.compile the model
    compile_backend: str = (
        "auto"  # "auto": inductor on CUDA, aot_eager on CPU (see README); or a backend name
    )
    device: str = "auto"  # "auto": CUDA when present, else CPU
    seed: int = 0  # seed of the weight init

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "eval_batches", "keep_checkpoints"):
            if (
                isinstance(getattr(self, name), bool)
                or not isinstance(getattr(self, name), int)
                or getattr(self, name) < 1
            ):
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if (
                isinstance(getattr(self, name), bool)
                or not isinstance(getattr(self, name), int)
                or getattr(self, name) < 0
            ):
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not (
            self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0 and self.grad_clip >= 0
        ):
            raise ValueError(
                "TrainConfig needs lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, grad_clip >= 0"
            )


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    model: MesaNetLM  # the trained model (eager module; weights shared with the compiled one)
    start_step: int  # first step this call ran (> 0 after a resume)
    losses: list[float] = field(
        default_factory=list
    )  # training loss of steps start_step, start_step + 1, ...
    # {"step", "loss", "accuracy", "mean_cg_steps"} per evaluation
    evals: list[dict[str, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0  # training throughput after the first (compiling) step
    train_seconds: float = 0.0  # wall time of the training loop, the first step included
    checkpoint: Path | None = None  # the last checkpoint written


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_backend(name: str, device: torch.device) -> str:
    """ "auto" -> inductor on CUDA, aot_eager on CPU; anything else as given."""
    # NOTE: on 2 CPU cores Inductor took 78 s to compile one training step of a 1-layer d_model=128
    # model and then ran it slower than eager (1.4 s vs 0.08 s a step): aot_eager (8 s, 0.076 s a
    # step) traces the same whole graphs without generating code.
    if name == "auto":
        return "inductor" if device.type == "cuda" else "aot_eager"
    return name


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(
    model: MesaNetLM, source: Source, batch_size: int, batches: int, **overrides: Any
) -> dict[str, float]:
    """Mean loss, greedy accuracy (at target positions) and mean CG steps per token (over tokens,
    heads and layers) over ``batches`` eval batches.

    ``overrides`` (``cg_steps``, ``cg_tol``) go to the model's forward.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, correct, counted, steps = 0.0, 0, 0, 0.0
    for i in range(batches):
        ids, targets = (t.to(device) for t in source.batch(batch_size, i, split="eval"))
        logits, _, used = model(ids, return_cg_steps=True, **overrides)  # used: (n_layers, B, T, H)
        total += _loss(logits, targets).item()
        c, n = accuracy(logits, targets)
        correct, counted = correct + c, counted + n
        steps += used.float().mean().item()
    model.train(was_training)
    return {"loss": total / batches, "accuracy": correct / max(counted, 1), "mean_cg_steps": steps / batches}


# ---------------------------------------------------------------------- checkpoints
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest ``step-NNNNNN`` checkpoint folder under ``out_dir``, or None."""
    root = _checkpoint_root(Path(out_dir))
    found = (
        sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()) if root.is_dir() else []
    )
    return found[-1] if found else None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: MesaNetLM,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    source: Source,
    keep: int,
) -> Path:
    from safetensors.torch import save_file, save_model

    root = _checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_model(model, os.fspath(tmp / "model.safetensors"))
        state = optimizer.state_dict()
        tensors = {
            f"state.{i}.{k}": v.detach().cpu().contiguous()
            for i, s in state["state"].items()
            for k, v in s.items()
        }
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, os.fspath(tmp / "optimizer.safetensors"))
        (tmp / "config.json").write_text(model.config.to_json() + "\n")
        trainer = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "train_config": dataclasses.asdict(config),
            "data": source.describe(),
            "param_groups": state["param_groups"],
            "sha256": {name: _sha256(tmp / name) for name in _FILES},
        }
        _write_json(tmp / "trainer.json", trainer)
        for name in (*_FILES, "trainer.json"):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)  # raises if a checkpoint of this step exists: never overwritten
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint folder; raises :class:`CheckpointError` naming what is wrong.

    Returns {"step", "model_config" (MesaConfig), "train_config" (dict), "data" (dict),
    "param_groups", "model_path", "optimizer_tensors" (dict of tensors)}.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        trainer = json.loads((path / "trainer.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: cannot read trainer.json ({err})") from err
    if not isinstance(trainer, dict) or trainer.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: trainer.json is not a format-{CHECKPOINT_FORMAT} mesa-compile checkpoint"
        )
    for name in _FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if _sha256(path / name) != trainer.get("sha256", {}).get(name):
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt (its SHA-256 differs from trainer.json's)"
            )
    try:
        model_config = MesaConfig.from_json((path / "config.json").read_text())
        tensors = load_file(os.fspath(path / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as err:  # safetensors raises its own errors as these
        raise CheckpointError(f"checkpoint {path}: cannot load ({err})") from err
    return {
        "step": int(trainer["step"]),
        "model_config": model_config,
        "train_config": trainer["train_config"],
        "data": trainer["data"],
        "param_groups": trainer["param_groups"],
        "model_path": path / "model.safetensors",
        "optimizer_tensors": tensors,
    }


def _config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [
        f"{k}: checkpoint {a.get(k)!r}, this run {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _restore(
    ckpt: dict[str, Any], model: MesaNetLM, optimizer: torch.optim.Optimizer, source: Source, where: Path
) -> int:
    from safetensors.torch import load_model

    diff = _config_diff(ckpt["model_config"].to_dict(), model.config.to_dict())
    if diff:
        raise CheckpointError(f"checkpoint {where} was written for another model config: " + "; ".join(diff))
    diff = _config_diff(ckpt["data"], source.describe())
    if diff:
        raise CheckpointError(f"checkpoint {where} was written for other training data: " + "; ".join(diff))
    tensors = ckpt["optimizer_tensors"]
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    try:
        load_model(model, os.fspath(ckpt["model_path"]), strict=True)
        optimizer.load_state_dict({"state": state, "param_groups": ckpt["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {where}: weights or optimizer state do not fit the model ({err})"
        ) from err
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return ckpt["step"]


# ---------------------------------------------------------------------- the loop
def _optimizer(model: MesaNetLM, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        # NOTE: the regulariser lambda (lambda_theta) is a per-head, per-dimension scale, not a weight
        # matrix: decaying it would pull lambda towards softplus(0) + floor regardless of the data.
        (decay if param.dim() >= 2 and "lambda_theta" not in name else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device.type == "cuda")


def train(
    model_config: MesaConfig,
    config: TrainConfig,
    source: Source,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a MesaNetLM on ``source`` for ``config.steps`` steps, checkpointing under ``out_dir``.

    resume: continue from the newest checkpoint in ``out_dir`` (which must exist and match
    ``model_config`` and ``source``). Without it, an ``out_dir`` that already holds checkpoints is
    refused, so a run never overwrites another's. Any checkpoint problem raises
    :class:`CheckpointError` before anything is written. on_step(step, loss) runs after each step.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    if source.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the data uses {source.vocab_size} token ids "
            f"but the model's vocab_size is {model_config.vocab_size}"
        )
    last = latest_checkpoint(out_dir)
    if resume and last is None:
        raise CheckpointError(f"--resume: no checkpoint under {_checkpoint_root(out_dir)}")
    if not resume and last is not None:
        raise CheckpointError(
            f"{out_dir} already holds checkpoints (newest {last.name}); "
            "resume from them or pick another output folder"
        )
    ckpt = load_checkpoint(last) if resume else None

    torch.manual_seed(config.seed)
    model = MesaNetLM(model_config).to(device)
    optimizer = _optimizer(model, config, device)
    start = _restore(ckpt, model, optimizer, source, last) if ckpt is not None else 0
    model.train()
    backend = resolve_backend(config.compile_backend, device)
    forward = torch.compile(model, backend=backend) if config.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    result = TrainResult(model=model, start_step=start)
    bar = tqdm(
        total=config.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    t_start, t_warm, warm_tokens = time.perf_counter(), None, 0
    for step in range(start, config.steps):
        ids, targets = (t.to(device, non_blocking=True) for t in source.batch(config.batch_size, step))
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            logits, _ = forward(ids)
        loss = _loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        result.losses.append(loss_value)
        if t_warm is None:
            t_warm = time.perf_counter()  # throughput excludes the first (compiling) step
        else:
            warm_tokens += ids.numel()
            result.tokens_per_s = warm_tokens / (time.perf_counter() - t_warm)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}", tok_s=f"{result.tokens_per_s:,.0f}")
        done = step + 1
        if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
            metrics = evaluate(model, source, config.batch_size, config.eval_batches)
            result.evals.append({"step": done, **metrics})
            bar.write(f"step {done}: eval loss {metrics['loss']:.4f}, accuracy {metrics['accuracy']:.3f}")
        if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
            result.checkpoint = _save_checkpoint(
                out_dir, done, model, optimizer, config, source, config.keep_checkpoints
            )
        if on_step is not None:
            on_step(step, loss_value)
    bar.close()
    result.train_seconds = time.perf_counter() - t_start
    return result
