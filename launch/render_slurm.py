"""Render launch/slurm.sbatch for a job: nodes x GPUs per node, Slurm options and the pretrain.py arguments.

    python launch/render_slurm.py --nodes 2 --gpus-per-node 8 --partition gpu --output job.sbatch -- \\
        --config configs/gpt-1.3b.yaml --tp 8 --save /shared/ckpt
    sbatch job.sbatch

The template's {{field}} markers are replaced by shell-quoted values; a marker left unfilled or a value
that would break the script is an error (exit 2), so a rendered script never submits half-configured.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm.sbatch"
MARKER = re.compile(r"\{\{(\w+)\}\}")


def _option(args: list[str], flag: str) -> str | None:
    """The value of `flag` in pretrain.py's arguments (`--flag V` or `--flag=V`; the last one wins), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def requeue_args(pretrain_args: list[str]) -> list[str]:
    """pretrain.py's arguments for a job that may run again: `--load` must name the `--save` root (added when
    absent), so that every start resumes the job's own last checkpoint, or starts afresh before the first one."""
    save, load = _option(pretrain_args, "--save"), _option(pretrain_args, "--load")
    if not save:
        raise ValueError("--requeue needs --save DIR among pretrain.py's arguments: a requeued job resumes from there")
    if load is None:
        return [*pretrain_args, "--load", save]
    if Path(load) != Path(save):
        raise ValueError(f"--requeue: --load {load} must be the --save root {save}: a requeued job resumes its own "
                         f"last checkpoint, not {load} again")
    return list(pretrain_args)


def render_slurm(template: str, *, nodes: int, gpus_per_node: int, pretrain_args: list[str],
                 job_name: str = "megaclone", time: str = "24:00:00", cpus_per_task: int | None = None,
                 partition: str | None = None, account: str | None = None, log_dir: str = "logs",
                 workdir: str | None = None, collective_timeout: float = 1800.0, requeue: int = 0,
                 repo: str | Path = REPO) -> str:
    """The sbatch script for this job; raises ValueError naming the option when a value is unusable.
    `requeue`: how many times the job may put itself back in the queue after a node failure (0: never)."""
    if nodes < 1:
        raise ValueError(f"--nodes={nodes} must be >= 1")
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node={gpus_per_node} must be >= 1")
    if not re.fullmatch(r"[\w.-]+", job_name):
        raise ValueError(f"--job-name={job_name!r}: use letters, digits, '.', '_' or '-'")
    if not re.fullmatch(r"(\d+-)?\d+(:\d{2}){0,2}", time):
        raise ValueError(f"--time={time!r}: expected Slurm's [days-]hours[:minutes[:seconds]]")
    if not collective_timeout > 0:
        raise ValueError(f"--collective-timeout={collective_timeout} must be > 0 seconds")
    for name, value in (("--partition", partition), ("--account", account), ("--log-dir", log_dir)):
        if value is not None and (not value or re.search(r"\s", value)):
            raise ValueError(f"{name}={value!r} must be non-empty and contain no whitespace")
    if requeue < 0:
        raise ValueError(f"--requeue={requeue} must be >= 0")
    if requeue:
        pretrain_args = requeue_args(pretrain_args)
    extra = [f"#SBATCH --partition={partition}" if partition else "", f"#SBATCH --account={account}" if account else "",
             "#SBATCH --requeue" if requeue else ""]
    fields = {
        "nodes": str(nodes), "gpus_per_node": str(gpus_per_node), "job_name": job_name, "time": time,
        "cpus_per_task": str(cpus_per_task or 8 * gpus_per_node), "log_dir": log_dir,
        "sbatch_extra": "\n".join(line for line in extra if line) or "# (no partition or account given)",
        "workdir": shlex.quote(str(Path(workdir or os.getcwd()).resolve())), "repo": shlex.quote(str(repo)),
        "collective_timeout": f"{collective_timeout:g}", "pretrain_args": shlex.join(pretrain_args),
        "max_requeues": str(requeue),
    }
    unknown = sorted(set(MARKER.findall(template)) - set(fields))
    if unknown:
        raise ValueError(f"template has unknown field(s) {unknown}; known: {sorted(fields)}")
    return MARKER.sub(lambda m: fields[m.group(1)], template)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--job-name", default="megaclone")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit (default 24:00:00)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs of each node's launcher task (default 8 per GPU)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--log-dir", default="logs", help="where Slurm writes the job's output (default logs/)")
    p.add_argument("--workdir", help="directory the job runs in and relative paths refer to (default: here)")
    p.add_argument("--collective-timeout", type=float, default=1800.0,
                   help="seconds a rank waits for a dead or hung peer (MEGACLONE_COLLECTIVE_TIMEOUT)")
    p.add_argument("--requeue", type=int, default=0, metavar="N",
                   help="after a node failure (exit 75) requeue the job, up to N times, resuming from --save "
                        "(--load DIR is added; default 0: never)")
    p.add_argument("--template", type=Path, default=TEMPLATE)
    p.add_argument("--output", type=Path, help="write the script here (default: stdout)")
    p.add_argument("pretrain_args", nargs=argparse.REMAINDER, help="-- then launch/pretrain.py's arguments")
    args = p.parse_args(argv)
    pretrain_args = args.pretrain_args[1:] if args.pretrain_args[:1] == ["--"] else args.pretrain_args
    try:
        if not args.template.is_file():
            raise FileNotFoundError(f"--template {args.template} does not exist")
        script = render_slurm(args.template.read_text(), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                              pretrain_args=pretrain_args, job_name=args.job_name, time=args.time,
                              cpus_per_task=args.cpus_per_task, partition=args.partition, account=args.account,
                              log_dir=args.log_dir, workdir=args.workdir, collective_timeout=args.collective_timeout,
                              requeue=args.requeue)
    except (ValueError, FileNotFoundError) as e:
        print(f"render_slurm.py: error: {e}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(script)
        return 0
    tmp = args.output.with_name(f".{args.output.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, args.output)
    finally:
        tmp.unlink(missing_ok=True)
    requeues = f", requeued after a node failure up to {args.requeue} times" if args.requeue else ""
    print(f"wrote {args.output}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s){requeues}; submit with sbatch "
          f"{args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
