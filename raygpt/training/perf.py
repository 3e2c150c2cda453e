"""Throughput arithmetic: FLOPs per token, the device's peak, model FLOPs utilisation (MFU).

Only torch and the standard library: the GPU check (raygpt.bench.gpu_check) uses this with nothing else
installed.

FLOPs per token (forward + backward) follow the PaLM appendix / nanoGPT: 6N + 12·L·H·Q·T, where N
counts the parameters that take part in matmuls (attention and MLP weights and the output head; not
embeddings, LayerNorms or biases), L layers, H heads of size Q, context T. Peaks are dense (no
sparsity) per device: a table for common GPUs, and on CPU a short matmul probe, cached.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

# name fragment (as torch.cuda.get_device_name reports it) -> dense peak FLOP/s by precision.
# "tf32" is fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32).
GPU_PEAKS: dict[str, dict[str, float]] = {
    # Ordered: a name is matched against the fragments top to bottom as a whole word, so the
    # variants ("H100 NVL", "H100 PCIe") come before the plain name ("H100").
    "B200": {"bf16": 2250e12, "tf32": 1100e12},
    "GH200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},  # its Hopper GPU, as the H100 SXM
    "H200 NVL": {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 NVL": {"bf16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12},  # SXM / HBM3
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "tf32": 35e12, "fp32": 31.2e12},  # AWS g5: half the A10's tensor rate
    "A10": {"bf16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},  # no bf16 or tf32 tensor cores
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def matmul_params(embedding_dim: int, num_layers: int, vocabulary_size: int) -> int:
    """Weights that multiply activations: per layer qkv (3d²), out proj (d²), MLP (8d²); the head (dV)."""
    d = embedding_dim
    return num_layers * 12 * d * d + d * vocabulary_size


def flops_per_token(embedding_dim: int, num_layers: int, context_len: int, vocabulary_size: int) -> float:
    """Training FLOPs per token: 6N (matmuls, forward and backward) + 12·L·d·T (attention scores)."""
    n = matmul_params(embedding_dim, num_layers, vocabulary_size)
    return 6.0 * n + 12.0 * num_layers * embedding_dim * context_len


def model_flops_per_token(model_cfg: Any) -> float:
    """flops_per_token for anything with GPTConfig's fields (the real vocabulary, not the padded one)."""
    return flops_per_token(model_cfg.embedding_dim, model_cfg.num_layers, model_cfg.context_len,
                           model_cfg.vocabulary_size)


def gpu_peak(device_name: str, precision: str) -> float | None:
    """The table's peak for a GPU name and 'bf16' | 'tf32' | 'fp32', or None when unknown."""
    for fragment, peaks in GPU_PEAKS.items():
        if re.search(rf"\b{fragment}\b", device_name):  # "A10" is not "A10G", "L4" not "L40S", "H200" not "GH200"
            return peaks.get(precision) or (peaks.get("fp16") if precision == "bf16" else None)
    return None


def _cache_file() -> Path:
    return Path(os.environ.get("RAYGPT_CACHE") or "~/.cache/raygpt").expanduser() / "cpu_peak.json"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(precision: str = "fp32", seconds: float = 0.5, size: int = 1024) -> float:
    """Best FLOP/s of a square matmul on this process's torch threads (one warm-up first)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def cpu_peak(precision: str = "fp32", refresh: bool = False) -> float:
    """This machine's matmul peak at this thread count, probed on first use and cached on disk.
    `refresh` probes again (`raygpt bench` does, once per sitting); the cache keeps the best
    probe seen, so one probe slowed by a busy machine does not stay the peak."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|{precision}|torch={torch.__version__}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if refresh or key not in cached:
        cached[key] = max(cached.get(key, 0.0), measure_cpu_peak(precision))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: probe again next time
    return cached[key]


def device_peak(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device for `precision` ('bf16' | 'fp32'; fp32 on a GPU with TF32 on counts
    as tf32); `override_tflops` (run.peak_tflops) wins; None when a GPU is not in the table."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
            precision = "tf32"
        return gpu_peak(torch.cuda.get_device_name(device), precision)
    return cpu_peak(precision)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    return tokens_per_s_per_device * flops_per_token / peak if peak else None


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory of this process so far, in MiB: its resident set on the host (`ru_maxrss`)
    and, on a GPU, the most torch has held allocated on that device. What sizes a batch and a model
    before renting larger machines."""
    import resource

    out = {"cpu_rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        out["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
