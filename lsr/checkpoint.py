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

from .io import atomic_save, plain_name, read_json, write_json

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


def check_finite(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """A weights file with NaN or infinite values is damaged: an error naming the tensor."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf); the "
                             f"weights are damaged: retrain, or restore the file")


def load_into(module: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    state = load_weights(path, device)
    check_finite(state, path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the model in config.json ({e})") from None


def save_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, info: dict[str, Any]) -> None:
    """Everything needed to resume a training stage: tensors (weights, optimiser moments,
    RNG state) in ``<path>.<n>.safetensors`` and scalars in ``<path>.json``.

    The JSON is the commit point: it is replaced (atomically) only after the new tensor
    file is complete, and it names that file; the older tensor file is removed after.
    A crash at any moment leaves a consistent pair to resume from.
    """
    path = Path(path)
    jpath = path.with_suffix(".json")
    prev = read_json(jpath) if jpath.is_file() else {}
    old = prev.get("tensors")
    serial = int(prev.get("serial", -1)) + 1
    tname = f"{path.name}.{serial}.safetensors"
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
    save_weights(path.parent / tname, tensors, {"serial": str(serial)})
    write_json(jpath, {"serial": serial, "tensors": tname, "info": info,
                       "param_groups": opt["param_groups"], "opt_scalars": scalars})
    if old and old != tname:
        (path.parent / old).unlink(missing_ok=True)


def load_training_state(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict[str, Any] | None:
    """Restore what :func:`save_training_state` wrote; None if there is nothing to resume."""
    path = Path(path)
    jpath = path.with_suffix(".json")
    if not jpath.is_file():
        return None
    meta = read_json(jpath)
    if (not isinstance(meta, dict) or not isinstance(meta.get("info"), dict)
            or not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("opt_scalars", {}), dict)):
        raise ValueError(f"{jpath}: damaged training state (expected the fields tensors, info, param_groups); "
                         f"delete the checkpoints folder to train afresh, or pass --overwrite")
    tpath = plain_name(meta.get("tensors"), path.parent, f"{jpath}: tensors")
    tensors = load_weights(tpath)
    check_finite(tensors, tpath)
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{tpath}: training state does not match the model in config.json ({e})") from None
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
