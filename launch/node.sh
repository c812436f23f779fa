#!/usr/bin/env bash
# One node of a multi-node job, without ssh: run this on every node (by hand, from your scheduler, or from
# launch/slurm.sbatch) with that node's rank; each starts DeepSpeed's launcher with --no_ssh for its own ranks.
#
#   node 0:  launch/node.sh --nodes 2 --node-rank 0 --master-addr 10.0.0.1 --procs-per-node 8 -- \
#                --config configs/gpt-1.3b.yaml --tp 8 --save /shared/ckpt
#   node 1:  launch/node.sh --nodes 2 --node-rank 1 --master-addr 10.0.0.1 --procs-per-node 8 -- <same args>
#
# Everything after `--` goes to launch/pretrain.py. Defaults come from the environment: NUM_NODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT (29500), PROCS_PER_NODE, or under Slurm SLURM_NNODES, SLURM_NODEID and
# SLURM_GPUS_ON_NODE. PYTHON picks the interpreter (default: python3). See docs/cluster.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NODES="${NUM_NODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
PROCS="${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
HOSTFILE=""
SCRIPT="$ROOT/launch/pretrain.py"
PYTHON="${PYTHON:-python3}"

die() { echo "node.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES="${2:-}"; shift 2 ;;
        --node-rank) NODE_RANK="${2:-}"; shift 2 ;;
        --master-addr) MASTER_ADDR="${2:-}"; shift 2 ;;
        --master-port) MASTER_PORT="${2:-}"; shift 2 ;;
        --procs-per-node|--gpus-per-node) PROCS="${2:-}"; shift 2 ;;
        --hostfile) HOSTFILE="${2:-}"; shift 2 ;;
        --script) SCRIPT="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option $1 (pretrain.py's arguments go after --)" ;;
    esac
done

if [[ -z "$PROCS" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    PROCS="$(nvidia-smi -L | grep -c '^GPU' || true)"
fi
[[ -n "$HOSTFILE" || -n "$NODES" ]] || die "--nodes (or NUM_NODES) is required"
[[ -n "$NODE_RANK" ]] || die "--node-rank (or NODE_RANK) is required"
[[ -n "$MASTER_ADDR" ]] || die "--master-addr (or MASTER_ADDR): the address of node 0, the same on every node"
is_uint "$NODE_RANK" || die "--node-rank=$NODE_RANK must be an integer >= 0"
is_uint "$MASTER_PORT" && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) || die "--master-port=$MASTER_PORT is not a port"
[[ -f "$SCRIPT" ]] || die "--script $SCRIPT does not exist"

if [[ -n "$HOSTFILE" ]]; then
    # Given: one line per node, "name slots=N"; only the order and the slots matter without ssh.
    [[ -f "$HOSTFILE" ]] || die "--hostfile $HOSTFILE does not exist"
    NODES="$(grep -cE '^[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" || true)"
    (( NODES >= 1 )) || die "--hostfile $HOSTFILE lists no 'host slots=N' lines"
else
    is_uint "$NODES" && (( NODES >= 1 )) || die "--nodes=$NODES must be an integer >= 1"
    is_uint "${PROCS:-x}" && (( PROCS >= 1 )) || die "--procs-per-node (or PROCS_PER_NODE) must be an integer >= 1"
    # Every node must pass DeepSpeed the same world description: NODES lines of PROCS slots. The names are only
    # labels here (no ssh); the file is named by its content, so concurrent nodes on one machine agree.
    dir="${TMPDIR:-/tmp}"
    HOSTFILE="$dir/megaclone-hostfile-${NODES}x${PROCS}"
    tmp="$(mktemp "$dir/.megaclone-hostfile.XXXXXX")"
    for ((i = 0; i < NODES; i++)); do echo "node$i slots=$PROCS"; done > "$tmp"
    mv -f "$tmp" "$HOSTFILE"
fi
(( NODE_RANK < NODES )) || die "--node-rank=$NODE_RANK must be < the number of nodes ($NODES)"

echo "node.sh: node $NODE_RANK of $NODES on $(hostname), master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE" >&2
exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$SCRIPT" "$@"
