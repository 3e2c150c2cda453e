"""Prepare: text -> GPT-2 token shards (Arrow, uint16) + manifest.json, in a local folder.

`prepare_local` reads .txt / .jsonl ("text" field) / .parquet ("text" column) files, or the
Python standard library's own sources, joins documents with <|endoftext|>, tokenizes them on all
cores and writes one Arrow file per shard. The output folder appears only once complete (written
elsewhere, then renamed), so an interrupted prepare never leaves a folder that looks done.
`raygpt.data.remote.prepare_to` is what the command calls: this, or this then an upload when the
output is a storage URI.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raygpt import __version__, storage
from raygpt.data.shards import (
    MANIFEST,
    SPLITS,
    TOKENS_FORMAT_VERSION,
    file_sha256,
    foreign_files,
    load_manifest,
    own_files,
)
from raygpt.errors import UserError
from raygpt.tokenizer import EOT_ID, MAX_ENCODE_CHARS, gpt2_encoding, text_chunks

SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SHARD_TOKENS = 1 << 25  # 32 Mi tokens = 64 MiB per shard
WORK_UNIT_CHARS = 1 << 18  # texts batched per tokenizer task: fewer futures, still balanced
PROGRESS_LINE_S = 30.0  # a progress line this often when there is no terminal for a bar


def is_val_document(index: int, val_fraction: float) -> bool:
    """Deterministic whole-document split: every 1/val_fraction-th document goes to val, so val
    is spread over the whole corpus and is exactly floor(n * val_fraction) documents."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


# ----------------------------------------------------------------------------- inputs


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources (never imported), sorted by path; installed
    third-party packages under site-packages are not part of it."""
    root = stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        # Prune while walking: site-packages can hold far more files than the stdlib itself.
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted((p for p in files if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _not_regular(path: Path) -> str | None:
    """What `path` is when it is not a regular file (after symlinks), else None: a FIFO would
    block the read forever and a device such as /dev/zero never ends, so neither is opened."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return None
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return f"links to {kind}" if path.is_symlink() else f"is {kind}"


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand paths, folders (searched recursively) and globs to a sorted list of input files.

    An argument that exists is taken literally (a file named `br[1].txt` is that file); only one
    that does not is expanded as a glob. Only regular files are read: a FIFO or device named
    directly is refused, and one in a folder or glob is passed over like any other non-file."""
    files: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern) and not os.path.lexists(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                raise UserError(f"input glob matches no file: {pattern}")
        else:
            path = Path(pattern)
            if not path.exists():
                raise UserError(f"input path does not exist: {pattern}")
            if path.is_dir():
                matches = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
                if not matches:
                    raise UserError(f"input folder {pattern} holds no {'/'.join(SUFFIXES)} file")
            else:
                kind = _not_regular(path)
                if kind:
                    raise UserError(f"input {pattern} {kind}, not a regular file; give "
                                    f"{', '.join(SUFFIXES)} files or folders of them")
                matches = [path]
        for path in matches:
            if path.suffix not in SUFFIXES:
                raise UserError(f"unsupported input {path}: use {', '.join(SUFFIXES)} files")
        files.extend(matches)
    return list(dict.fromkeys(files))  # keep order, drop repeats


@dataclass
class ReadStats:
    bytes_read: int = 0
    replaced_files: set[str] = field(default_factory=set)
    digests: dict[Path, str] = field(default_factory=dict)  # sha256 of each file, taken while reading


def _decode(data: bytes, path: Path, stats: ReadStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.replaced_files.add(str(path))
        return data.decode("utf-8", errors="replace")


_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogates(text: str, path: Path, stats: ReadStats) -> str:
    """`text` with each lone surrogate (a JSON escape such as "\\ud800" that encodes no
    character; the tokenizer cannot encode it) replaced by U+FFFD, as undecodable bytes are."""
    if _SURROGATE.search(text) is None:
        return text
    stats.replaced_files.add(str(path))
    return _SURROGATE.sub("\ufffd", text)


def _parquet_texts(path: Path, pfile: pq.ParquetFile, stats: ReadStats) -> Iterator[list[str | None]]:
    """The 'text' column in batches; a damaged file (a corrupt page, a footer pointing nowhere)
    is a UserError naming it. Invalid UTF-8 in a string is replaced, as in a text file."""
    batches = pfile.iter_batches(batch_size=1024, columns=["text"])
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            column = batch.column(0)
            try:
                texts = column.to_pylist()
            except UnicodeDecodeError:  # pyarrow does not check the UTF-8 of a string column
                raw = column.cast(pa.large_binary()).to_pylist()
                texts = [None if b is None else _decode(b, path, stats) for b in raw]
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
        stats.bytes_read += column.nbytes
        yield texts


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_documents(path: Path, stats: ReadStats) -> Iterator[str]:
    """Yield the documents of one input file, streaming (parquet by row-group batches)."""
    if path.suffix == ".parquet":
        try:
            pfile = pq.ParquetFile(path)
            names = pfile.schema_arrow.names
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
        if "text" not in names:
            raise UserError(f"{path}: parquet file has no 'text' column (columns: {', '.join(names)})")
        kind = pfile.schema_arrow.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: parquet column 'text' holds {kind}, expected strings")
        stats.digests[path] = file_sha256(path)  # pyarrow reads the columns; hash the bytes apart
        for texts in _parquet_texts(path, pfile, stats):
            yield from (t for t in texts if t)
    elif path.suffix == ".jsonl":
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                stats.bytes_read += len(line)
                digest.update(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(_decode(line, path, stats))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise UserError(f"{path}:{lineno}: not valid JSON (nested too deeply)") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
                if record["text"]:
                    yield _no_surrogates(record["text"], path, stats)
        stats.digests[path] = digest.hexdigest()
    else:  # .txt, or .py from the stdlib: one file is one document
        data = path.read_bytes()
        stats.bytes_read += len(data)
        stats.digests[path] = hashlib.sha256(data).hexdigest()
        text = _decode(data, path, stats)
        if text:
            yield text


def fingerprint(
    files: list[Path], options: dict[str, Any], root: Path | None = None, digests: dict[Path, str] | None = None
) -> str:
    """sha256 over the options and each input's name and content hash (from `digests` when the
    files were hashed while being read, else hashed here)."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for path in files:
        name = path.relative_to(root).as_posix() if root else str(path.resolve())
        digest = digests[path] if digests is not None else file_sha256(path)
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- shards


