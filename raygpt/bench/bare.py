"""Row 0 of `raygpt bench`: a bare PyTorch loop of the same model and global batch, the ceiling.

No Ray, no DataLoader, no checkpoints, no evals: random windows cut from the memory-mapped train
split, fused AdamW at the config's peak lr, clipping at 1.0.
It times the same windows of steps as the other rows (`eval_freq` steps each) and writes them as
metric rows, so `raygpt bench` measures all rows alike.

    python -m raygpt.bench.bare CONFIG RUN_FOLDER THREADS
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from raygpt import runs
from raygpt.config import load_config
from raygpt.data.shards import load_manifest, read_shard
from raygpt.model import GPTModel
from raygpt.training import perf, speed
from raygpt.training.runtime import process_device


def bare_loop(config: str, run_dir: str, threads: int) -> None:
    cfg = load_config(config, [])
    torch.set_num_threads(threads)
    t, m = cfg.train, cfg.model
    device = process_device(cfg.run.use_gpu, 0, torch.cuda.device_count())  # no silent CPU row on a GPU bench
    precision = speed.resolve_precision(t.precision, device)
    speed.set_tf32(device, t.tf32)
    manifest = load_manifest(cfg.data.dir)
    shards = [read_shard(os.path.join(cfg.data.dir, s["file"])) for s in manifest["splits"]["train"]["shards"]]
    tokens = shards[0] if len(shards) == 1 else np.concatenate(shards)
    torch.manual_seed(t.seed)
    model = GPTModel.from_config(m).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.peak_lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
    model = speed.maybe_compile(model, t.compile)
    b, n = t.batch_size, m.context_len
    generator = np.random.default_rng(t.seed)
    offsets = np.arange(n + 1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        starts = generator.integers(0, len(tokens) - n - 1, size=b)
        windows = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))
        return windows[:, :-1].to(device), windows[:, 1:].to(device)

    flops, peak = perf.model_flops_per_token(m), perf.device_peak(device, precision, cfg.run.peak_tflops)
    window = max(1, t.eval_freq)
    rows = [{"step": 0, "wall_time": time.time(), "step_time": 0.0, "tokens_per_s": 0.0,
             "tokens_per_s_per_device": 0.0, "mfu": None}]
    total = t.max_steps or window
    model.train()
    for first in range(0, total, window):
        steps = min(window, total - first)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = batch()
            with speed.autocast(device, precision):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        seconds = time.perf_counter() - t0
        tokens_per_s = steps * b * n / seconds
        rows.append({"step": first + steps, "wall_time": time.time(), "step_time": seconds / steps,
                     "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s,
                     "mfu": perf.mfu(tokens_per_s, flops, peak), "loss": loss.item(), **perf.peak_memory(device)})
    runs.write_log(run_dir, rows)


if __name__ == "__main__":
    bare_loop(sys.argv[1], sys.argv[2], int(sys.argv[3]))
