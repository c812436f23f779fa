"""The start-up report: which ranks share a node, whether TP groups stay inside nodes, who writes the replicated
files of a node-local checkpoint; and how a collective's failure is told apart and reported."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch

from megaclone.checkpoint import write_weights_checkpoint
from megaclone.cluster import (
    ClusterEnv,
    RankPlace,
    build_cluster_report,
    is_peer_failure,
    is_port_in_use,
    peer_failure_message,
    replica_writers,
)
from megaclone.config import ModelConfig


def places(nodes: list[list[int]], hosts: list[str] | None = None, node_ranks: bool = True) -> list[RankPlace]:
    hosts = hosts or [f"host{i}" for i in range(len(nodes))]
    return [RankPlace(r, hosts[n], n if node_ranks else None, i) for n, ranks in enumerate(nodes)
            for i, r in enumerate(ranks)]


def test_two_nodes_tp2_dp2_keeps_tp_inside_nodes() -> None:
    report = build_cluster_report(places([[0, 1], [2, 3]]), "deepspeed", tp_size=2, pp_size=1)
    assert report.tp_inside_nodes and not report.warnings
    assert report.dp_size == 2 and report.nodes == [{"node": 0, "hostname": "host0", "ranks": [0, 1]},
                                                     {"node": 1, "hostname": "host1", "ranks": [2, 3]}]
    lines = report.lines()
    assert lines[0] == ("cluster: 2 node(s), 4 ranks, launcher deepspeed; layout TP 2 x PP 1 x DP 2; TP groups inside "
                        "nodes; collective timeout 1800 s")
    assert lines[2] == "  node 1 [host1]: 2 ranks: 2(tp0 pp0 dp1) 3(tp1 pp0 dp1)"
    assert report.node_of(3) == 1 and replica_writers(report) == {0, 1, 2, 3}


def test_simulated_nodes_on_one_host_are_told_apart_by_node_rank() -> None:
    report = build_cluster_report(places([[0, 1], [2, 3]], hosts=["same", "same"]), "deepspeed", 2, 2)
    assert [n["ranks"] for n in report.nodes] == [[0, 1], [2, 3]] and report.tp_inside_nodes
    # Without node ranks the hostname is all there is: one node.
    report = build_cluster_report(places([[0, 1], [2, 3]], hosts=["same", "same"], node_ranks=False), "env", 2, 1)
    assert [n["ranks"] for n in report.nodes] == [[0, 1, 2, 3]]


def test_tp_wider_than_a_node_is_reported() -> None:
    report = build_cluster_report(places([[0, 1], [2, 3]]), "torchrun", tp_size=4, pp_size=1)
    assert not report.tp_inside_nodes
    assert "tp_size=4 does not fit the 2 ranks of a node" in report.warnings[0]
    assert "CROSS nodes" in report.lines()[0]


def test_round_robin_rank_numbering_is_reported() -> None:
    """srun --distribution=cyclic puts consecutive ranks on different nodes although TP 2 would fit."""
    report = build_cluster_report(places([[0, 2], [1, 3]]), "slurm", tp_size=2, pp_size=1)
    assert not report.tp_inside_nodes
    assert "TP group [0, 1] spans nodes although parallel.tp_size=2 fits" in report.warnings[0]
    assert "--distribution=block" in report.warnings[0]


def test_replica_writers_one_per_node_and_position() -> None:
    # TP 2 x DP 4 on two nodes of 4: each node holds two DP replicas; its lowest one writes.
    report = build_cluster_report(places([[0, 1, 2, 3], [4, 5, 6, 7]]), "deepspeed", tp_size=2, pp_size=1)
    assert replica_writers(report) == {0, 1, 4, 5}
    # TP 2 x PP 2 x DP 2 on two nodes of 4: node 0 holds stage 0, node 1 stage 1.
    report = build_cluster_report(places([[0, 1, 2, 3], [4, 5, 6, 7]]), "deepspeed", tp_size=2, pp_size=2)
    assert replica_writers(report) == {0, 1, 4, 5}
    # One node: exactly DeepSpeed's own writers (DP rank 0).
    report = build_cluster_report(places([list(range(8))]), "deepspeed", tp_size=2, pp_size=2)
    assert replica_writers(report) == {0, 1, 4, 5}


def test_ranks_that_do_not_split_into_the_layout_are_refused() -> None:
    with pytest.raises(ValueError, match="do not split"):
        build_cluster_report(places([[0, 1, 2]]), "env", tp_size=2, pp_size=1)


def test_peer_failures_are_recognised() -> None:
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:43201")
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    assert is_peer_failure(closed) and is_peer_failure(timeout)
    assert is_peer_failure(torch.distributed.DistBackendError("NCCL error"))
    wrapped = ValueError("step failed")
    wrapped.__cause__ = closed
    assert is_peer_failure(wrapped)
    assert not is_peer_failure(RuntimeError("shape mismatch: [4, 8] vs [8, 4]"))
    taken = torch.distributed.DistNetworkError("The server socket has failed to listen on any local network address. "
                                               "port: 29500, code: -98, name: EADDRINUSE")
    assert is_port_in_use(taken) and not is_peer_failure(taken)  # our own launch is wrong, no peer is lost
    assert not is_port_in_use(closed)
    assert not is_peer_failure(FloatingPointError("step 3: training loss is nan; stopping"))


def test_peer_failure_message_names_the_last_checkpoint(tmp_path: Path) -> None:
    env = ClusterEnv("deepspeed", 1, 4, 1, 2, "127.0.0.1", 29500, node_rank=0, num_nodes=2)
    error = RuntimeError("Connection closed by peer [127.0.0.1]:1\nmore detail")
    text = peer_failure_message(error, env, tmp_path / "ckpt", timedelta(seconds=30))
    assert "rank 1 on node 0" in text and "Connection closed by peer [127.0.0.1]:1" in text
    assert "more detail" not in text and "30 s" in text and "MEGACLONE_COLLECTIVE_TIMEOUT" in text
    assert f"No complete checkpoint under {tmp_path / 'ckpt'}" in text
    assert "no --save" in peer_failure_message(error, env, "", timedelta(seconds=30))
    cfg = ModelConfig(vocab_size=64, vocab_multiple=64, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=8)
    state = {n: torch.zeros(s) for n, s in _shapes(cfg).items()}
    step = write_weights_checkpoint(tmp_path / "ckpt", cfg, state, tp_size=1, pp_size=1, step=7)
    text = peer_failure_message(error, env, tmp_path / "ckpt", timedelta(seconds=30))
    assert f"Last complete checkpoint: {step}; resume with --load {tmp_path / 'ckpt'}" in text


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from megaclone.spec import build_param_specs

    return {s.name: s.shape for s in build_param_specs(cfg)}
