"""`raygpt bench`: the same model and global batch trained five ways, interleaved in one sitting.

  0  a bare PyTorch loop, the ceiling (raygpt.bench.bare): no DataLoader, no evals, no Ray
  a  the plain loop, no Ray:      raygpt train --no-ray          1 process x all threads
  b  raygpt, 1 Ray Train worker:  raygpt train                   1 worker x all threads
  c  raygpt, 2 Ray Train workers: raygpt train                   2 workers x half the threads each
  d  torchrun over the plain loop: torchrun --nproc_per_node 2 raygpt train --no-ray   2 x half
  e  row c with run.strategy=fsdp (FSDP2: weights, gradients, AdamW state sharded over the 2)
  f  row d with run.strategy=fsdp
(`--rows 0abcd` by default; `--rows cedf` compares the strategies, peak memory per worker included)

Each row is the command a user would type (Ray rows start their own local Ray unless --address is
given), so start-up time (launch to the first step) is what a user waits. Throughput leaves out
the first eval window (warm-up: compile, allocator, first iterations) and the evals themselves.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import yaml

from raygpt.errors import UserError
from raygpt.model import PRESETS
from raygpt.runs import read_metrics

# Bench shapes: the model preset (or sizes) and the global batch each trains with.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"model": {"preset": "tiny"}, "batch_size": 16},
    "small": {"model": {"embedding_dim": 384, "num_layers": 6, "num_heads": 6, "context_len": 256}, "batch_size": 8},
    "gpt2-small": {"model": {"preset": "gpt2-small"}, "batch_size": 8},
}
ROWS = {
    "0": "bare PyTorch loop",
    "a": "plain loop, no Ray",
    "b": "raygpt, 1 Ray worker",
    "c": "raygpt, 2 Ray workers",
    "d": "torchrun, 2 processes",
    "e": "raygpt, 2 Ray workers, fsdp",
    "f": "torchrun, 2 processes, fsdp",
}

# What each ratio says: raygpt's loop against PyTorch, Ray against raygpt's loop, Ray's DDP
# against torchrun's, fsdp against ddp.
RATIOS = {"a/0": ("a", "0"), "b/a": ("b", "a"), "c/d": ("c", "d"), "e/c": ("e", "c"), "f/d": ("f", "d")}


def bench_config(preset: str, steps: int, device: str, precision: str, compile_model: bool,
                 data_dir: str, storage: str) -> dict[str, Any]:
    shape = SHAPES[preset]
    context_len = shape["model"].get("context_len") or PRESETS[shape["model"]["preset"]]["context_len"]
    eval_tokens = shape["batch_size"] * context_len  # one global batch per split: evals stay short
    return {
        "model": {**shape["model"], "dropout": 0.0},
        "data": {"dir": data_dir},
        "train": {"batch_size": shape["batch_size"], "max_steps": steps, "eval_freq": max(1, steps // 4),
                  "eval_iter": 1, "eval_tokens": eval_tokens, "final_eval_tokens": eval_tokens,
                  "save_freq": steps, "precision": precision, "compile": compile_model, "start_context": "def "},
        "optim": {"warmup_steps": 1},
        "run": {"storage_path": storage, "use_gpu": device == "cuda", "num_to_keep": 1, "resource_wait_s": 120},
    }


def usable_threads() -> int:
    """The threads every row gets: this process's CPUs, and no more than a local Ray advertises (a
    container's CPU quota can be below os.cpu_count(): row b asking for all of them was refused)."""
    from raygpt.cluster import local_ray_cpus
    from raygpt.data.prepare import available_threads

    return max(1, min(available_threads(), local_ray_cpus()))


def row_command(row: str, config: str, name: str, threads: int, address: str | None) -> tuple[list[str], dict]:
    raygpt = [sys.executable, "-m", "raygpt", "train", "--config", config, "--set", f"run.name={name}"]
    half = max(1, threads // 2)
    env = dict(os.environ)
    if row == "0":  # writes its metric rows where the run folder of `name` would be
        return [sys.executable, "-m", "raygpt.bench.bare", config, name, str(threads)], env
    if row == "a":
        return raygpt + ["--no-ray", "--set", f"run.cpus_per_worker={threads}"], env
    strategy = ["--set", "run.strategy=fsdp"] if row in ("e", "f") else []
    if row in ("b", "c", "e"):
        workers, per = (1, threads) if row == "b" else (2, half)
        cmd = raygpt + strategy + ["--set", f"run.num_workers={workers}", "--set", f"run.cpus_per_worker={per}"]
        return cmd + (["--address", address] if address else []), env
    env["OMP_NUM_THREADS"] = str(half)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "raygpt"]
    return torchrun + raygpt[3:] + strategy + ["--no-ray", "--set", f"run.cpus_per_worker={half}"], env


