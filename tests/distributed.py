"""Run a function on N gloo ranks in-process (torch.multiprocessing spawn), collect return values."""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, fn: Callable, args: tuple, tmp: str, use_deepspeed: bool) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=open(os.path.join(tmp, "port")).read())
    torch.set_num_threads(1)
    try:
        if use_deepspeed:
            import deepspeed

            from megaclone.cluster import skip_deepspeed_shm_op

            skip_deepspeed_shm_op()
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        else:
            dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        out = ("ok", result)
    except BaseException as e:  # report the failure to the parent instead of hanging
        out = ("error", f"rank {rank}: {e!r}\n{traceback.format_exc()}")
    with open(os.path.join(tmp, f"result{rank}.pkl"), "wb") as f:
        pickle.dump(out, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn: Callable, world_size: int, *args: Any, use_deepspeed: bool = False) -> list[Any]:
    """Call `fn(rank, world_size, *args)` on `world_size` gloo ranks; return each rank's result.

    `fn` must be importable (a module-level function in a test module). Results must be picklable.
    """
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "port"), "w") as f:
            f.write(str(_free_port()))
        mp.start_processes(_worker, args=(world_size, fn, args, tmp, use_deepspeed), nprocs=world_size,
                           start_method="spawn", join=True)
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"result{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(value)
            results.append(value)
        return results
