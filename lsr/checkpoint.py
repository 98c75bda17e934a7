"""Weights and training state as safetensors + JSON; nothing is ever unpickled.

A run folder holds ``config.json`` (a :class:`lsr.config.RunConfig`),
``vqvae.safetensors`` and ``prior.safetensors``; ``checkpoints/`` holds the state to
resume training (weights, optimiser moments, RNG state, epoch) in the same formats.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_save, read_json, write_json

FORMAT_VERSION = 1


def save_weights(path: str | os.PathLike, module_or_state: nn.Module | dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save a module's state dict (or a dict of tensors) as safetensors, atomically."""
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": "lsr", "format_version": str(FORMAT_VERSION), **(metadata or {})}
    atomic_save(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or damaged file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_into(module: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    state = load_weights(path, device)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model in config.json ({e})") from None


def save_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, info: dict[str, Any]) -> None:
    """Everything needed to resume a training stage: ``<path>.safetensors`` (tensors) and
    ``<path>.json`` (scalars). The JSON is written last and names the epoch, so a crash
    between the two writes leaves the previous, consistent pair readable."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for name, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = val
            else:
                scalars.setdefault(str(pid), {})[name] = val
    tensors["rng"] = generator.get_state()
    stamp = f"{info.get('epoch', 0)}"
    save_weights(path.with_suffix(".safetensors"), tensors, {"stamp": stamp})
    write_json(path.with_suffix(".json"), {"stamp": stamp, "info": info,
                                           "param_groups": opt["param_groups"], "opt_scalars": scalars})


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict[str, Any] | None:
    """Restore what :func:`save_training_state` wrote; None if there is nothing to resume."""
    path = Path(path)
    jpath, tpath = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not jpath.is_file() or not tpath.is_file():
        return None
    meta = read_json(jpath)
    tensors = load_weights(tpath)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in meta.get("opt_scalars", {}).items():
        state.setdefault(int(pid), {}).update(d)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    generator.set_state(tensors["rng"])
    return meta["info"]
