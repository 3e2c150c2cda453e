"""Per-phase timings of one training step, raygpt's loop pieces against a bare loop's, on CPU.

The same model and batch as `raygpt bench --preset tiny` (or --preset small); each phase timed
with perf_counter over --steps steps (CPU work is synchronous), the variants interleaved step by
step so both see the machine in the same state:

    data       raygpt's DataLoader over WindowDataset (GlobalBatchSampler)  vs  slicing a memmap
    seed       torch.manual_seed(step_seed(...)) per step
    forward    model + cross-entropy
    backward
    clip       clip_grad_norm_ (the norm and the scaling)
    optimizer  AdamW foreach (raygpt's default on CPU before)  vs  fused
    zero_grad

    python -m raygpt.bench.profile_step --data data/stdlib --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from raygpt.bench.train import SHAPES
from raygpt.config import load_config
from raygpt.data.sampler import GlobalBatchSampler
from raygpt.data.shards import load_manifest, read_shard
from raygpt.data.windows import WindowDataset
from raygpt.model import GPTModel
from raygpt.training.step import step_seed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/stdlib")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.preset]
    overrides = [f"model.{k}={v}" for k, v in shape["model"].items()] + ["model.dropout=0.0"]
    m = load_config(None, overrides).model
    b, n = shape["batch_size"], m.context_len
    ds = WindowDataset(args.data, "train", n, n)
    loader = iter(DataLoader(ds, batch_size=b, sampler=GlobalBatchSampler(ds, b, 0, 1, 123), drop_last=True))
    manifest = load_manifest(args.data)
    tokens = read_shard(f"{args.data}/{manifest['splits']['train']['shards'][0]['file']}")
    rng, offsets = np.random.default_rng(0), np.arange(n + 1)
    torch.manual_seed(0)
    models = {fused: GPTModel.from_config(m) for fused in (False, True)}
    optimizers = {fused: torch.optim.AdamW(models[fused].parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
                  for fused in (False, True)}
    times: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name].append(time.perf_counter() - t0)
        return out

    def bare_batch():
        w = torch.from_numpy(tokens[rng.integers(0, len(tokens) - n - 1, size=b)[:, None] + offsets].astype(np.int64))
        return w[:, :-1], w[:, 1:]

    for step in range(args.steps + 2):
        for fused in (False, True):
            label = "fused" if fused else "raygpt"
            model, opt = models[fused], optimizers[fused]
            x, y = timed(f"data {label}", (lambda: bare_batch()) if fused else (lambda: next(loader)))
            timed(f"seed {label}", lambda: torch.manual_seed(step_seed(123, 0, step, 0)))
            loss = timed(f"forward {label}", lambda: F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
            timed(f"backward {label}", loss.backward)
            timed(f"clip {label}", lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item())
            timed(f"optimizer {label}", opt.step)
            timed(f"zero_grad {label}", lambda: opt.zero_grad(set_to_none=True))
    print(f"{args.preset}: batch {b} x {n}, {args.steps} steps after 2 warm-up, {args.threads} threads; median ms")
    print(f"  {'phase':<11}{'raygpt':>10}{'bare/fused':>12}")
    for phase in ("data", "seed", "forward", "backward", "clip", "optimizer", "zero_grad"):
        a, c = (statistics.median(times[f"{phase} {k}"][2:]) * 1000 for k in ("raygpt", "fused"))
        print(f"  {phase:<11}{a:>10.2f}{c:>12.2f}")
    total = {k: sum(statistics.median(v[2:]) for name, v in times.items() if name.endswith(k)) * 1000
             for k in ("raygpt", "fused")}
    print(f"  {'total':<11}{total['raygpt']:>10.1f}{total['fused']:>12.1f}")


if __name__ == "__main__":
    main()
