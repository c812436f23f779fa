"""Multi-node jobs: where each rank runs, how the process group starts, and how a dead peer ends the job.

Launchers describe a rank in different environment variables. DeepSpeed's launcher and torchrun set
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (plus their own node rank: CROSS_RANK or
GROUP_RANK); Slurm's srun, starting one task per GPU, sets only SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID / SLURM_NODELIST. `detect_cluster_env` reads any of them into one `ClusterEnv` and
`export_cluster_env` writes the torch names, so process-group set-up is the same code afterwards.

At start every rank reports its host (`gather_placement`) and rank 0 prints which ranks share a node and
whether tensor-parallel groups stay inside nodes (`build_cluster_report`). Collectives get a timeout
(`collective_timeout`, env MEGACLONE_COLLECTIVE_TIMEOUT), and `exit_on_peer_failure` turns the error a
dead or hung peer causes into one clear message and a prompt exit instead of a hang or a stack trace.

Node-local checkpoints (parallel.node_local_checkpoints, docs/cluster.md): each node writes the files of
its own ranks into its own copy of the step directory, plus an inventory (`node.json`) that
tools/gather_checkpoint.py uses to merge the copies into one checkpoint, checksums verified.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

COLLECTIVE_TIMEOUT_ENV = "MEGACLONE_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0  # torch's own default for gloo; long enough for a big checkpoint commit
EXIT_USAGE = 2  # the launch itself is wrong (e.g. its rendezvous port is taken): fix it and start again
EXIT_PEER_FAILURE = 75  # EX_TEMPFAIL: the job failed because of another node, and may be resumed
NODE_INVENTORY_NAME = "node.json"
NODE_INVENTORY_FORMAT = "megaclone-node-local"
SLURM_PORT_BASE = 20000  # MASTER_PORT under Slurm: SLURM_PORT_BASE + job id % SLURM_PORT_SPAN (as launch/slurm.sbatch)
SLURM_PORT_SPAN = 20000


class ClusterEnvError(ValueError):
    """The launcher's environment is incomplete or inconsistent; names the variable."""