def write_shard(path: Path, tokens: np.ndarray) -> None:
    # from_buffers wraps the array as it is; pa.array(ndarray) costs ~0.2 s of set-up on first use.
    column = pa.Array.from_buffers(pa.uint16(), len(tokens), [None, pa.py_buffer(np.ascontiguousarray(tokens))])
    batch = pa.RecordBatch.from_arrays([column], names=["tokens"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)  # one record batch: the reader maps it as one zero-copy array


class _SplitWriter:
    """Buffers token arrays of one split and writes a shard whenever `shard_tokens` are buffered."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += len(tokens)
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        joined = np.concatenate(self.buffer)
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        write_shard(self.folder / name, joined[:n])
        # Size and hash let a node verify its copy of a shard fetched from shared storage.
        self.shards.append({"file": name, "tokens": int(n), "bytes": (self.folder / name).stat().st_size,
                            "sha256": file_sha256(self.folder / name)})
        rest = joined[n:]
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict[str, Any]:
        if self.buffered:
            self._flush(self.buffered)
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def encode_document(text: str, max_chars: int = MAX_ENCODE_CHARS) -> np.ndarray:
    """GPT-2 ids of one document followed by <|endoftext|>, as uint16.

    `encode_to_numpy` with no special tokens allowed or disallowed gives the ids of
    `encode_ordinary` (a literal "<|endoftext|>" in the text is ordinary text) without building
    a Python list: on this corpus the list alone costs about a tenth of the time. A document
    longer than `max_chars` is encoded in chunks (`text_chunks`) to bound the tokenizer's memory.
    """
    encoding = gpt2_encoding()
    parts = [encoding.encode_to_numpy(chunk, disallowed_special=()) for chunk in text_chunks(text, max_chars)]
    out = np.empty(sum(len(p) for p in parts) + 1, dtype=np.uint16)  # one copy, into uint16
    start = 0
    for p in parts:
        out[start:start + len(p)] = p
        start += len(p)
    out[-1] = EOT_ID
    return out


def _encode_unit(texts: list[str]) -> list[np.ndarray]:
    return [encode_document(t) for t in texts]


def _work_units(documents: Iterator[str]) -> Iterator[list[str]]:
    unit: list[str] = []
    size = 0
    for text in documents:
        unit.append(text)
        size += len(text)
        if size >= WORK_UNIT_CHARS:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


def _tokenize_parallel(documents: Iterator[str], threads: int) -> Iterator[np.ndarray]:
    """Tokenize in order on `threads` threads (tiktoken releases the GIL), a bounded number of
    units in flight so a corpus larger than memory streams through."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: collections.deque = collections.deque()
        for unit in _work_units(documents):
            pending.append(pool.submit(_encode_unit, unit))
            if len(pending) >= 4 * threads:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# ----------------------------------------------------------------------------- prepare


def _check_windows(manifest: dict[str, Any], context_len: int) -> None:
    train_tokens = manifest["splits"]["train"]["tokens"]
    if train_tokens < context_len + 1:
        raise UserError(
            f"corpus too small: the train split has {train_tokens} tokens, one window needs "
            f"context_len + 1 = {context_len + 1}"
        )


def prepare_local(
    inputs: list[str] | None = None,
    out: str | Path = "data/stdlib",
    *,
    source: str | None = None,
    val_fraction: float = 0.1,
    context_len: int = 1024,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    threads: int | None = None,
    force: bool = False,
    progress: bool | None = None,
    log=print,
) -> dict[str, Any]:
    """Tokenize the inputs (or `source="stdlib"`) into `out`; return the manifest.

    A no-op when `out` already holds a prepare of the same inputs and options (unless `force`).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    for option, value in (("--context-len", context_len), ("--shard-tokens", shard_tokens)):
        if value <= 0:
            raise UserError(f"{option} must be > 0, got {value}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    threads = threads or available_threads()
    if source == "stdlib":
        if inputs:
            raise UserError("give either input paths or --source stdlib, not both")
        files, root = stdlib_files(), stdlib_root()
        described = f"stdlib (Python {sys.version.split()[0]}, {root})"
    elif source is not None:
        raise UserError(f"unknown --source {source!r}; the built-in source is 'stdlib'")
    elif not inputs:
        raise UserError("nothing to prepare: give input paths/globs or --source stdlib")
    else:
        files, root, described = resolve_inputs(inputs), None, ", ".join(inputs)
    if not files:
        raise UserError(f"empty corpus: no input files in {described}")

    out = Path(os.path.realpath(out))  # a symlinked --out: build where it points, the link stays
    options = {
        "format_version": TOKENS_FORMAT_VERSION, "tokenizer": "gpt2", "source": source or "files",
        "val_fraction": val_fraction, "shard_tokens": shard_tokens,
    }
    if source == "stdlib":
        options["python"] = sys.version
    _recover_interrupted_swap(out, log)
    old: dict[str, Any] | None = None
    if (out / MANIFEST).is_file():
        old = load_manifest(out)
        # Only an existing build needs the inputs hashed up front; a build hashes while reading.
        if not force and old.get("fingerprint") == fingerprint(files, options, root):
            _check_windows(old, context_len)
            log(f"{out} is up to date ({old['splits']['train']['tokens']:,} train tokens); nothing to do")
            return old
    elif out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a folder; choose another --out")
    foreign = _foreign_entries(out, old)
    if foreign and not force:
        # Never delete what raygpt did not write.
        what = "is not a raygpt data folder" if old is None else "holds files raygpt did not write"
        raise UserError(f"output {out} {what} ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                        f"choose another --out, or pass --force to write raygpt's files beside them")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        storage.remove_abandoned(out.parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=storage.temp_prefix(out.name), dir=out.parent))
    except OSError as exc:
        raise UserError(f"cannot write --out {out}: {exc.strerror} ({exc.filename or out.parent})") from None
    try:
        manifest = _tokenize_to(tmp, files, root, described, options, val_fraction, shard_tokens, threads, progress,
                                log)
        _check_windows(manifest, context_len)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if foreign:
            _replaceown_files(tmp, out, old, manifest)
        else:
            old_dir = out.parent / f".{out.name}.old-{socket.gethostname()}-{os.getpid()}"
            if out.exists():
                out.rename(old_dir)
            tmp.rename(out)
            shutil.rmtree(old_dir, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    secs = manifest["seconds"]
    total = train["tokens"] + val["tokens"]
    replaced = manifest["inputs"]["replaced_files"]
    log(
        f"prepared {train['documents'] + val['documents']:,} documents ({train['documents']:,} train / "
        f"{val['documents']:,} val), {total:,} tokens ({train['tokens']:,} / {val['tokens']:,}) in "
        f"{secs:.1f} s: {total / max(secs, 1e-9):,.0f} tokens/s, {threads} threads -> {out}"
        + (f"; undecodable bytes replaced in {replaced} file(s)" if replaced else "")
    )
    if val["tokens"] < context_len + 1:
        log(f"warning: the val split has {val['tokens']} tokens, fewer than one window of {context_len + 1}")
    return manifest


def _foreign_entries(out: Path, old: dict[str, Any] | None) -> list[str]:
    """What `out` holds that raygpt did not write (folders shown with a trailing /)."""
    if not out.is_dir():
        return []
    return foreign_files((e.name + ("/" if e.is_dir() else "") for e in out.iterdir()), old)


def _replaceown_files(new: Path, out: Path, old: dict[str, Any] | None, manifest: dict[str, Any]) -> None:
    """`--force` into a folder holding others' files: swap only raygpt's own files. The manifest
    goes first and comes back last, so an interruption leaves a folder that does not look done."""
    old_files, new_files = own_files(old), own_files(manifest) - {MANIFEST}
    clash = sorted(n for n in new_files if (out / n).exists() and n not in old_files)
    if clash:
        raise UserError(f"output {out} holds files named like raygpt's shards ({', '.join(clash[:3])}); "
                        f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for name in sorted(old_files - {MANIFEST}):
        (out / name).unlink(missing_ok=True)
    for name in sorted(new_files):
        os.replace(new / name, out / name)
    os.replace(new / MANIFEST, out / MANIFEST)


def _recover_interrupted_swap(out: Path, log) -> None:
    """A prepare killed between moving the old folder aside and moving the new one in leaves
    `out` missing and the old build at `.<out>.old-<host>-<pid>`: put it back."""
    if out.exists():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.old-{re.escape(socket.gethostname())}-(\d+)")
    for entry in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match and not storage.pid_alive(int(match[1])) and (entry / MANIFEST).is_file():
            entry.rename(out)
            log(f"restored {out} from an interrupted rebuild ({entry.name})")
            return


def _tokenize_to(
    folder: Path, files: list[Path], root: Path | None, described: str, options: dict[str, Any],
    val_fraction: float, shard_tokens: int, threads: int, progress: bool | None, log=print,
) -> dict[str, Any]:
    """Tokenize `files` into shards in `folder`: a progress bar on a terminal, a line every
    PROGRESS_LINE_S seconds when not (a job's log, a pipe)."""
    from tqdm import tqdm

    start = time.perf_counter()
    stats = ReadStats()
    total_bytes = sum(p.stat().st_size for p in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
               disable=None if progress is None else not progress, file=sys.stderr)

    def documents() -> Iterator[str]:
        for path in files:
            before = stats.bytes_read
            yield from read_documents(path, stats)
            bar.update(path.stat().st_size if path.suffix == ".parquet" else stats.bytes_read - before)

    writers = {split: _SplitWriter(folder, split, shard_tokens) for split in SPLITS}
    count, tokens_done, last_line = 0, 0, start
    for count, tokens in enumerate(_tokenize_parallel(documents(), threads), start=1):
        split = "val" if is_val_document(count - 1, val_fraction) else "train"
        writers[split].add(tokens)
        tokens_done += len(tokens)
        now = time.perf_counter()
        if not bar.disable and now - last_line >= 1.0:
            last_line = now
            bar.set_postfix_str(f"{tokens_done / (now - start):,.0f} tokens/s", refresh=False)
        elif bar.disable and now - last_line >= PROGRESS_LINE_S:
            last_line = now
            log(f"prepare: {stats.bytes_read / 1e6:,.1f} of {total_bytes / 1e6:,.1f} MB read, {tokens_done:,} tokens, "
                f"{tokens_done / (now - start):,.0f} tokens/s")
    bar.close()
    if count == 0:
        raise UserError(f"empty corpus: no text in {described}")
    return {
        "format": "raygpt-tokens", "format_version": TOKENS_FORMAT_VERSION, "raygpt_version": __version__,
        "tokenizer": "gpt2", "n_vocab": 50257, "eot_id": EOT_ID, "dtype": "uint16",
        "options": options, "source": described,
        "fingerprint": fingerprint(files, options, root, stats.digests),
        "inputs": {"files": len(files), "bytes": total_bytes, "replaced_files": len(stats.replaced_files)},
        "splits": {split: w.close() for split, w in writers.items()},
        "seconds": round(time.perf_counter() - start, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- windows


