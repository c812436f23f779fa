"""Training runs for the benchmarks, cached as small committed records so a study resumes where it stopped.

A run is a `RunSpec`: the model, the train section, the launch flags (cloning, carrying) and the run it starts
from. One run is one `python launch/pretrain.py` process (one process, one torch thread, niced), exactly as a
user starts it. When it ends, its compact record (held-out curve, parameter count, FLOPs per token, CPU and wall
seconds, the spec) is written to `docs/results/runs/<name>.json`; a later invocation, in this session or another,
reads the record instead of training again. The name is a readable slug plus a hash of what determines the numbers
(model, training, flags, corpus, source run), never of paths. Raw run directories stay under runs/ (git-ignored):
only a run whose checkpoint is needed (the small model to widen) is trained again when they are gone, and its
final loss is compared with its record.

Reuse from another benchmark, e.g. the random-init baseline of a wide model with its learning-rate sweep:

    from study_runs import RunCache, Scale, model_dict, random_init
    cache = RunCache()                                   # runs/study, records in docs/results/runs
    sweep = random_init(cache, Scale(), model_dict(128), lrs=(2e-3, 4e-3, 8e-3, 1.6e-2), seeds=(0, 1, 2))
    sweep.best, sweep.records[lr] (seed 0 at each lr), sweep.seeds[seed] (the best lr's record for each seed)

With the same model dict, Scale and iterations as bench/hyperclone_speedup.py's d64 size (wide model d=128,
4 layers, 2000 steps), the records it committed are reused and nothing is trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megaclone.checkpoint.manifest import atomic_write_text  # noqa: E402
from megaclone.clone import widen_model_config  # noqa: E402
from megaclone.config import model_config_from_dict  # noqa: E402
from megaclone.train import read_metrics  # noqa: E402
from megaclone.train.logging import model_flops_per_token  # noqa: E402

NICE = 15
RECORDS = ROOT / "docs" / "results" / "runs"


@dataclass(frozen=True)
class Scale:
    """What every run of a study shares: sequence, batch, vocabulary, precision, evaluation."""
    seq_len: int = 128
    batch: int = 8  # sequences per optimizer step, one process
    vocab: int = 1024
    precision: str = "fp32"
    eval_interval: int = 100
    eval_iters: int = 16  # the same fixed held-out batches at every evaluation

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


def model_dict(hidden: int, layers: int = 4, head_size: int = 16, max_seq_len: int = 128) -> dict:
    """A GPT of the bundled-corpus studies: gelu, layernorm, learned positions, tied embeddings (the defaults)."""
    return {"vocab_size": 0, "vocab_multiple": 64, "hidden_size": hidden, "num_layers": layers,
            "num_heads": hidden // head_size, "max_seq_len": max_seq_len, "dropout": 0.0}


CORE_MODEL_KEYS = ("hidden_size", "num_layers", "num_heads", "num_query_groups", "head_size", "ffn_size", "activation",
                   "norm", "position", "tied_embeddings", "bias", "vocab_multiple", "max_seq_len", "dropout")


def canonical_model(model: dict) -> dict:
    """The model as its identity: the resolved config's core fields and every other field off its default, so
    two dicts of one architecture match and a config option added later (with its default) changes nothing."""
    import dataclasses

    from megaclone.config import ModelConfig

    cfg = model_config_from_dict(model)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k in CORE_MODEL_KEYS or v != defaults.get(k)}


def widened(small: dict, factor: int = 2) -> dict:
    """The model a x`factor` HyperCloning of `small` builds, as a config dict (random init uses the same)."""
    wide = widen_model_config(model_config_from_dict(small), factor)
    return {k: getattr(wide, k) for k in ("vocab_size", "vocab_multiple", "hidden_size", "num_layers", "num_heads",
                                          "num_query_groups", "head_size", "ffn_size", "max_seq_len", "dropout")}


def train_section(scale: Scale, iters: int, lr: float, warmup: int, seed: int, **extra) -> dict:
    """Warmup then cosine to lr/10, AdamW (weight decay 0.1), clipping at 1: every run's shape."""
    return {"seed": seed, "micro_batch_size": scale.batch, "grad_accum_steps": 1, "train_iters": iters, "lr": lr,
            "min_lr": lr / 10, "warmup_iters": max(1, warmup), "weight_decay": 0.1, "grad_clip": 1.0,
            "precision": scale.precision, "eval_interval": scale.eval_interval, "eval_iters": scale.eval_iters,
            "log_interval": max(1, iters // 10), **extra}


@dataclass(frozen=True)
class RunSpec:
    slug: str  # readable part of the name, e.g. "d128-random-lr0.004-w100-s0"
    model: dict
    train: dict
    scale: Scale
    flags: tuple[str, ...] = ()  # launch flags, without the source path
    source: RunSpec | None = None  # the run whose checkpoint this one starts from
    source_flag: str = "--init-from"  # or "--load" (resume it)
    save: bool = False  # keep a checkpoint at the end (not part of the identity)

    def identity(self, corpus: str) -> dict:
        train = {k: v for k, v in self.train.items() if k != "log_interval"}
        return {"model": canonical_model(self.model), "train": train, "seq_len": self.scale.seq_len,
                "vocab": self.scale.vocab, "corpus": corpus, "flags": list(self.flags),
                "launcher": "python, 1 process, 1 thread",
                "source": None if self.source is None else [self.source_flag, self.source.name(corpus)]}

    def name(self, corpus: str) -> str:
        text = json.dumps(self.identity(corpus), sort_keys=True)
        return f"{self.slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


class OutOfTime(Exception):
    """Raised by `RunCache.ensure` when runs were left unstarted because the invocation's time is up."""


def finished(run_dir: Path) -> bool:
    try:
        return any(r.get("event") == "end" for r in read_metrics(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def write_config(path: Path, values: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


def launch(run_dir: Path, args: list[str], log_file: Path) -> tuple[float, float]:
    """One `launch/pretrain.py` process, niced, one torch thread (skipped when already finished); one retry.
    Returns (wall seconds, CPU seconds of the process), kept beside the run for a later reuse."""
    cost = run_dir / "cost.json"
    if finished(run_dir) and cost.is_file():
        print(f"  reuse {run_dir.name}", flush=True)
        return tuple(json.loads(cost.read_text()))
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--run-dir", str(run_dir), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):  # a run of hours should not die of one flaky launch
        if run_dir.exists():  # a run stopped part-way: its metrics would be appended to
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
        start = time.time()
        with open(log_file, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: os.nice(NICE))
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        wall, cpu = time.time() - start, usage.ru_utime + usage.ru_stime
        if proc.returncode == 0 and finished(run_dir):
            cost.write_text(json.dumps([wall, cpu]))
            return wall, cpu
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-30:])
        if attempt == 2:
            raise RuntimeError(f"run {run_dir} failed twice (exit {proc.returncode}); last lines of {log_file}:\n"
                               f"{tail}")
        log_file.rename(log_file.with_suffix(".failed.log"))
        print(f"  run {run_dir.name} failed (exit {proc.returncode}), retrying once", flush=True)
    raise AssertionError("unreachable")


def corpus_fingerprint(prefix: Path) -> str:
    """The tokenizer's and the training shard's sha256 (12 hex digits each): records of another corpus never match."""
    index = json.loads(Path(f"{prefix}_train.idx.json").read_text())
    digest = hashlib.sha256(Path(f"{prefix}_train.bin").read_bytes()).hexdigest()
    return f"tok{index['tokenizer_sha256'][:12]}-bin{digest[:12]}"


def load_average() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


def machine() -> str:
    gpu = "no GPU"
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {gpu}"


def machine_line(records: list[dict] | None = None) -> str:
    """The machine and its load, for a report: runs here are one niced process with one torch thread each. With
    `records`, the machines and 1-minute loads those runs were measured under (a report written from records)."""
    if not records:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        return (f"{machine()}; each run one process with one torch thread under nice -n {NICE}; load average at the "
                f"end {load} (the machine is shared with other jobs, so wall times are noisy)")
    loads = sorted(r["load_average_at_end"][0] for r in records)
    return (f"{', '.join(sorted({r['machine'] for r in records}))}; each run one process with one torch thread under "
            f"nice -n {NICE}; 1-minute load average at a run's end {loads[0]:g}-{loads[-1]:g} (median "
            f"{statistics.median(loads):g}): the cost is counted in CPU seconds, since wall times follow the load")


def git_commit_id() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


@dataclass
class RunCache:
    """Runs under `root`, records under `records`; `jobs` runs at a time; no run is started after `deadline`
    (a time.time() value) if its estimated wall time would pass it; `commit`: git-commit each record."""
    root: Path = ROOT / "runs" / "study"
    records: Path = RECORDS
    jobs: int = 1
    deadline: float | None = None
    commit: bool = False
    started: int = 0  # runs launched by this invocation
    cpu_seconds: float = 0.0  # their CPU time
    _lock: threading.RLock = field(default_factory=threading.RLock)  # held while a source checkpoint is trained
    _commit_lock: threading.Lock = field(default_factory=threading.Lock)
    _corpora: dict[int, str] = field(default_factory=dict)  # vocabulary -> corpus fingerprint

    def corpus(self, scale: Scale) -> tuple[Path, str]:
        """The bundled corpus tokenized at `scale.vocab` (built once, deterministic), and its fingerprint."""
        prefix = self.root / f"corpus_v{scale.vocab}" / "corpus"
        if scale.vocab not in self._corpora:
            if not Path(f"{prefix}_valid.idx.json").is_file():
                from megaclone.data import prepare_data

                prefix.parent.mkdir(parents=True, exist_ok=True)
                prepare_data(prefix, vocab_size=scale.vocab, seed=0, reuse=True)
            self._corpora[scale.vocab] = corpus_fingerprint(prefix)
        return prefix, self._corpora[scale.vocab]

    def name(self, spec: RunSpec) -> str:
        return spec.name(self.corpus(spec.scale)[1])

    def record(self, spec: RunSpec) -> dict | None:
        path = self.records / f"{self.name(spec)}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def checkpoint(self, spec: RunSpec) -> Path:
        """The checkpoint `spec` saved: trained (again) when runs/ does not hold it, then checked against its record."""
        run_dir = self.root / self.name(spec)
        with self._lock:  # two runs of one source must not train it twice at once
            if not (finished(run_dir) and (run_dir / "ckpt" / "latest").exists()):
                shutil.rmtree(run_dir, ignore_errors=True)
                self._train_source(replace(spec, save=True), run_dir)
        return run_dir / "ckpt"

    def _train_source(self, spec: RunSpec, run_dir: Path) -> None:
        recorded = self.record(spec)
        self._run(spec, write_record=recorded is None)  # runs started from the recorded source keep its record
        if recorded is not None:
            final = read_metrics(run_dir, "eval")[-1]["eval_loss"]
            if abs(final - recorded["loss"][-1]) > 1e-4:
                print(f"  WARNING: {run_dir.name} trained again ends at held-out {final:.5f}, its record at "
                      f"{recorded['loss'][-1]:.5f}: runs started from it now differ from the recorded ones",
                      flush=True)

    def ensure(self, specs: Iterable[RunSpec]) -> list[dict]:
        """The records of `specs`, training the missing ones (`jobs` at a time). Raises OutOfTime when the
        deadline left some unstarted; the ones that ran are recorded either way."""
        specs = list(specs)
        missing = list({self.name(s): s for s in specs if self.record(s) is None}.values())
        for source in {s.source.slug: s.source for s in missing if s.source is not None}.values():
            self.checkpoint(source)
        missing = [s for s in missing if self.record(s) is None]  # a source may be among them, now recorded
        skipped = []

        def one(spec: RunSpec) -> None:
            if self.deadline is not None and time.time() + self.estimate(spec) > self.deadline:
                skipped.append(spec.slug)
                return
            self._run(spec)

        with ThreadPoolExecutor(max(1, self.jobs)) as pool:
            list(pool.map(one, missing))
        if skipped:
            raise OutOfTime(f"{len(skipped)} runs not started (time is up): {', '.join(skipped)}")
        return [self.record(s) for s in specs]

    def estimate(self, spec: RunSpec) -> float:
        """Wall seconds `spec` should take: the slowest recorded wall time per step of runs of its width (under
        this machine's load), else 1 s per step."""
        width = spec.model["hidden_size"]
        per_step = [r["wall_seconds"] / r["steps_run"] for r in self.all_records()
                    if r["identity"]["model"]["hidden_size"] == width and r["steps_run"] > 0]
        return (max(per_step) if per_step else 1.0) * _steps_run(spec)

    def all_records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("*.json"))] if self.records.is_dir() \
            else []

    def _run(self, spec: RunSpec, write_record: bool = True) -> None:
        prefix, fingerprint = self.corpus(spec.scale)
        name = spec.name(fingerprint)
        run_dir = self.root / name
        cfg = {"model": spec.model, "parallel": {"tp_size": 1, "pp_size": 1, "zero_stage": 1}, "train": spec.train,
               "data": {"data_prefix": str(prefix), "seq_len": spec.scale.seq_len},
               "checkpoint": {"save": str(run_dir / "ckpt") if spec.save else "", "save_interval": 0}}
        args = ["--config", str(write_config(self.root / "configs" / f"{name}.yaml", cfg)), *spec.flags]
        if spec.source is not None:
            args += [spec.source_flag, str(self.checkpoint(spec.source))]
        with self._commit_lock:
            self.started += 1
        print(f"[{time.strftime('%H:%M:%S')}] run  {spec.slug} (load {load_average()[0]})", flush=True)
        wall, cpu = launch(run_dir, args, self.root / "logs" / f"{name}.log")
        record = {"name": name, **summarize_run(run_dir, spec.scale), "identity": spec.identity(fingerprint),
                  "cpu_seconds": round(cpu, 1), "wall_seconds": round(wall, 1), "load_average_at_end": load_average(),
                  "finished": time.strftime("%Y-%m-%d %H:%M"), "code": git_commit_id(),
                  "machine": machine()}
        path = self.records / f"{name}.json"
        if write_record:
            self.records.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=None, separators=(",", ":")) + "\n")
        with self._commit_lock:
            self.cpu_seconds += cpu
            if self.commit and write_record:
                _git_commit(path, f"speedup study: record {spec.slug} (held-out {record['loss'][-1]:.4f} after "
                                  f"{record['steps_run']} steps, {cpu:.0f} CPU s)")
        print(f"[{time.strftime('%H:%M:%S')}] done {spec.slug}: held-out {record['loss'][-1]:.4f}, {wall:.0f} s wall, "
              f"{cpu:.0f} s CPU", flush=True)


