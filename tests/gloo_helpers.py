"""Multi-process CPU tests: a free loopback port, and ``spawn_gloo(fn, world, *args)`` running
``fn(rank, world, *args)`` in ``world`` processes joined in one gloo process group."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, *args) -> None:
    """``fn`` must be a module-level function (spawned processes import it by name)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
