"""Running under ``torchrun``: one process per GPU (or CPU worker), PyTorch's own
``torch.distributed`` underneath. Nothing here starts processes; ``torchrun`` does.

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) every helper is a
no-op for a single process, so the same code runs both ways.

Example (two CPU processes on one machine, gloo chosen automatically)::

    torchrun --nproc_per_node=2 -m lsr train DATA --out RUN
"""
from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor


class Context(NamedTuple):
    rank: int
    world: int
    device: torch.device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: "str | torch.device | None" = None) -> "torch.device":
    """``None`` or ``auto``: a GPU when there is one, else the CPU; otherwise ``device``.
    A device name torch does not know is a clear error naming it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, ...): {e}") from None


def context(device: str | torch.device | None = None) -> Context:
    """Join the process group ``torchrun`` set up (once) and return this process's place.

    The backend is NCCL when this process uses a GPU, gloo otherwise. Collectives time out
    after ``LSR_DIST_TIMEOUT`` seconds (default 600), so a rank that dies never leaves the
    others waiting for ever (``torchrun`` also stops the job when one worker fails).
    """

    if not launched():
        return Context(0, 1, resolve_device(device))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("LSR_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return Context(dist.get_rank(), dist.get_world_size(), dev)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (in place; returned for convenience). Identity in one process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]
    return obj


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate equal-shaped-but-for-dim-0 tensors from every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]]))
    cap = int(max(s.item() for s in sizes))
    padded = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard(global_batch: Tensor, ctx: Context) -> Tensor:
    """This rank's contiguous part of a global batch of indices (rank order = batch order)."""
    if not ctx.enabled:
        return global_batch
    return torch.tensor_split(global_batch, ctx.world)[ctx.rank]


def sync_check_enabled() -> bool:
    """``LSR_CHECK_SYNC=1``: verify after every training step that all ranks hold the same
    weights and codebook (a debugging and test aid; one small all-gather per step)."""
    return launched() and os.environ.get("LSR_CHECK_SYNC") == "1"


def assert_in_sync(module: torch.nn.Module, where: str) -> None:
    """Raise if any rank's parameters or buffers differ from rank 0's, bit for bit: every
    tensor's bytes are hashed (sha256, the first 8 bytes compared), so a permutation, -0.0
    for 0.0 or changes that keep a sum are seen too."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    import hashlib

    state = module.state_dict()
    with torch.no_grad():
        digests = torch.tensor([int.from_bytes(hashlib.sha256(
            t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).digest()[:8],
            "little", signed=True) for t in state.values()], dtype=torch.int64)
    parts = [torch.empty_like(digests) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, digests)
    for r, p in enumerate(parts[1:], start=1):
        if not torch.equal(p, parts[0]):
            names = [k for k, a, b in zip(state, parts[0], p) if a != b]
            raise RuntimeError(f"ranks out of sync at {where}: rank {r} differs from rank 0 in {names[:5]}")


def shutdown() -> None:
    """Leave the process group cleanly (all ranks wait for each other first), so no rank
    tears down its connections while another still uses them."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