def measure(rows: list[dict[str, Any]], launched: float) -> dict[str, float]:
    """Throughput over the eval windows after the first, mean MFU, and launch -> first step."""
    windows = [(b["step"] - a["step"], b) for a, b in zip(rows, rows[1:])]
    timed = windows[1:] or windows
    if not timed:
        raise UserError("the benchmark run reported no training window; give --steps >= 2")
    seconds = sum(n * r["step_time"] for n, r in timed)
    tokens = sum(n * r["step_time"] * r["tokens_per_s"] for n, r in timed)
    devices = round(timed[0][1]["tokens_per_s"] / timed[0][1]["tokens_per_s_per_device"])
    mfus = [r["mfu"] for _, r in timed if r.get("mfu") is not None]
    # Rank 0's peaks: one device's. The GPU's allocations when there is one, else the process's RSS.
    memory = [r.get("gpu_memory_peak_mb", r.get("cpu_rss_peak_mb")) for r in rows]
    return {"tokens_per_s": tokens / seconds, "tokens_per_s_per_device": tokens / seconds / devices,
            "mfu": statistics.mean(mfus) if mfus else None, "startup_s": rows[0]["wall_time"] - launched,
            "peak_memory_mb": max((m for m in memory if m is not None), default=None)}


def _refresh_cpu_peaks(precision: str, thread_counts: list[int]) -> None:
    """Probe the matmul peak at every thread count a row uses, before the rows: MFU in this
    sitting is against a peak measured on the machine as it is now (the cache keeps the best)."""
    import torch

    from raygpt.training import perf

    before = torch.get_num_threads()
    for n in thread_counts:
        torch.set_num_threads(n)
        print(f"  CPU matmul peak, {n} thread(s), {precision}: "
              f"{perf.cpu_peak(precision, refresh=True) / 1e9:,.0f} GFLOP/s")
    torch.set_num_threads(before)


def bench_train(preset: str = "tiny", device: str = "cpu", precision: str = "fp32", compile_model: bool = False,
                steps: int = 40, repeats: int = 2, data_dir: str = "data/stdlib", address: str | None = None,
                rows: str = "0abcd") -> dict[str, Any]:
    if preset not in SHAPES:
        raise UserError(f"--preset must be one of {', '.join(SHAPES)}, got {preset!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device on this machine")
        if torch.cuda.device_count() < 2:
            rows = "".join(r for r in rows if r not in "cdef")  # two workers need two GPUs
    threads = usable_threads()
    from raygpt.data.remote import prepare_to
    from raygpt.data.shards import has_manifest

    if not has_manifest(data_dir):
        prepare_to(data_dir, source="stdlib")
    if device == "cpu":
        _refresh_cpu_peaks(precision, sorted({threads, max(1, threads // 2)}))
    results: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as storage:
        config = os.path.join(storage, "bench.yaml")
        with open(config, "w") as f:
            yaml.safe_dump(bench_config(preset, steps, device, precision, compile_model,
                                        os.path.abspath(data_dir), storage), f)
        for round_ in range(repeats):
            for row in rows:  # interleaved: every row sees the machine in the same state
                name = f"{row}{round_}"
                cmd, env = row_command(row, config, os.path.join(storage, name) if row == "0" else name,
                                       threads, address)
                launched = time.time()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise UserError(f"bench row {row} ({ROWS[row]}) failed: {proc.stderr.strip().splitlines()[-1:]}")
                results[row].append(measure(read_metrics(os.path.join(storage, name)), launched))
                r = results[row][-1]
                print(f"  round {round_ + 1}/{repeats} {row} {ROWS[row]:<26} {r['tokens_per_s']:>10,.0f} tokens/s  "
                      f"start-up {r['startup_s']:.1f} s", flush=True)
    return print_table(results, preset, device, precision, compile_model, steps, repeats, threads)


def print_table(results: dict[str, list[dict[str, float]]], preset: str, device: str, precision: str,
           compile_model: bool, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    def median(row: str, key: str) -> float | None:
        values = [r[key] for r in results[row] if r[key] is not None]
        return statistics.median(values) if values else None

    out: dict[str, Any] = {"benchmark": "train", "preset": preset, "device": device, "precision": precision,
                           "compile": compile_model, "steps": steps, "repeats": repeats, "threads": threads}
    for row in results:
        out[row] = {"name": ROWS[row], **{k: median(row, k) for k in
                                          ("tokens_per_s", "tokens_per_s_per_device", "mfu", "startup_s",
                                           "peak_memory_mb")}}
    for ratio, (top, bottom) in RATIOS.items():
        have = top in results and bottom in results
        out[ratio] = round(out[top]["tokens_per_s"] / out[bottom]["tokens_per_s"], 3) if have else None
    print(f"train benchmark: {preset}, {device} {precision}{' compiled' if compile_model else ''}, {steps} steps, "
          f"median of {repeats} interleaved rounds, {threads} CPU threads")
    memory = "GPU MB" if device == "cuda" else "RSS MB"
    print(f"  {'':<3}{'':<26}{'tokens/s':>12}{'per device':>12}{'MFU':>8}{'start-up':>10}{memory:>10}")
    for row in results:
        r = out[row]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "n/a"
        print(f"  {row:<3}{r['name']:<26}{r['tokens_per_s']:>12,.0f}{r['tokens_per_s_per_device']:>12,.0f}"
              f"{mfu:>8}{r['startup_s']:>9.1f}s{mem:>10}")
    for ratio in RATIOS:
        print(f"  {ratio}: {out[ratio] if out[ratio] is not None else 'n/a'}")
    print(json.dumps(out))
    return out
