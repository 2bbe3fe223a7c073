"""Data-parallel training under torchrun: which process this is, and the few collectives the loop needs.

    torchrun --standalone --nproc-per-node 2 -m mnistlab train --dataset fashion-mnist

torchrun starts the processes and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each;
without them (plain `mnistlab train`) this is a world of one process and every function here is a no-op.
The design, after PyTorch's DDP tutorial and torchvision's reference scripts:

- gloo on the CPU, nccl on CUDA; LOCAL_RANK picks the GPU.
- `--batch-size` is the global batch: every rank draws the same seeded epoch permutation and takes its
  contiguous share of each step's indices (`shard`; shares differ by at most one image, the last uneven
  batch included, and nothing is repeated). DDP averages gradients over ranks, so each rank's loss is
  weighted by its share (training.py) to make the step the one-process step on the same global batch.
- Only rank 0 prints and writes the run folder (run.py's `note`/`say` ask `is_main`); the others follow
  it, waiting at a barrier where it writes.
- Process-group timeout: MNISTLAB_DIST_TIMEOUT seconds (default 600), so that a lost peer ends the run
  with an error instead of a hang.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from mnistlab.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None  # None: one process, no process group

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()


def world() -> World:
    return _WORLD


def is_main() -> bool:
    """Rank 0: the process that prints and writes."""
    return _WORLD.rank == 0


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} in the environment is not an integer (set by torchrun?)") from None


def restart_count() -> int:
    """How many times torchrun's agent has restarted this group (0 on the first attempt or without torchrun)."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0) or 0


def may_restart() -> bool:
    """torchrun was started with --max-restarts > 0: a failed group comes back with the same arguments."""
    return (_env_int("TORCHELASTIC_MAX_RESTARTS", 0) or 0) > 0


def start(device: str) -> tuple[World, str]:
    """Join torchrun's process group when WORLD_SIZE > 1; returns the world and the device to train on
    (`device` itself, or cuda:LOCAL_RANK under CUDA)."""
    global _WORLD
    size = _env_int("WORLD_SIZE", 1) or 1
    if size == 1:
        _WORLD = World()
        return _WORLD, device
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or local_rank is None or "MASTER_ADDR" not in os.environ:
        raise UserError(f"WORLD_SIZE={size} but RANK, LOCAL_RANK or MASTER_ADDR is not set: start distributed "
                        "runs with torchrun (torchrun --nproc-per-node N -m mnistlab train ...)")
    if device == "mps":
        raise UserError("--device mps: distributed training runs on cpu (gloo) or cuda (nccl)")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (try --device cpu)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank}, but this node has {torch.cuda.device_count()} GPU(s): "
                            "--nproc-per-node must not exceed them")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    # nccl moves only CUDA tensors: the few small CPU tensors (main_first's flag, share_text's bytes) go by gloo
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    timeout = timedelta(seconds=_env_int("MNISTLAB_DIST_TIMEOUT", 600) or 600)
    try:
        # torchrun's store outlives a restart of the group: the keys of each attempt under their own prefix, or
        # a restarted rank can read the address a dead one published and fail to connect to it
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"mnistlab/attempt_{restart_count()}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"could not join the process group ({backend}): "
                        f"{str(e).strip().splitlines()[0][:200]}") from None
    _WORLD = World(rank=rank, local_rank=local_rank, size=size, backend="nccl" if cuda else "gloo")
    return _WORLD, device


def stop(finished: bool = True) -> None:
    """Leave the process group at the end of a run. A finished rank first waits for the others: gloo aborts a
    process that tears its group down while a peer still talks to it."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        # the DDP wrapper the caller dropped holds the group: free it now, while the interpreter is whole
        # (gloo's threads freeing tensors during interpreter shutdown abort the process)
        gc.collect()
        dist.destroy_process_group()
    _WORLD = World()


def barrier() -> None:
    if _WORLD.distributed:
        dist.barrier()


def main_first(on_main: Callable[[], T], on_others: Callable[[], T] | None = None) -> T:
    """Rank 0 runs `on_main` (download the data, create the run folder) while the others wait; then they run
    `on_others` (default: the same). A failure on rank 0 ends the others with one line instead of a hang."""
    if not _WORLD.distributed:
        return on_main()
    failed = torch.zeros(1)
    result = None
    if is_main():
        try:
            result = on_main()
        except BaseException:
            dist.broadcast(failed.fill_(1.0), 0)
            raise
    dist.broadcast(failed, 0)
    if not is_main():
        if failed.item():
            raise UserError("stopping: rank 0 failed (its message says why)")
        result = (on_others or on_main)()
    return result


def share_text(text: str | None) -> str:
    """Rank 0's `text` on every rank (a run folder's path): UTF-8 bytes in a tensor, no pickling."""
    if not _WORLD.distributed:
        return text or ""
    data = torch.tensor(list((text or "").encode()), dtype=torch.uint8) if is_main() else None
    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(length, 0)
    if data is None:
        data = torch.zeros(int(length.item()), dtype=torch.uint8)
    dist.broadcast(data, 0)
    return bytes(data.tolist()).decode()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (in place, and returned); `t` itself in one process."""
    if _WORLD.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global batch of indices (N,) -> (N / size,): shares differ by at
    most one, in rank order, and together they are `idx`, each index once."""
    if not _WORLD.distributed:
        return idx
    return idx.tensor_split(_WORLD.size)[_WORLD.rank]


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: before evaluating, so that every rank
    evaluates the model rank 0 saves. DDP broadcasts them at each training forward; the last step's update
    differs per rank."""
    if _WORLD.distributed:
        for b in model.buffers():
            dist.broadcast(b, 0)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model DistributedDataParallel trains (the bare model in one process). DDP averages gradients over
    ranks in buckets during backward and starts every rank from rank 0's weights."""
    if not _WORLD.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # A conv weight over 1 input channel, (C, 1, k, k) in channels-last, and its gradient differ in strides only
    # along the size-1 dimension, where a stride addresses nothing: the same memory order, so DDP's warning that
    # they "do not match" is noise here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)