def _steps_run(spec: RunSpec) -> int:
    """Steps a run trains: all of them, less the source's when it carries or resumes the source's step count."""
    carried = spec.source is not None and ("--load" == spec.source_flag or "carry" in spec.flags)
    return spec.train["train_iters"] - (spec.source.train["train_iters"] if carried else 0)


def _git_commit(path: Path, message: str) -> None:
    """Commit one record, only that path (other staged work stays staged); a failure only warns."""
    for attempt in range(5):
        add = subprocess.run(["git", "add", "--", str(path)], cwd=ROOT, capture_output=True, text=True)
        done = subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], cwd=ROOT,
                              capture_output=True, text=True) if add.returncode == 0 else add
        if done.returncode == 0:
            return
        time.sleep(2 + attempt)  # another git command holds the index lock
    print(f"  WARNING: could not commit {path}: {done.stderr.strip()}", flush=True)


def summarize_run(run_dir: Path, scale: Scale) -> dict:
    """The compact record of a finished run: held-out loss (and copy asymmetry for clones) at every evaluation,
    steps counted from the run's start (the widening for a carried run), with the mean training loss since the
    previous evaluation beside it."""
    start = read_metrics(run_dir, "start")[0]
    model, first = start["config"]["model"], start["step"]
    evals = read_metrics(run_dir, "eval")
    train = read_metrics(run_dir, "train")
    train_loss, previous = [], first
    for e in evals:
        window = [t["loss"] for t in train if previous < t["step"] <= e["step"]]
        train_loss.append(round(statistics.fmean(window), 5) if window else None)
        previous = e["step"]
    asym = [round(1.0 - e["clone_similarity"], 6) if "clone_similarity" in e else None for e in evals]
    return {"steps": [e["step"] - first for e in evals], "loss": [round(e["eval_loss"], 5) for e in evals],
            "train_loss": train_loss, "asymmetry": asym if any(a is not None for a in asym) else None,
            "steps_run": start["config"]["train"]["train_iters"] - first, "tokens_per_step": scale.tokens_per_step,
            "num_params": start["num_params"],
            "flops_per_token": model_flops_per_token(start["num_params"], model["num_layers"], model["hidden_size"],
                                                     scale.seq_len)}