# ---------------------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class ClusterEnv:
    """One rank's place in the job, whichever launcher started it."""

    launcher: str  # deepspeed | torchrun | slurm | env (RANK etc. from elsewhere) | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    node_rank: int | None = None  # None: the launcher does not say (nodes are then told apart by hostname)
    num_nodes: int | None = None


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list ("gpu[01-03,07],login1", "rack[1-2]-n[1-2]") as host names, in order."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        hosts.extend(_expand_brackets(item, text))
    if not hosts:
        raise ClusterEnvError(f"empty Slurm host list {text!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_brackets(item: str, whole: str) -> list[str]:
    m = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ClusterEnvError(f"malformed Slurm host list {whole!r} at {item!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ClusterEnvError(f"malformed range {part!r} in Slurm host list {whole!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(prefix + str(n).zfill(len(lo)) + tail for tail in _expand_brackets(rest, whole))
    return out


def parse_tasks_per_node(text: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE ("8(x2),4") as one count per node ([8, 8, 4])."""
    counts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ClusterEnvError(f"malformed SLURM_TASKS_PER_NODE {text!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def slurm_master_port(job_id: int) -> int:
    """A port every task of a job derives alike (and that launch/slurm.sbatch computes the same way)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _int(environ: Mapping[str, str], *keys: str, default: int | None = None) -> int:
    """The first of `keys` that is set, as an int; a missing or malformed value names the variable."""
    value = _opt_int(environ, *keys)
    if value is not None:
        return value
    if default is None:
        raise ClusterEnvError(f"environment variable {' or '.join(keys)} is not set")
    return default


def _opt_int(environ: Mapping[str, str], *keys: str) -> int | None:
    for key in keys:
        text = environ.get(key)
        if text:
            try:
                return int(text)
            except ValueError:
                raise ClusterEnvError(f"environment variable {key}={text!r} must be an integer") from None
    return None


def _from_torch_env(environ: Mapping[str, str]) -> ClusterEnv:
    if "TORCHELASTIC_RUN_ID" in environ or "GROUP_RANK" in environ:
        launcher, node_key, nodes_key = "torchrun", "GROUP_RANK", "GROUP_WORLD_SIZE"
    elif "CROSS_RANK" in environ:
        launcher, node_key, nodes_key = "deepspeed", "CROSS_RANK", "CROSS_SIZE"
    else:
        launcher, node_key, nodes_key = "env", "NODE_RANK", "NUM_NODES"
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ClusterEnvError(f"RANK is set but {' and '.join(missing)} not: set them to rank 0's address and a "
                              f"free port (every rank the same)")
    world = _int(environ, "WORLD_SIZE")
    return ClusterEnv(launcher=launcher, rank=_int(environ, "RANK"), world_size=world,
                      local_rank=_int(environ, "LOCAL_RANK", default=0),
                      local_world_size=_int(environ, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world),
                      master_addr=environ["MASTER_ADDR"], master_port=_int(environ, "MASTER_PORT"),
                      node_rank=_opt_int(environ, node_key), num_nodes=_opt_int(environ, nodes_key))


def _from_slurm(environ: Mapping[str, str]) -> ClusterEnv:
    """srun started this process as one task per GPU: SLURM_STEP_* describe the step, SLURM_* the job."""
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    node_rank = _int(environ, "SLURM_NODEID", default=0)
    num_nodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
    tasks = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    counts = parse_tasks_per_node(tasks) if tasks else [world // num_nodes] * num_nodes
    if node_rank >= len(counts):
        raise ClusterEnvError(f"SLURM_NODEID={node_rank} but SLURM_TASKS_PER_NODE={tasks!r} lists {len(counts)} nodes")
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(k)), None)
        if nodelist is None:
            raise ClusterEnvError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST")
        addr = expand_hostlist(nodelist)[0]
    port = _opt_int(environ, "MASTER_PORT")
    if port is None:
        port = slurm_master_port(_int(environ, "SLURM_JOB_ID"))
    return ClusterEnv(launcher="slurm", rank=_int(environ, "SLURM_PROCID"), world_size=world,
                      local_rank=_int(environ, "SLURM_LOCALID", default=0), local_world_size=counts[node_rank],
                      master_addr=addr, master_port=port, node_rank=node_rank, num_nodes=num_nodes)


def detect_cluster_env(environ: Mapping[str, str] | None = None) -> ClusterEnv:
    """This rank's `ClusterEnv`: torch variables (DeepSpeed's launcher, torchrun) win over Slurm's, because one
    launcher per node under srun still inherits the srun task's SLURM_PROCID; neither means one process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ:
        env = _from_torch_env(environ)
    elif "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        env = _from_slurm(environ)
    else:
        env = ClusterEnv("single", 0, 1, 0, 1, "127.0.0.1", _opt_int(environ, "MASTER_PORT") or _free_port(),
                         node_rank=0, num_nodes=1)
    _check(env)
    return env


def _check(env: ClusterEnv) -> None:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ClusterEnvError(f"rank {env.rank} outside world size {env.world_size} ({env.launcher} environment)")
    if env.local_world_size < 1 or not 0 <= env.local_rank < env.local_world_size:
        raise ClusterEnvError(f"local rank {env.local_rank} outside {env.local_world_size} ranks on this node "
                              f"({env.launcher} environment)")
    if env.node_rank is not None and env.num_nodes is not None and not 0 <= env.node_rank < env.num_nodes:
        raise ClusterEnvError(f"node rank {env.node_rank} outside {env.num_nodes} nodes ({env.launcher} environment)")
    if not 0 < env.master_port < 65536:
        raise ClusterEnvError(f"MASTER_PORT={env.master_port} is not a TCP port")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_cluster_env(env: ClusterEnv, environ: dict[str, str] | None = None) -> None:
    """Write the torch names (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    environ = os.environ if environ is None else environ
    environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                   LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                   MASTER_PORT=str(env.master_port))


def collective_timeout(environ: Mapping[str, str] | None = None) -> timedelta:
    """How long any collective (and the start-up rendezvous) waits for the slowest peer before the job fails."""
    environ = os.environ if environ is None else environ
    text = environ.get(COLLECTIVE_TIMEOUT_ENV, "")
    if not text:
        return timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ClusterEnvError(f"{COLLECTIVE_TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def init_process_group(env: ClusterEnv) -> None:
    """The default process group for `env`, through DeepSpeed (so that its communication layer shares it), with
    the collective timeout; gloo on CPU, NCCL on GPUs."""
    import deepspeed
    import torch

    export_cluster_env(env)
    timeout = collective_timeout()
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False,
                               timeout=timeout)
    use_timeout_for_new_groups(timeout)


def use_timeout_for_new_groups(timeout: timedelta) -> None:
    """Give every process group created from now on `timeout`, as the default group has.

    torch gives a group made by `new_group` without a timeout its module default (30 min for gloo, 10 for NCCL),
    not the default group's. megaclone's layout groups, DeepSpeed's pipeline grid and its own groups are all made
    that way, so a peer that hangs in a data-parallel or pipeline collective held the others for half an hour.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


DEEPSPEED_SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


def skip_deepspeed_shm_op() -> None:
    """Mark DeepSpeed's CPU shared-memory communication op unavailable, so `deepspeed.init_distributed` never builds
    or loads it.

    On a CPU machine init_distributed compiled that op (25-29 s, on every launch where the compiled copy was not
    found) and gave every rank a 67 MB /dev/shm buffer that it never unlinked. The op serves only DeepSpeed's
    `inference_all_reduce` (its inference kernels); training's collectives go through torch.distributed, gloo on
    CPU, either way. `deepspeed.ops.__compatible_ops__` is the one dict DeepSpeed consults before building it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DEEPSPEED_SHM_OP] = False


# ---------------------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class RankPlace:
    rank: int
    hostname: str
    node_rank: int | None  # from the launcher; None: unknown
    local_rank: int

    @property
    def node_key(self) -> str:
        return f"node{self.node_rank}" if self.node_rank is not None else f"host:{self.hostname}"


def gather_placement(env: ClusterEnv) -> list[RankPlace]:
    """Every rank's host and node, on every rank (a collective on the default group)."""
    import torch.distributed as dist

    mine = RankPlace(env.rank, socket.gethostname(), env.node_rank, env.local_rank)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, mine)
    return sorted(places, key=lambda p: p.rank)


@dataclass
class ClusterReport:
    """Which ranks share a node, and whether the parallel groups stay inside nodes."""

    launcher: str
    world_size: int
    tp_size: int
    pp_size: int
    dp_size: int
    nodes: list[dict[str, Any]]  # {"node": index, "hostname": str, "ranks": [global ranks]}
    tp_inside_nodes: bool
    collective_timeout_s: float
    warnings: list[str] = field(default_factory=list)

    def node_of(self, rank: int) -> int:
        return next(n["node"] for n in self.nodes if rank in n["ranks"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        tp, dp = self.tp_size, self.dp_size
        out = [f"cluster: {len(self.nodes)} node(s), {self.world_size} ranks, launcher {self.launcher}; "
               f"layout TP {tp} x PP {self.pp_size} x DP {dp}; TP groups "
               f"{'inside nodes' if self.tp_inside_nodes else 'CROSS nodes'}; collective timeout "
               f"{self.collective_timeout_s:g} s"]
        for node in self.nodes:
            coords = " ".join(f"{r}(tp{r % tp} pp{r // (tp * dp)} dp{(r // tp) % dp})" for r in node["ranks"])
            out.append(f"  node {node['node']} [{node['hostname']}]: {len(node['ranks'])} ranks: {coords}")
        return out + [f"  warning: {w}" for w in self.warnings]


def build_cluster_report(places: list[RankPlace], launcher: str, tp_size: int, pp_size: int) -> ClusterReport:
    """Group ranks by node (launcher node rank, else hostname) and check the TP groups of the megaclone layout
    (TP fastest, like `Layout.global_rank`) against the nodes."""
    world = len(places)
    if world % (tp_size * pp_size):
        raise ValueError(f"{world} ranks do not split into TP {tp_size} x PP {pp_size}")
    by_node: dict[str, list[RankPlace]] = {}
    for p in sorted(places, key=lambda p: p.rank):
        by_node.setdefault(p.node_key, []).append(p)
    order = sorted(by_node.values(), key=lambda ps: (ps[0].node_rank if ps[0].node_rank is not None else -1,
                                                     ps[0].rank))
    nodes = [{"node": i, "hostname": ps[0].hostname, "ranks": [p.rank for p in ps]} for i, ps in enumerate(order)]
    node_of = {r: n["node"] for n in nodes for r in n["ranks"]}
    split = [list(range(g, g + tp_size)) for g in range(0, world, tp_size)
             if len({node_of[r] for r in range(g, g + tp_size)}) > 1]
    report = ClusterReport(launcher, world, tp_size, pp_size, world // (tp_size * pp_size), nodes, not split,
                           collective_timeout().total_seconds())
    sizes = sorted({len(n["ranks"]) for n in nodes})
    if len(sizes) > 1:
        report.warnings.append(f"nodes hold different numbers of ranks ({sizes}): the slowest node sets the pace")
    if split:
        per_node = sizes[0]
        if all(s % tp_size == 0 for s in sizes):
            report.warnings.append(
                f"TP group {split[0]} spans nodes although parallel.tp_size={tp_size} fits a node of {per_node} "
                f"ranks: the launcher did not number ranks node by node (start one launcher per node, "
                f"launch/node.sh, or use srun --distribution=block)")
        else:
            report.warnings.append(
                f"parallel.tp_size={tp_size} does not fit the {per_node} ranks of a node: every layer's TP "
                f"all-reduce crosses the interconnect; prefer a tp_size that divides the ranks per node")
    return report


# ---------------------------------------------------------------------------------------------- failures

_PEER_FAILURE_PATTERNS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
                          "timeout", "connection refused", "socket closed", "nccl communicator was aborted",
                          "watchdog caught collective")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions that caused it."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_port_in_use(exc: BaseException) -> bool:
    """Whether the rendezvous failed because MASTER_PORT is taken (another job on this node): not a peer failure."""
    return any("eaddrinuse" in str(e).lower() or "address already in use" in str(e).lower() for e in _chain(exc))


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a collective failing because another rank died or hung."""
    import torch.distributed as dist

    if is_port_in_use(exc):
        return False
    return any(isinstance(e, getattr(dist, "DistError", ())) or (isinstance(e, RuntimeError) and any(
        p in str(e).lower() for p in _PEER_FAILURE_PATTERNS)) for e in _chain(exc))


def last_checkpoint(root: str | Path | None) -> Path | None:
    """The step directory that `root`'s `latest` names, or None (no checkpoints, or none complete yet)."""
    if not root:
        return None
    from megaclone.checkpoint import CheckpointError, resolve_checkpoint

    try:
        return resolve_checkpoint(root)
    except CheckpointError:
        return None


def peer_failure_message(exc: BaseException, env: ClusterEnv, checkpoint_root: str | Path | None,
                         timeout: timedelta) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    where = f"rank {env.rank}" + (f" on node {env.node_rank}" if env.node_rank is not None else "")
    ckpt = last_checkpoint(checkpoint_root)
    if not checkpoint_root:
        resume = "No checkpoints were being written (no --save)."
    elif ckpt is None:
        resume = f"No complete checkpoint under {checkpoint_root} yet."
    else:
        resume = f"Last complete checkpoint: {ckpt}; resume with --load {checkpoint_root}."
    return (f"megaclone: {where} ({socket.gethostname()}) lost contact with its peers: {first}\n"
            f"megaclone: a rank on another node crashed, was killed, never started, or hung for more than the "
            f"collective timeout ({timeout.total_seconds():g} s, {COLLECTIVE_TIMEOUT_ENV}); stopping this job "
            f"(exit {EXIT_PEER_FAILURE}). {resume}")


@contextmanager
def exit_on_peer_failure(env: ClusterEnv, checkpoint_root: str | Path | None) -> Iterator[None]:
    """Run the body; when a collective fails because a peer is gone, print why and exit at once.

    `os._exit`: a normal exit would call `destroy_process_group` and atexit handlers, which can block on
    the dead peer; the launcher sees the exit code and stops this node's other ranks.
    """
    try:
        yield
    except BaseException as e:
        if is_port_in_use(e):
            port = os.environ.get("MASTER_PORT", "?")
            print(f"megaclone: rank {env.rank}: the rendezvous port MASTER_PORT={port} on "
                  f"{os.environ.get('MASTER_ADDR', '?')} is already in use (another job on this node?); give this job "
                  "a free one: deepspeed --master_port P, torchrun --master-port P, or MASTER_PORT=P",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_USAGE)
        if not is_peer_failure(e):
            raise
        print(peer_failure_message(e, env, checkpoint_root, collective_timeout()), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_PEER_FAILURE)


# ---------------------------------------------------------------------------------------------- node-local


def replica_writers(report: ClusterReport) -> set[int]:
    """Ranks that write the files every data-parallel replica shares (model states, weights) into their node's
    copy of a checkpoint: per node and (tp, pp) position, the rank with the lowest DP rank there."""
    tp, dp = report.tp_size, report.dp_size
    writers = set()
    for node in report.nodes:
        seen = set()
        for r in sorted(node["ranks"]):
            position = (r % tp, r // (tp * dp))
            if position not in seen:
                seen.add(position)
                writers.add(r)
    return writers


def check_same_checkpoint(step_dir: str | Path, step: int) -> None:
    """Every rank must resume the same step. Node-local copies can disagree (a node that crashed between its
    peers' commits still names the previous step), and loading mixed steps would train on a chimera."""
    import torch.distributed as dist

    from megaclone.checkpoint import CheckpointError

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, (step, str(step_dir), socket.gethostname()))
    if len({s for s, _, _ in found}) > 1:
        seen = "; ".join(sorted({f"step {s} ({path} on {host})" for s, path, host in found}))
        raise CheckpointError(f"--load: ranks resolved different checkpoints: {seen}. A save was interrupted on some "
                              f"node; pass --load ROOT/step_XXXXXXXX of a step that every node holds")


def write_node_inventory(step_dir: Path, report: ClusterReport, rank: int, step: int,
                         digests: dict[str, dict[str, Any]]) -> Path:
    """`node.json` in a node's copy of a step directory: which node, which ranks, every file with its sha256."""
    from megaclone.checkpoint.manifest import atomic_write_text

    node = report.node_of(rank)
    entry = report.nodes[node]
    inventory = {"format": NODE_INVENTORY_FORMAT, "version": 1, "step": step, "node": node,
                 "num_nodes": len(report.nodes), "hostname": entry["hostname"], "ranks": entry["ranks"],
                 "files": dict(sorted(digests.items()))}
    path = step_dir / NODE_INVENTORY_NAME
    atomic_write_text(path, json.dumps(inventory, indent=1) + "\n")
    return path


def read_node_inventory(step_dir: str | Path) -> dict[str, Any]:
    """A node's inventory, validated; raises CheckpointError naming the file."""
    from megaclone.checkpoint import CheckpointError

    path = Path(step_dir) / NODE_INVENTORY_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {step_dir} is not a node-local checkpoint copy "
                              f"(written with parallel.node_local_checkpoints=true)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict) or d.get("format") != NODE_INVENTORY_FORMAT or d.get("version") != 1:
        raise CheckpointError(f"{path}: not a node inventory (expected format {NODE_INVENTORY_FORMAT!r}, version 1)")
    for key, kind in (("step", int), ("node", int), ("num_nodes", int), ("ranks", list), ("files", dict)):
        if not isinstance(d.get(key), kind):
            raise CheckpointError(f"{path}: '{key}' must be {kind.__name__}, got {d.get(key)!r}")
    for rel, entry in d["files"].items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{path}: bad files entry {rel!r}: {entry!r}")
    return d
