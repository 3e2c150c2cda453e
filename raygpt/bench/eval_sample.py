"""Eval sample size: how close the loop's spread val estimate comes to the whole val split, and its cost.

    .venv/bin/python -m raygpt.bench.eval_sample --checkpoint runs/evalcheck --data data/stdlib
    .venv/bin/python -m raygpt.bench.eval_sample --prepare-prose data/prose     # English prose corpus

It loads a checkpoint (a checkpoint_* folder, or the newest one in a run folder) and scores every
non-overlapping val window once: the whole split's loss. Then for each --tokens size it prints
the loop's estimate (the mean over the windows `raygpt.training.evaluation.spread_windows` picks, the same
windows the loop reads with `train.eval_tokens` of that size), its error against the whole split,
and the eval time per split: timed with the loop's own `evaluate` up to --time-max tokens, above
that from the whole pass's throughput (marked ~). Also: the original recipe's first-N-batches
figure (the first eval_iter x batch_size / grad_accum_steps windows, in order) and the run's own
final reported val loss. The per-window losses are cached beside the run (eval_sample/*.npy).

--prepare-prose DIR prepares the second corpus: the 79 documents of `pydoc_data.topics` (Python's
reference documentation, English prose, ~465 KB, shipped with Python) into DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raygpt.data.prepare import prepare_local
from raygpt.data.windows import WindowDataset
from raygpt.generate import load_model, resolve_checkpoint
from raygpt.runs import METRICS_FILE
from raygpt.training import speed
from raygpt.training.evaluation import eval_window_count, evaluate, spread_windows
from raygpt.training.runtime import Runtime

TOKENS = (4096, 8192, 16384, 32768, 65536, 131072, 262144)


def prepare_prose(out: str, val_fraction: float) -> None:
    from pydoc_data.topics import topics

    with tempfile.TemporaryDirectory(prefix="raygpt-prose-") as src:
        for i, key in enumerate(sorted(topics)):
            Path(src, f"{i:03d}-{key}.txt").write_text(topics[key])
        prepare_local([src], out, val_fraction=val_fraction, context_len=128, progress=False)


@torch.no_grad()
def window_losses(model: torch.nn.Module, ds: WindowDataset, batch: int, precision: str) -> np.ndarray:
    """The loss of every window of `ds` (mean over its tokens), as the loop's `evaluate` computes it."""
    device = torch.device("cpu")
    out = np.empty(len(ds), dtype=np.float64)
    for start in range(0, len(ds), batch):
        xs, ys = zip(*(ds[i] for i in range(start, min(start + batch, len(ds)))))
        with speed.autocast(device, precision):
            losses = F.cross_entropy(model(torch.stack(xs)).flatten(0, 1), torch.stack(ys).flatten(), reduction="none")
        out[start:start + len(xs)] = losses.float().view(len(xs), -1).mean(dim=1).double().numpy()
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint_* folder, or a run folder (its newest checkpoint)")
    p.add_argument("--data", help="the prepared data folder the run trained on")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), help="eval_tokens sizes to estimate")
    p.add_argument("--time-max", type=int, default=32768, help="time evals up to this many tokens (default 32768)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the default job's CPUs)")
    p.add_argument("--batch", type=int, help="windows per forward pass (default: the run's micro-batch)")
    p.add_argument("--prepare-prose", metavar="DIR", help="prepare the pydoc-topics prose corpus into DIR, then exit")
    p.add_argument("--val-fraction", type=float, default=0.3, help="for --prepare-prose (default 0.3)")
    args = p.parse_args(argv)
    if args.prepare_prose:
        prepare_prose(args.prepare_prose, args.val_fraction)
        return {}
    if not (args.checkpoint and args.data):
        p.error("give --checkpoint and --data (or --prepare-prose DIR)")
    torch.set_num_threads(args.threads)

    folder = resolve_checkpoint(args.checkpoint)[0]
    model, state = load_model(folder)
    cfg = state["config"]
    t, ctx = cfg["train"], cfg["model"]["context_len"]
    precision = speed.resolve_precision(t["precision"], torch.device("cpu"))
    batch = args.batch or t["batch_size"] // (cfg["run"]["num_workers"] * t["grad_accum_steps"])
    ds = WindowDataset(args.data, "val", ctx, ctx)
    n = len(ds)

    cache = Path(folder).parent / "eval_sample" / f"{Path(folder).name}-val.npy"
    if cache.is_file():
        losses, whole_seconds = np.load(cache), json.loads(cache.with_suffix(".json").read_text())["seconds"]
    else:
        t0 = time.perf_counter()
        losses = window_losses(model, ds, batch, precision)
        whole_seconds = time.perf_counter() - t0
        cache.parent.mkdir(exist_ok=True)
        np.save(cache, losses)
        cache.with_suffix(".json").write_text(json.dumps({"seconds": whole_seconds}))
    whole = float(losses.mean())
    per_window = whole_seconds / n
    print(f"{folder}: step {state['step']}, val split {ds.num_tokens:,} tokens = {n:,} windows of {ctx}; "
          f"{args.threads} threads, batch {batch}, {precision}")
    print(f"whole val split: {whole:.4f} ({whole_seconds:.1f} s, {n * ctx / whole_seconds:,.0f} tokens/s)")

    rows = []
    print(f"{'eval_tokens':>11} {'windows':>7} {'estimate':>8} {'error':>7} {'eval s/split':>12}")
    for tokens in args.tokens:
        windows = spread_windows(n, eval_window_count(tokens, ctx, n))
        estimate = float(losses[windows].mean())
        if tokens <= args.time_max:
            model.train()  # as the loop hands it over; evaluate() switches to eval mode and back
            t0 = time.perf_counter()
            timed, _ = evaluate(model, ds, windows, batch, Runtime(), precision)
            seconds, measured = time.perf_counter() - t0, True
            assert abs(timed - estimate) <= 1e-5 * abs(estimate), (timed, estimate)
        else:
            seconds, measured = len(windows) * per_window, False
        rows.append({"eval_tokens": tokens, "windows": len(windows), "estimate": estimate,
                     "rel_error": estimate / whole - 1, "seconds": seconds, "timed": measured})
        print(f"{tokens:>11,} {len(windows):>7,} {estimate:>8.4f} {estimate / whole - 1:>+7.2%} "
              f"{'' if measured else '~'}{seconds:>11.1f}")
    first_n = min(n, t["eval_iter"] * t["batch_size"] // t["grad_accum_steps"])
    first = float(losses[:first_n].mean())
    print(f"original recipe (first {t['eval_iter']} batches = first {first_n} windows, {first_n * ctx:,} tokens): "
          f"{first:.4f} ({first / whole - 1:+.2%})")

    result = {"checkpoint": folder, "step": state["step"], "val_tokens": ds.num_tokens, "val_windows": n,
              "whole": whole, "whole_seconds": whole_seconds, "spread": rows,
              "first": {"windows": first_n, "loss": first, "rel_error": first / whole - 1}}
    log = Path(folder).parent / METRICS_FILE
    if log.is_file():
        reported = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        final = [r for r in reported if "event" not in r and r["step"] == state["step"]]
        if final:
            r = final[-1]
            result["reported"] = {k: r.get(k) for k in ("val_loss", "eval_tokens", "eval_time", "final_eval")}
            print(f"the run reported at step {r['step']}: val {r['val_loss']:.4f} ({r['val_loss'] / whole - 1:+.2%}) "
                  f"over {r.get('eval_tokens', 0):,} tokens, eval {r.get('eval_time', 0):.1f} s (train + val)"
                  + (" [final eval]" if r.get("final_eval") else ""))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
