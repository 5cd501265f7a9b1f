"""Bench of the nightly bulk top-K job on CPU: `recllm infer` (mode nightly, multinomial scorer) for every user of
a seeded synthetic dataset (1,000,000 users by default, histories of 3-8 items over 2,000 items) with an untrained
tiny LLaMA over atomic item tokens. Prints the peak total RSS of the whole job (the infer process and every Ray
process of its session, each counted once, sampled every 0.5 s; PSS too, which counts shared pages once), users/s
and seconds, and checks one top-K row per user. Goal: peak RSS < 4 GB at 1M users.

    python bench/bulk_inference_memory.py                       # 1M users
    python bench/bulk_inference_memory.py --users 20000 --work-dir /tmp/bim   # keep (and reuse) the run folder

Users get no <user_N> tokens (ids.user_tokens=false): with them the vocabulary, and the tokenizer every replica
loads, grow with the user base (gigabytes per replica at 1M users), which is a model choice, not what this bench
measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.run_layout import RunLayout  # noqa: E402
from inference.topk_shards import SUCCESS  # noqa: E402
from launcher.cli import main  # noqa: E402
from trainers.export_model import MODEL_INFO  # noqa: E402

CONFIG = REPO / "configs" / "alignment_sft.yaml"


def write_synthetic_logs(folder: Path, users: int, items: int, seed: int) -> int:
    """Canonical Parquet (`data.format=parquet`): users 1..N, each 3-8 items drawn uniformly from 1..items, in
    order. Returns the number of interactions."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, users)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    total = int(lengths.sum())
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": np.repeat(np.arange(1, users + 1, dtype=np.int64), lengths),
                             "item_id": rng.integers(1, items + 1, total, dtype=np.int64),
                             "position": np.arange(total, dtype=np.int64) - starts}),
                   folder / "interactions.parquet")
    return total


def export_untrained_model(run_dir: Path) -> None:
    """A tiny LLaMA with the run's new tokens, saved as `recllm train` exports it (weights untrained)."""
    from launcher.config import load_config
    from trainers.models import build_model

    cfg = load_config(str(CONFIG), [f"run_dir={run_dir}"])
    layout = RunLayout(str(run_dir))
    tokens = layout.read_new_tokens()
    model, tokenizer = build_model(cfg.model, tokens, seed=1)
    model_dir = Path(layout.model)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (model_dir / MODEL_INFO).write_text(json.dumps({"step": 0}))


