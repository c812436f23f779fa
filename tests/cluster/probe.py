"""Started by test_process_groups.py under torchrun, DeepSpeed's launcher, or as bare Slurm tasks: set the process
group up the way launch/pretrain.py does, and write what this rank found (or hang, to play a dead node)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaclone import cluster  # noqa: E402


def main() -> None:
    out = Path(os.environ["PROBE_OUT"])
    env = cluster.detect_cluster_env()
    with cluster.exit_on_peer_failure(env, os.environ.get("PROBE_CKPT", "")):  # as launch/pretrain.py does
        cluster.init_process_group(env)
    report = cluster.build_cluster_report(cluster.gather_placement(env), env.launcher,
                                          int(os.environ.get("PROBE_TP", "1")), 1)
    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    torch_env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    from deepspeed.comm import comm as ds_comm

    record = {"env": asdict(env), "report": report.to_dict(), "lines": report.lines(), "rank_sum": total.item(),
              "torch_env": torch_env, "backend": dist.get_backend(),
              "shm_op_loaded": ds_comm.cdb.shm_comm_op is not None,
              "shm_buffers": sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_*_{env.master_port}_*"))}
    (out / f"rank{env.rank}.json").write_text(json.dumps(record))
    hang = os.environ.get("PROBE_HANG_RANK")
    if hang is not None:
        if env.rank == int(hang):  # a hung node: alive, holding its sockets, never answering
            time.sleep(300)
            os._exit(0)
        with cluster.exit_on_peer_failure(env, os.environ.get("PROBE_CKPT", "")):
            dist.all_reduce(total)
        raise AssertionError("all_reduce with a hung peer returned")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
