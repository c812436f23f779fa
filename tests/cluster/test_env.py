"""Environment detection: the same `ClusterEnv` from DeepSpeed's launcher, torchrun and Slurm's variables, and
clear errors (naming the variable) for incomplete ones."""

from __future__ import annotations

from datetime import timedelta

import pytest

from megaclone.cluster import (
    COLLECTIVE_TIMEOUT_ENV,
    ClusterEnv,
    ClusterEnvError,
    collective_timeout,
    detect_cluster_env,
    expand_hostlist,
    export_cluster_env,
    parse_tasks_per_node,
    slurm_master_port,
)

# What DeepSpeed's launch.py exports for the third process of node 1 in a 2 x 4 job (launch.py: RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_*, CROSS_RANK, CROSS_SIZE, LOCAL_SIZE); srun's variables are inherited from the node's task.
DEEPSPEED = {"RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
             "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "4", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}
TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "node-a", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
SLURM = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "5",
         "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_TASKS_PER_NODE": "8(x2)",
         "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}


def test_deepspeed_launcher_wins_over_inherited_slurm_variables() -> None:
    env = detect_cluster_env(DEEPSPEED)
    assert env == ClusterEnv("deepspeed", rank=6, world_size=8, local_rank=2, local_world_size=4,
                             master_addr="10.0.0.1", master_port=29500, node_rank=1, num_nodes=2)


def test_torchrun() -> None:
    env = detect_cluster_env(TORCHRUN)
    assert (env.launcher, env.rank, env.local_rank, env.local_world_size, env.node_rank, env.num_nodes) == \
        ("torchrun", 5, 1, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("node-a", 1234)


def test_plain_torch_variables_leave_the_node_unknown() -> None:
    env = detect_cluster_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "5"})
    assert (env.launcher, env.rank, env.local_rank, env.node_rank, env.num_nodes) == ("env", 1, 0, None, None)


def test_slurm_tasks_one_per_gpu() -> None:
    env = detect_cluster_env(SLURM)
    assert env == ClusterEnv("slurm", rank=13, world_size=16, local_rank=5, local_world_size=8, master_addr="gpu07",
                             master_port=slurm_master_port(123456), node_rank=1, num_nodes=2)
    assert env.master_port == 20000 + 123456 % 20000
    # An explicit MASTER_ADDR / MASTER_PORT (e.g. exported by the batch script) wins over the derived ones.
    env = detect_cluster_env({**SLURM, "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("10.1.1.1", 4000)


def test_slurm_uneven_tasks_per_node() -> None:
    env = detect_cluster_env({**SLURM, "SLURM_STEP_NUM_TASKS": "11", "SLURM_PROCID": "10", "SLURM_LOCALID": "2",
                              "SLURM_STEP_TASKS_PER_NODE": "8,3"})
    assert (env.world_size, env.local_world_size, env.node_rank) == (11, 3, 1)


def test_nothing_set_means_one_process() -> None:
    env = detect_cluster_env({})
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("single", 0, 1, "127.0.0.1")
    assert 0 < env.master_port < 65536


@pytest.mark.parametrize("environ, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK='x'"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2 outside world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu[07-", "SLURM_JOB_NODELIST": ""}, "malformed Slurm host list"),
    ({**SLURM, "SLURM_NODEID": "2", "SLURM_STEP_NUM_NODES": "3"}, "SLURM_NODEID=2"),
    ({k: v for k, v in SLURM.items() if "NODELIST" not in k}, "MASTER_ADDR nor SLURM_NODELIST"),
])
def test_incomplete_environments_name_the_variable(environ: dict, message: str) -> None:
    with pytest.raises(ClusterEnvError, match=message.replace("[", r"\[").replace("(", r"\(")):
        detect_cluster_env(environ)


def test_expand_hostlist() -> None:
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("rack[1-2]-n[8-9]") == ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"]
    assert expand_hostlist("a[098-101]") == ["a098", "a099", "a100", "a101"]  # padding kept, then outgrown
    assert expand_hostlist("single") == ["single"]
    for bad in ("gpu[3-1]", "gpu[a-b]", "gpu]1[", ""):
        with pytest.raises(ClusterEnvError):
            expand_hostlist(bad)


def test_parse_tasks_per_node() -> None:
    assert parse_tasks_per_node("8(x2),4") == [8, 8, 4]
    assert parse_tasks_per_node("2") == [2]
    with pytest.raises(ClusterEnvError, match="SLURM_TASKS_PER_NODE"):
        parse_tasks_per_node("8(2)")


def test_export_writes_torch_names() -> None:
    environ: dict[str, str] = {}
    export_cluster_env(detect_cluster_env(SLURM), environ)
    assert environ == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                       "MASTER_ADDR": "gpu07", "MASTER_PORT": str(slurm_master_port(123456))}
    # Read back as a plain torch environment it is the same rank.
    again = detect_cluster_env(environ)
    assert (again.rank, again.world_size, again.local_rank, again.master_addr) == (13, 16, 5, "gpu07")


def test_collective_timeout() -> None:
    assert collective_timeout({}) == timedelta(seconds=1800)
    assert collective_timeout({COLLECTIVE_TIMEOUT_ENV: "2.5"}) == timedelta(seconds=2.5)
    for bad in ("0", "-3", "soon"):
        with pytest.raises(ClusterEnvError, match=COLLECTIVE_TIMEOUT_ENV):
            collective_timeout({COLLECTIVE_TIMEOUT_ENV: bad})
