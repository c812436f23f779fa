#!/usr/bin/env bash
# A multi-node job from one shell, through a hostfile: DeepSpeed's launcher reaches every node over
# passwordless ssh (pdsh by default) and starts that node's ranks there.
#
#   $ cat hostfile
#   gpu-node-1 slots=8
#   gpu-node-2 slots=8
#   $ launch/multinode.sh --hostfile hostfile -- --config configs/gpt-1.3b.yaml --tp 8 --save /shared/ckpt
#
# Everything after `--` goes to launch/pretrain.py. Options: --master-addr (default: DeepSpeed asks the first
# host for its address), --master-port (29500), --launcher pdsh|openmpi|mvapich|mpich|impi|slurm (pdsh).
# The repository and the current directory must exist at the same paths on every node (DeepSpeed cd's to this
# directory there), and the MEGACLONE_* variables of this shell are forwarded to every rank. PYTHON picks
# the interpreter (default: python3). See docs/cluster.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTFILE=""
MASTER_ADDR=""
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="pdsh"
PYTHON="${PYTHON:-python3}"

die() { echo "multinode.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) HOSTFILE="${2:-}"; shift 2 ;;
        --master-addr) MASTER_ADDR="${2:-}"; shift 2 ;;
        --master-port) MASTER_PORT="${2:-}"; shift 2 ;;
        --launcher) LAUNCHER="${2:-}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option $1 (pretrain.py's arguments go after --)" ;;
    esac
done

[[ -n "$HOSTFILE" ]] || die "--hostfile is required (one 'host slots=N' line per node)"
[[ -f "$HOSTFILE" ]] || die "--hostfile $HOSTFILE does not exist"
grep -qE '^[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" || die "--hostfile $HOSTFILE lists no 'host slots=N' lines"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] && (( MASTER_PORT > 0 && MASTER_PORT < 65536 )) || die "--master-port=$MASTER_PORT is not a port"

args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --launcher "$LAUNCHER")
[[ -z "$MASTER_ADDR" ]] || args+=(--master_addr "$MASTER_ADDR")

# DeepSpeed forwards only some variables to remote nodes; the rest it reads from the file DS_ENV_FILE names.
envfile="$(mktemp "${TMPDIR:-/tmp}/.megaclone-ds-env.XXXXXX")"
trap 'rm -f "$envfile"' EXIT
env | grep -E '^MEGACLONE_[A-Z0-9_]+=' > "$envfile" || true

# Not exec: the trap removes the env file afterwards. TERM/INT reach the launcher, which stops the remote ranks.
DS_ENV_FILE="$envfile" "$PYTHON" -m deepspeed.launcher.runner "${args[@]}" "$ROOT/launch/pretrain.py" "$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
status=0
wait "$child" || status=$?
if (( status > 128 )); then  # interrupted by a trapped signal: wait for the launcher to finish stopping
    wait "$child" || status=$?
fi
exit "$status"
