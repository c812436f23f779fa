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


def groups_as_training_makes_them(record: Path) -> dist.ProcessGroup:
    """megaclone's layout groups (PP 2 over the 2 ranks) and DeepSpeed's pipeline grid, made after the default group;
    writes every group's timeout to `record` and returns the layout's pipeline group."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology
    from torch.distributed import distributed_c10d

    from megaclone.config import ParallelConfig
    from megaclone.parallel import build_layout

    layout = build_layout(ParallelConfig(tp_size=1, pp_size=2, zero_stage=1))
    PipelineParallelGrid(topology=PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=1))
    timeouts = [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                for pg in distributed_c10d._world.pg_map]
    record.write_text(json.dumps(timeouts))
    return layout.pp_group


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
        group = groups_as_training_makes_them(out / f"groups{env.rank}.json")
        if env.rank == int(hang):  # a hung node: alive, holding its sockets, never answering
            time.sleep(300)
            os._exit(0)
        with cluster.exit_on_peer_failure(env, os.environ.get("PROBE_CKPT", "")):
            dist.all_reduce(total, group=group)
        raise AssertionError("all_reduce with a hung peer returned")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
