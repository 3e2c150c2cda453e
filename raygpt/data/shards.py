"""Prepared token data at rest: the manifest (what a prepared folder holds), its checks, and
reading a shard.

A prepared folder holds one Arrow file of uint16 GPT-2 ids per shard and `manifest.json`, written
last: a folder with a manifest is complete. Everything here only reads; `raygpt.data.prepare`
writes such folders.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from raygpt import storage
from raygpt.errors import UserError

TOKENS_FORMAT_VERSION = 1  # of the manifest and shards; a newer one is refused by an older raygpt
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_shard(path: Path | str) -> np.ndarray:
    """Memory-map one shard and return its tokens as a read-only uint16 array (no copy)."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    if reader.num_record_batches != 1:
        raise UserError(f"shard {path} has {reader.num_record_batches} record batches, expected 1")
    return reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)


def has_manifest(folder: str | Path) -> bool:
    """Whether a prepared folder (local, NFS, or a storage URI) is complete: it has its manifest."""
    uri = storage.join(str(folder), MANIFEST)
    return storage.exists(uri) if storage.is_uri(str(folder)) else os.path.isfile(uri)


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a prepared folder: local, NFS, or a storage URI (s3://, gs://, file://)."""
    if not has_manifest(folder):
        raise UserError(f"no {MANIFEST} in {folder}: run `raygpt prepare` to build the token shards first")
    uri = storage.join(str(folder), MANIFEST)
    try:
        manifest = json.loads(storage.read_text(uri) if storage.is_uri(str(folder)) else Path(uri).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{uri} is not a raygpt manifest (not JSON: {exc})") from None
    check_manifest_layout(manifest, uri)
    return manifest


_SHARD_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_manifest_layout(manifest: Any, where: str) -> None:
    """The manifest's shape, before any of it is used: a mapping with both splits, each listing
    shards whose file names are plain names inside the folder (a name such as
    `../../x.arrow` would be read, or written into a cache, outside it)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise UserError(f"{where} is not a raygpt manifest: expected a mapping with 'splits'")
    for split in SPLITS:
        section = manifest["splits"].get(split)
        shards = section.get("shards") if isinstance(section, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise UserError(f"{where}: splits.{split}.shards must be a list of shard entries")
        for entry in shards:
            name = entry.get("file")
            if not isinstance(name, str) or not _SHARD_FILE.fullmatch(name):
                raise UserError(f"{where}: shard file {name!r} in splits.{split} must be a plain file name "
                                f"(letters, digits, '.', '_', '-'; no path)")
            for key in ("tokens", "bytes"):
                if (key in entry or key == "tokens") and not _is_count(entry.get(key)):
                    raise UserError(f"{where}: shard {name} {key} must be a whole number >= 0, got {entry.get(key)!r}")
    files = [entry["file"] for split in SPLITS for entry in manifest["splits"][split]["shards"]]
    twice = sorted({name for name in files if files.count(name) > 1})
    if twice:
        raise UserError(f"{where}: shard {twice[0]} is listed twice (each shard belongs to one split, once)")
    for split in SPLITS:
        for entry in manifest["splits"][split]["shards"]:
            if "bytes" in entry and 2 * entry["tokens"] > entry["bytes"]:  # uint16: 2 bytes per token at least
                raise UserError(f"{where}: shard {entry['file']} claims {entry['tokens']:,} tokens in "
                                f"{entry['bytes']:,} bytes; a uint16 shard holds at most half as many")
    for split in SPLITS:  # the counts, once every split's shape and names are known good
        total = manifest["splits"][split].get("tokens")
        if not _is_count(total) or total != sum(e["tokens"] for e in manifest["splits"][split]["shards"]):
            raise UserError(f"{where}: splits.{split}.tokens {total!r} is not the sum of its shards' tokens")
    if not isinstance(manifest.get("fingerprint", ""), str):
        raise UserError(f"{where}: fingerprint must be a string, got {manifest['fingerprint']!r}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def shard_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for split in SPLITS for s in manifest["splits"][split]["shards"]]


def shard_problem(folder: Path, manifest: dict[str, Any], full: bool = True) -> str | None:
    """What is wrong with the shards in `folder` against the manifest, or None. `full` checks
    content hashes; otherwise only sizes (cheap enough for every start)."""
    for entry in shard_entries(manifest):
        path = folder / entry["file"]
        if not path.is_file():
            return f"{entry['file']} is missing"
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            return f"{entry['file']} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if full and "sha256" in entry and file_sha256(path) != entry["sha256"]:
            return f"{entry['file']} differs from the manifest's sha256"
        if full and len(read_shard(path)) != entry["tokens"]:  # the count can be edited with the hash kept
            return f"{entry['file']} does not hold the manifest's {entry['tokens']} tokens"
    return None


def check_data_for_model(manifest: dict[str, Any], folder: str, vocabulary_size: int) -> None:
    """The data is a token format this raygpt reads and its token ids fit the model's vocabulary
    (the manifest only: cheap enough for every trial's plan)."""
    where = f"{folder}/{MANIFEST}"
    version = manifest.get("format_version")
    if manifest.get("format") != "raygpt-tokens" or not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{where} is not a raygpt token manifest (format {manifest.get('format')!r}, "
                        f"version {version!r}); run `raygpt prepare` again")
    if version > TOKENS_FORMAT_VERSION:
        raise UserError(f"{where} has format version {version}, newer than this raygpt reads "
                        f"({TOKENS_FORMAT_VERSION}); "
                        f"upgrade raygpt or prepare the data again")
    if manifest.get("tokenizer") != "gpt2" or manifest.get("dtype") != "uint16":
        raise UserError(f"{where}: tokenizer {manifest.get('tokenizer')!r} / dtype {manifest.get('dtype')!r}; "
                        f"this raygpt reads gpt2 / uint16 shards")
    n_vocab = manifest.get("n_vocab", 50257)
    if not isinstance(n_vocab, int) or n_vocab > vocabulary_size:
        raise UserError(f"model.vocabulary_size {vocabulary_size} is smaller than the data's vocabulary "
                        f"({n_vocab} gpt2 token ids in {folder}); use at least {n_vocab}")


def check_shards(manifest: dict[str, Any], folder: str, full: bool = False) -> None:
    """Before launch, once: every shard of a local folder is there at its manifest size, and with
    `full` (`raygpt train --check`) its content hash (shards on storage are size- and hash-checked
    when a node copies them)."""
    if not storage.is_uri(folder):
        problem = shard_problem(Path(folder), manifest, full=full)
        if problem:
            raise UserError(f"data {folder} is damaged: {problem}; run `raygpt prepare` again")


def foreign_files(names: Iterable[str], manifest: dict[str, Any] | None) -> list[str]:
    """The names of a folder's entries that raygpt did not write (neither the manifest nor a
    shard it lists): a prepare never deletes or overwrites these, local or on storage."""
    own = own_files(manifest)
    return sorted(n for n in names if n not in own)


def own_files(manifest: dict[str, Any] | None) -> set[str]:
    """The files a prepare wrote: its manifest and the shards it lists."""
    if manifest is None:
        return set()
    return {MANIFEST} | {s["file"] for split in SPLITS for s in manifest["splits"][split]["shards"]}
