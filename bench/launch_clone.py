"""Time to the first training step: widening at launch against resuming the equal-size wide checkpoint.

Side by side, alternated, in one run, at DP=2 and at TP=2 (2 processes, `deepspeed --num_gpus 2`):
  clone       `--init-from S --hyperclone 2`: each rank widens its slice of the small checkpoint S (its DP replicas
              share the work), checks preservation, starts training (`--no-clone-eval-at-start`: an exact resume
              evaluates nothing before its first step either; `--eval-at-start` adds that variant)
  resume      `--load W`: exact resume of W, a checkpoint of the widened model saved after one step at the same
              layout (DeepSpeed's model, optimizer and schedule state)
The clock runs from starting the launcher to the `startup` record the run logs just before its first step
(metrics.jsonl), which also holds rank 0's phase times (process start to imports, plan, init_distributed, setup,
model/clone, engine, resume, preservation). Medians of `--repeat` alternated pairs.

    python bench/launch_clone.py                                   # hidden 1024, 6 layers (77.7M -> 306M)
    python bench/launch_clone.py --hidden 256 --layers 2 --repeat 1  # a quick check

Numbers are recorded in docs/performance.md ("Launch-time widening").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "launch" / "pretrain.py"
CONFIG = ROOT / "configs" / "small.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(args: list[str], procs: int) -> tuple[list[str], dict[str, str]]:
    """The command line of launch/pretrain.py on `procs` processes, and an environment without a parent's ranks."""
    cmd = [sys.executable, str(PRETRAIN), *args] if procs == 1 else [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
        str(free_port()), str(PRETRAIN), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return cmd, env


def launch(args: list[str], procs: int) -> float:
    """Run launch/pretrain.py to its end; returns the wall-clock time the launcher was started at."""
    cmd, env = command(args, procs)
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"launch failed: {' '.join(cmd)}\n{(done.stdout + done.stderr)[-4000:]}")
    return started


def startup_record(run_dir: Path) -> dict:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] == "startup":
            return record
    raise RuntimeError(f"{run_dir}/metrics.jsonl has no startup record")


def timed(args: list[str], run_dir: Path, limit_s: float = 1800.0) -> dict:
    """Launch on 2 processes and stop the job once its `startup` record is written: the clock stops there, and the
    training step after it (minutes for a 306M model on CPU) would only lengthen the benchmark."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd, env = command([*args, "--run-dir", str(run_dir)], 2)
    log = run_dir.with_name(run_dir.name + ".log").open("w+")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while (record := _startup_or_none(run_dir)) is None:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"launch ended before its first step: {' '.join(cmd)}\n{log.read()[-4000:]}")
            if time.time() > started + limit_s:
                raise RuntimeError(f"no startup record after {limit_s:.0f} s: {' '.join(cmd)}")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        proc.wait()
        log.close()
    return {"seconds": record["time"] - started, "phases": record["phases"]}


def _startup_or_none(run_dir: Path) -> dict | None:
    try:
        return startup_record(run_dir)
    except (FileNotFoundError, RuntimeError, json.JSONDecodeError):
        return None  # not written yet, or a line still being written


def median_phases(runs: list[dict]) -> dict[str, float]:
    names = dict.fromkeys(k for r in runs for k in r["phases"])
    return {k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in names}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layouts", nargs="*", default=["dp2", "tp2"], choices=["dp2", "tp2"])
    p.add_argument("--eval-at-start", action="store_true", help="also time the clone with its step-0 evaluation")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    model = ["--set", f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
             f"model.num_heads={a.hidden // 64}", "checkpoint.save_interval=0", "train.eval_interval=0"]
    results = {"load_average_start": os.getloadavg(), "hidden": a.hidden, "layers": a.layers, "layouts": {}}
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        launch(["--config", str(CONFIG), "--train-iters", "1", "--save", str(tmp / "small"), "--run-dir",
                str(tmp / "small-run"), *model], 1)
        data = ["--set", f"data.data_prefix={tmp / 'small-run' / 'data' / 'corpus'}", "train.eval_interval=0"]
        print(f"small checkpoint S (hidden {a.hidden}, {a.layers} layers) in {time.perf_counter() - t0:.0f} s; "
              f"load average {os.getloadavg()}", flush=True)
        for layout in a.layouts:
            par = ["--tp", "2"] if layout == "tp2" else []
            clone = ["--init-from", str(tmp / "small"), "--hyperclone", "2", *par, *data]
            wide = tmp / f"wide-{layout}"
            shutil.rmtree(tmp / "wide-run", ignore_errors=True)
            started = launch([*clone, "--train-iters", "1", "--save", str(wide), "--run-dir", str(tmp / "wide-run")],
                             2)
            record = startup_record(tmp / "wide-run")  # the run that makes W evaluates at step 0 (the default)
            made = {"seconds": record["time"] - started, "all": [record["time"] - started],
                    "phases": record["phases"]}
            print(f"{layout}: W made by a clone launch with the step-0 evaluation, {made['seconds']:.1f} s to its "
                  f"first step; load average {os.getloadavg()}", flush=True)
            kinds = {"clone": [*clone, "--train-iters", "1", "--no-clone-eval-at-start"],
                     "resume": ["--load", str(wide), *par, "--train-iters", "2", *data]}
            if a.eval_at_start:
                kinds["clone_eval"] = [*clone, "--train-iters", "1"]
            runs: dict[str, list[dict]] = {k: [] for k in kinds}
            for rep in range(a.repeat):
                for kind, args in kinds.items():  # alternated, so that load on the machine hits all alike
                    runs[kind].append(timed(args, tmp / f"run-{kind}"))
                print(f"{layout} rep {rep}: " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s" for k, v in runs.items())
                      + f"; load average {os.getloadavg()}", flush=True)
            row = {k: {"seconds": statistics.median(r["seconds"] for r in v), "all": [r["seconds"] for r in v],
                       "phases": median_phases(v)} for k, v in runs.items()}
            row["clone_eval_once"] = made
            row["ratio"] = row["clone"]["seconds"] / row["resume"]["seconds"]
            row["load_average_end"] = os.getloadavg()
            results["layouts"][layout] = row
            shutil.rmtree(wide, ignore_errors=True)
    print(f"\nload average at the start {results['load_average_start']}")
    for layout, row in results["layouts"].items():
        print(f"\n{layout}: clone / resume = {row['ratio']:.2f} (load average at the end {row['load_average_end']})")
        phases = list(dict.fromkeys(k for kind in row if isinstance(row[kind], dict) and "phases" in row[kind]
                                    for k in row[kind]["phases"]))
        print("| start | to first step s (runs) | " + " | ".join(phases) + " |")
        print("|---|---|" + "---|" * len(phases))
        for kind, r in row.items():
            if isinstance(r, dict) and "phases" in r:
                runs = ", ".join(f"{s:.1f}" for s in r["all"])
                print(f"| {kind} | {r['seconds']:.1f} ({runs}) | "
                      + " | ".join(f"{r['phases'].get(k, 0.0):.2f}" for k in phases) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
