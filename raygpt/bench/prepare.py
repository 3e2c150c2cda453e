"""`raygpt bench prepare`: prepare's tokens/s against a single-threaded encode loop, interleaved."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from raygpt.data.prepare import (
    ReadStats,
    available_threads,
    prepare_local,
    read_documents,
    stdlib_files,
)
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
    manifest = prepare_local(source="stdlib", out=out, threads=threads, force=True, progress=False, log=lambda *_: None)
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
    print(f"  {f'raygpt prepare ({threads} threads, incl. read+write)':<44}"
          f"{result['prepare_tokens_per_s']:>14,} tokens/s")
    print(f"  {'ratio prepare / loop':<44}{result['ratio']:>14.2f}x")
    print(json.dumps(result))
    return result