class JobMemory:
    """Samples the summed RSS and PSS of a process tree plus every process whose command line names
    ``marker`` (the job's Ray temp folder: raylet, GCS, workers, actors), each process once, and keeps the peak
    with a per-process breakdown."""

    def __init__(self, root: psutil.Process, marker: str, every_s: float = 0.5):
        self.root, self.marker, self.every_s = root, marker, every_s
        self.peak_rss = self.peak_pss = 0
        self.at_peak: dict[str, list[int]] = {}
        """Process kind -> [summed RSS, process count] in the sample with the highest total RSS."""
        self.samples = 0
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "JobMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _processes(self) -> dict[int, psutil.Process]:
        found = {}
        try:
            found = {p.pid: p for p in [self.root, *self.root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            if p.pid not in found and self.marker in " ".join(p.info["cmdline"] or ()):
                found[p.pid] = p
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for p in self._processes().values():
                try:
                    mem = p.memory_full_info()
                    kind = _kind(p, self.root)
                    cpu = p.cpu_times()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss, pss = rss + mem.rss, pss + mem.pss
                self._cpu[p.pid] = cpu.user + cpu.system
                by_kind[kind][0] += mem.rss
                by_kind[kind][1] += 1
            self.samples += 1
            self.peak_pss = max(self.peak_pss, pss)
            if rss > self.peak_rss:
                self.peak_rss, self.at_peak = rss, dict(by_kind)
            self._stop.wait(self.every_s)

    @property
    def cpu_seconds(self) -> float:
        """CPU time of every process seen, as last sampled (a process's final half second may be missed)."""
        return sum(self._cpu.values())


def _kind(p: psutil.Process, root: psutil.Process) -> str:
    """A short label: the infer driver, or the Ray process's title (ray::MapWorker(ShardWorker), raylet, ...)."""
    if p.pid == root.pid:
        return "driver (recllm infer)"
    cmd = p.cmdline()
    name = cmd[0].rsplit("/", 1)[-1] if cmd else p.name()
    if name.startswith("ray::"):
        return name.split(" ")[0]
    script = next((c.rsplit("/", 1)[-1] for c in cmd[1:3] if c.endswith(".py")), "")
    return f"{name} {script}".strip()


def run_job(args: argparse.Namespace, work: Path, overrides: list[str]) -> tuple[JobMemory, float, int]:
    """`recllm infer` in its own process and its own local Ray session, sampled while it runs."""
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster, never a shared one
    env.update(RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "launcher.cli", "infer", str(CONFIG), *overrides]
    log = open(work / "infer.log", "w")
    t0 = time.perf_counter()
    try:
        proc = psutil.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=(lambda: os.nice(args.nice)) if args.nice else None)
        with JobMemory(proc, ray_tmp) as memory:
            rc = proc.wait()
    finally:
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return memory, time.perf_counter() - t0, rc


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replicas", type=int, default=2, help="infer.num_replicas (one CPU thread each)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="infer.batch_size: users per forward pass (on CPU a larger one is no faster, and its "
                             "transient tensors leave more freed-but-kept heap in each replica)")
    parser.add_argument("--users-per-shard", type=int, default=8192, help="infer.users_per_shard")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the job (a shared machine); 0 leaves it")
    parser.add_argument("--goal-gb", type=float, default=4.0)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep the run folder here and reuse its dataset, item ids and model; default: a "
                             "temporary folder, removed afterwards")
    args = parser.parse_args(argv)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bulk_infer_"))
    raw, run_dir = work / "raw", work / "run"
    common = [f"run_dir={run_dir}", f"data.path={raw}", "data.format=parquet", "data.name=synthetic",
              "ids.scheme=atomic", "ids.user_tokens=false"]
    try:
        t0 = time.perf_counter()
        stamp = {"users": args.users, "items": args.items, "seed": args.seed}
        if not (work / "setup.json").exists() or json.loads((work / "setup.json").read_text()) != stamp:
            shutil.rmtree(raw, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            n = write_synthetic_logs(raw, args.users, args.items, args.seed)
            print(f"synthetic logs: {args.users:,} users, {n:,} interactions over {args.items:,} items")
            for stage in ("prepare", "build-ids"):
                if main([stage, str(CONFIG), *common]) != 0:
                    return 1
            export_untrained_model(run_dir)
            (work / "setup.json").write_text(json.dumps(stamp))
            print(f"setup: {time.perf_counter() - t0:.0f}s")
        layout = RunLayout(str(run_dir))
        shutil.rmtree(layout.topk, ignore_errors=True)  # score everyone: nothing to reuse

        overrides = [*common, "infer.mode=nightly", "infer.scorer=multinomial", f"infer.top_k={args.top_k}",
                     f"infer.batch_size={args.batch_size}", f"infer.users_per_shard={args.users_per_shard}",
                     f"infer.num_replicas={args.replicas}", "infer.cpus_per_replica=1"]
        memory, seconds, rc = run_job(args, work, overrides)
        if rc != 0:
            print((work / "infer.log").read_text()[-4000:], file=sys.stderr)
            print(f"recllm infer failed (exit {rc}); log: {work / 'infer.log'}", file=sys.stderr)
            return 1

        user_ids = pq.read_table(layout.topk, columns=["user_id"]).column("user_id").to_numpy()
        expected = layout.read_manifest()["counts"]["users"]
        summary = json.loads((Path(layout.topk) / SUCCESS).read_text())
        rows_ok = len(user_ids) == expected == len(np.unique(user_ids))
        gb = 1e9
        print(f"\nrecllm infer, {expected:,} users, multinomial, top-{args.top_k}, {args.replicas} replicas x "
              f"{args.threads} thread(s), batch {args.batch_size}, {args.users_per_shard} users/shard")
        processes = sum(count for _, count in memory.at_peak.values())
        print(f"peak RSS (sum over {processes} processes): {memory.peak_rss / gb:.2f} GB "
              f"(goal < {args.goal_gb} GB: {'met' if memory.peak_rss < args.goal_gb * gb else 'MISSED'}); "
              f"peak PSS {memory.peak_pss / gb:.2f} GB; {memory.samples} samples")
        for kind, (rss, count) in sorted(memory.at_peak.items(), key=lambda kv: -kv[1][0]):
            print(f"  {rss / gb:6.2f} GB  {count} x {kind}")
        print(f"job: {seconds:.1f}s end to end, {expected / seconds:,.0f} users/s; scoring phase "
              f"{summary['seconds']}s, {summary['users_per_second']:,} users/s; {memory.cpu_seconds:,.0f} CPU s, "
              f"{expected / memory.cpu_seconds:,.0f} users per CPU second")
        print(f"rows: {len(user_ids):,} ({'one per user' if rows_ok else 'WRONG: expected one per user'})")
        return 0 if rows_ok else 1
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main_bench())