def tokens_to_reach(record: dict, target: float) -> float | None:
    """Tokens from which on the held-out curve stays at or below `target`: its last crossing down to it (linear
    between evaluations); 0.0 if it is never above; None if it ends above. A clone that starts below the target
    and rises above it after the widening has not reached the target until it comes back down for good."""
    tokens = [s * record["tokens_per_step"] for s in record["steps"]]
    points = list(zip(tokens, record["loss"]))
    above = [i for i, (_, loss) in enumerate(points) if loss > target]
    if not above:
        return 0.0
    i = above[-1]
    if i == len(points) - 1:
        return None
    (t0, l0), (t1, l1) = points[i], points[i + 1]
    return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)


def loss_at(record: dict, step: int) -> float:
    """Held-out loss at an evaluated step."""
    return record["loss"][record["steps"].index(step)]


@dataclass
class Sweep:
    """One hyperparameter over a x`factor` grid, on one seed; a best value at an edge of what was run is
    extended on that side (at most `max_extend` times per side, and never past `bounds`)."""
    make: Callable[[float], RunSpec]
    grid: tuple[float, ...]
    factor: float = 2.0
    max_extend: int = 3
    bounds: tuple[float, float] = (0.0, math.inf)
    records: dict[float, dict] = field(default_factory=dict)

    def next_values(self) -> list[float]:
        values = sorted({*self.grid, *self.records})
        todo = [v for v in values if v not in self.records]
        if todo:
            return todo
        best, lo, hi = self.best, values[0], values[-1]
        if best == lo and sum(v < min(self.grid) for v in values) < self.max_extend and lo / self.factor >= \
                self.bounds[0]:
            return [_round(lo / self.factor)]
        if best == hi and sum(v > max(self.grid) for v in values) < self.max_extend and hi * self.factor <= \
                self.bounds[1]:
            return [_round(hi * self.factor)]
        return []

    @property
    def best(self) -> float:
        return min(self.records, key=lambda v: self.records[v]["loss"][-1])

    @property
    def at_edge(self) -> bool:
        return self.best in (min(self.records), max(self.records))


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def run_sweeps(cache: RunCache, sweeps: Iterable[Sweep]) -> None:
    """Advance all sweeps together, one batch of runs per round (so `jobs` runs share the rounds)."""
    sweeps = list(sweeps)
    while True:
        todo = [(s, v) for s in sweeps for v in s.next_values()]
        if not todo:
            return
        for (s, v), rec in zip(todo, cache.ensure(s.make(v) for s, v in todo)):
            s.records[v] = rec


