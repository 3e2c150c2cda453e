"""GPU check: GPT-2 small, context 1024, bf16, on one GPU: tokens/s and MFU of the training step.

Needs only torch and this package (no Ray, no YAML, no data set: token ids are drawn at random,
which costs the GPU exactly what real ones do). Each step is the training loop's own
`raygpt.training.step.train_step` (lr, per-step seed, autocast, backward, clip, non-finite check,
AdamW) with the loop's speed options (raygpt.training.speed): bf16 autocast, TF32, fused AdamW, SDPA
flash attention, torch.compile, the vocabulary padded to a multiple of 64. Its defaults are one
worker's share of jobs/gpt2-small.yaml (micro-batch 8, 4 accumulation steps, padding, compile), so
its MFU is the ceiling of that job's step on this GPU; without DDP or the DataLoader (`raygpt bench
--rows 0ab` adds those).

    python -m raygpt.bench.gpu_check                 # about 2-4 minutes on an H100/H200
    python -m raygpt.bench.gpu_check --no-compile --batch 16 --grad-accum 1 --steps 20
    python -m raygpt.bench.gpu_check --device cpu --preset tiny --steps 3   # a smoke run

Prints one line per measurement and a final JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch

from raygpt.model import PRESETS, GPTModel
from raygpt.training import perf, speed
from raygpt.training.step import step_seed, train_step


def build_parser() -> argparse.ArgumentParser:
    """The defaults are one worker's share of jobs/gpt2-small.yaml (tests/test_bench.py holds them
    to it): its micro-batch, accumulation, padded vocabulary and compile setting."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda")
    # train.precision's values (raygpt.config.PRECISIONS), written out: config needs PyYAML.
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (default 8 x 1024 tokens)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step (default 4)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first: compile, allocator (default 5)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--pad-vocab", type=int, default=64, help="pad the vocabulary to a multiple (1: off)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (use --device cpu for a smoke run)")
    precision = speed.resolve_precision(args.precision, device)
    speed.set_tf32(device, True)
    shape = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPTModel(**shape, dropout=0.0, pad_vocab_multiple=args.pad_vocab).to(device)
    optimizer = speed.adamw([{"params": list(model.parameters()), "weight_decay": 0.1}], 6e-4, (0.9, 0.95),
                               1e-8, fused=speed.fused_adamw(None, device))
    step_model = speed.maybe_compile(model, args.compile)
    t_len, vocab = shape["context_len"], model.cfg.vocabulary_size
    batch = torch.randint(0, vocab, (args.batch, t_len + 1), device=device)
    batches = itertools.repeat((batch[:, :-1], batch[:, 1:]))
    steps_done = itertools.count()

    def step() -> torch.Tensor:
        n = next(steps_done)
        return train_step(step_model, optimizer, batches, lr=6e-4, seed=step_seed(0, 0, n, 0), max_norm=1.0,
                          grad_accum_steps=args.grad_accum, device=device, precision=precision,
                          step_label=f"step {n + 1}").loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    sync()
    warmup_s = time.perf_counter() - t0
    first_loss = float(loss)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = args.steps * args.grad_accum * args.batch * t_len / seconds
    flops = perf.model_flops_per_token(model.cfg)
    peak = perf.device_peak(device, precision)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else perf.cpu_name(),
        "torch": torch.__version__, "preset": args.preset, "precision": precision, "compile": args.compile,
        "pad_vocab": args.pad_vocab, "batch": args.batch, "grad_accum": args.grad_accum, "context_len": t_len,
        "steps": args.steps,
        "parameters": model.num_parameters(), "flops_per_token": flops,
        "tokens_per_s": round(tokens_per_s, 1), "step_time_s": round(seconds / args.steps, 4),
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": round(perf.mfu(tokens_per_s, flops, peak), 4) if peak else None,
        "warmup_s": round(warmup_s, 1), "loss_first": round(first_loss, 3), "loss_last": round(float(loss), 3),
        **{k: round(v) for k, v in perf.peak_memory(device).items()},
    }
    assert math.isfinite(result["loss_last"]), "the loss is not finite"
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (GPU not in raygpt.training.perf.GPU_PEAKS)"
    print(f"{result['device']}: {args.preset} {precision} compile={args.compile} "
          f"batch {args.grad_accum}x{args.batch}x{t_len}: "
          f"{tokens_per_s:,.0f} tokens/s, {result['step_time_s'] * 1000:.0f} ms/step, MFU {mfu} "
          f"(warm-up {warmup_s:.0f} s, loss {first_loss:.2f} -> {result['loss_last']:.2f}), peak memory "
          + ", ".join(f"{k.removesuffix('_mb')} {v:,} MB" for k, v in result.items() if k.endswith("_mb")))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
