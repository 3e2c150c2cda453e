"""Benchmarks that print figures (never tests with time limits: the machines are shared and noisy)."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from raygpt.data import ReadStats, available_threads, prepare, read_documents, stdlib_files
from raygpt.tokenizer import gpt2_encoding


def _encode_loop(documents: list[str]) -> tuple[int, float]:
    """The baseline: one thread, `encode_ordinary` per document, over texts already in memory."""
    enc = gpt2_encoding()
    start = time.perf_counter()
    tokens = sum(len(enc.encode_ordinary(text)) + 1 for text in documents)  # +1: the <|endoftext|>
    return tokens, time.perf_counter() - start


def _prepare_once(out: Path, threads: int) -> tuple[int, float]:
    """`raygpt prepare --source stdlib --force` as a user runs it: read, hash, tokenize, write shards."""
    start = time.perf_counter()
    manifest = prepare(source="stdlib", out=out, threads=threads, force=True, progress=False, log=lambda *_: None)
    seconds = time.perf_counter() - start
    return sum(s["tokens"] for s in manifest["splits"].values()), seconds


def bench_prepare(repeats: int = 2, threads: int | None = None) -> dict:
    """Tokens/s of `raygpt prepare` on the default corpus against a single-threaded encode loop
    over the same documents, interleaved in one sitting; prints a table and one JSON line."""
    threads = threads or available_threads()
    stats = ReadStats()
    documents = [text for path in stdlib_files() for text in read_documents(path, stats)]
    corpus_mb = stats.bytes_read / 1e6
    gpt2_encoding().encode_ordinary("warm up")  # load the ranks outside the timings
    base, prep = [], []
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as tmp:
        for _ in range(repeats):
            n_base, s_base = _encode_loop(documents)
            n_prep, s_prep = _prepare_once(Path(tmp) / "stdlib", threads)
            base.append(n_base / s_base)
            prep.append(n_prep / s_prep)
    if n_base != n_prep:
        raise RuntimeError(f"token counts differ: loop {n_base} vs prepare {n_prep}")
    result = {
        "benchmark": "prepare",
        "corpus": "stdlib",
        "documents": len(documents),
        "corpus_mb": round(corpus_mb, 1),
        "tokens": n_prep,
        "threads": threads,
        "repeats": repeats,
        "baseline_tokens_per_s": round(statistics.median(base)),
        "prepare_tokens_per_s": round(statistics.median(prep)),
        "ratio": round(statistics.median(prep) / statistics.median(base), 3),
    }
    print(f"prepare benchmark: {len(documents):,} stdlib documents, {corpus_mb:.1f} MB, {n_prep:,} tokens, "
          f"median of {repeats} interleaved runs")
    print(f"  {'single-thread encode_ordinary loop':<44}{result['baseline_tokens_per_s']:>14,} tokens/s")
    print(f"  {f'raygpt prepare ({threads} threads, incl. read+write)':<44}{result['prepare_tokens_per_s']:>14,} tokens/s")
    print(f"  {'ratio prepare / loop':<44}{result['ratio']:>14.2f}x")
    print(json.dumps(result))
    return result


def _tune_bench_search(storage: str, data_dir: str) -> dict:
    """16 configurations (the seed's peak_lr x batch_size x warmup_steps), a small GPT on the
    default corpus, 54 steps each; ASHA with reduction factor 3 (rungs at 6, 18, 54 steps)."""
    return {
        "schema_version": 1,
        "model": {"embedding_dim": 64, "num_layers": 2, "num_heads": 2, "context_len": 64, "dropout": 0.0},
        "data": {"dir": data_dir},
        "train": {"batch_size": 8, "max_steps": 54, "eval_freq": 6, "eval_iter": 4, "save_freq": 54, "seed": 123},
        "optim": {"peak_lr": 0.003, "initial_lr": 0.0001, "min_lr": 0.0001, "warmup_steps": 2},
        "run": {"storage_path": storage, "num_workers": 1, "num_to_keep": 1},
        "search": {"optim.peak_lr": {"grid": [0.0003, 0.001, 0.003, 0.01]}, "train.batch_size": {"grid": [8, 16]},
                   "optim.warmup_steps": {"grid": [2, 10]}},
        "tune": {"metric": "val_loss", "time_attr": "step", "grace_period": 6, "reduction_factor": 3,
                 "max_concurrent_trials": 2},
    }


def bench_tune(address: str | None = None, data_dir: str = "data/stdlib") -> dict:
    """The same 16-configuration grid run to the end, then with ASHA, in one sitting: tokens
    trained, wall time, the winners and the gap between their val losses."""
    from raygpt.analysis import analyze
    from raygpt.tune import parse_search, run_search

    if not os.path.isfile(os.path.join(data_dir, "manifest.json")):
        prepare(source="stdlib", out=data_dir)
    out: dict = {"benchmark": "tune", "configurations": 16, "reduction_factor": 3}
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-tune-") as storage:
        raw = _tune_bench_search(storage, data_dir)
        for label, early in (("full_grid", False), ("asha", True)):
            raw["tune"]["early_stopping"], raw["tune"]["name"] = early, label
            start = time.perf_counter()
            experiment = run_search(parse_search(dict(raw)), address=address, log=lambda *a: None)
            seconds = time.perf_counter() - start
            a = analyze(experiment)
            best = a.rows[0]
            out[label] = {"tokens": a.tokens_trained, "wall_s": round(seconds, 1),
                          "best_val_loss": round(best["best_val_loss"], 4),
                          "best": {k: best[k] for k in a.varied},
                          "stopped_early": sum(r["stopped_early"] for r in a.rows)}
    full, asha = out["full_grid"], out["asha"]
    out["token_ratio"] = round(asha["tokens"] / full["tokens"], 3)
    out["same_best"] = asha["best"] == full["best"]
    out["val_loss_gap"] = round((asha["best_val_loss"] - full["best_val_loss"]) / full["best_val_loss"], 4)
    print("tune benchmark: 16 configurations, 1 worker each, 2 at a time, ASHA reduction factor 3")
    for label in ("full_grid", "asha"):
        r = out[label]
        print(f"  {label:<10} tokens {r['tokens']:>10,}  wall {r['wall_s']:>7.1f} s  best val {r['best_val_loss']:.4f}"
              f"  stopped early {r['stopped_early']:>2}  best {r['best']}")
    print(f"  ASHA / full grid tokens: {out['token_ratio']:.2f} (goal <= 0.40); same winner: {out['same_best']}; "
          f"winner's val loss {out['val_loss_gap']:+.2%} vs the full grid's best (goal within 1%)")
    print(json.dumps(out))
    return out