@dataclass
class SeededSweep:
    """A swept run type: its seed-0 sweep, then its best value on every seed."""
    sweep: Sweep
    seed_spec: Callable[[float, int], RunSpec]
    seeds: dict[int, dict] = field(default_factory=dict)

    @property
    def best(self) -> float:
        return self.sweep.best

    @property
    def records(self) -> dict[float, dict]:
        return self.sweep.records


def random_init(cache: RunCache, scale: Scale, model: dict, lrs: tuple[float, ...], seeds: tuple[int, ...] = (0,),
                iters: int = 2000, warmup_fraction: float = 0.05) -> SeededSweep:
    """Random init of `model`: its peak learning rate swept on seed 0 over `lrs` (extended at an edge), the best
    then run on `seeds`. The reusable baseline of the studies (records shared through the cache)."""
    result = SeededSweep(Sweep(lambda lr: random_spec(scale, model, lr, seeds[0], iters, warmup_fraction), lrs),
                         lambda lr, seed: random_spec(scale, model, lr, seed, iters, warmup_fraction))
    run_sweeps(cache, [result.sweep])
    specs = {seed: result.seed_spec(result.best, seed) for seed in seeds}
    result.seeds = dict(zip(specs, cache.ensure(specs.values())))
    return result


def random_spec(scale: Scale, model: dict, lr: float, seed: int, iters: int, warmup_fraction: float = 0.05) -> RunSpec:
    warmup = round(iters * warmup_fraction)
    return RunSpec(f"d{model['hidden_size']}L{model['num_layers']}-random-lr{lr:g}-w{warmup}-it{iters}-s{seed}", model,
                   train_section(scale, iters, lr, warmup, seed), scale)
