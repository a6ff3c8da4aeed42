"""Data-parallel training with mx.distributed: process group, gradient sums, rank-0 files."""

import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

# mlx.launch sets MLX_RANK for every backend (ring, nccl, jaccl); mpirun sets OMPI_COMM_WORLD_RANK.
_LAUNCH_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "MLX_HOSTFILE", "MLX_JACCL_COORDINATOR")


class DistributedError(RuntimeError):
    """The process was launched as part of a group, but the group could not start."""


def init_distributed() -> Optional[mx.distributed.Group]:
    """The process group when started by mlx.launch or mpirun, else None (one process)."""
    if not any(k in os.environ for k in _LAUNCH_VARIABLES):
        return None
    world = mx.distributed.init()
    rank = int(os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if world.size() == 1 and rank > 0:  # init() falls back to one process when no backend starts
        raise DistributedError(
            f"launched as rank {rank}, but no distributed backend could start; "
            f"check the hosts, ports and --backend given to mlx.launch"
        )
    return world


def all_sum_tree(tree, world: Optional[mx.distributed.Group]):
    """Sum the arrays of `tree` (as float32) over the ranks of `world` in one all_sum: one message
    per step rather than one per LoRA tensor, which would be latency-bound."""
    if world is None or world.size() == 1:
        return tree
    leaves = tree_flatten(tree)
    flat = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in leaves])
    flat = mx.distributed.all_sum(flat, group=world)
    offsets = np.cumsum([0] + [v.size for _, v in leaves]).tolist()
    return tree_unflatten([(k, flat[o : o + v.size].reshape(v.shape)) for (k, v), o in zip(leaves, offsets)])


def read_on_rank0(path: Path, world) -> Optional[bytes]:
    """The bytes of rank 0's `path`, on every rank; None when rank 0 has no such file."""
    mine = path.read_bytes() if (world is None or world.rank() == 0) and path.is_file() else b""
    if world is None:
        return mine or None
    size = mx.distributed.all_sum(mx.array(len(mine)), group=world).item()
    if size == 0:
        return None
    buffer = np.frombuffer(mine, dtype=np.uint8) if mine else np.zeros(size, dtype=np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(buffer), group=world)))


def any_rank(flag: bool, world) -> bool:
    """True on every rank when `flag` is true on any: ranks must leave the loop at the same step."""
    if world is None:
        return flag
    return mx.distributed.all_sum(mx.array(int(flag)), group=world).item() > 0
