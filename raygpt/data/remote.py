"""Token shards on shared storage, for clusters.

A prepared folder may live on any pyarrow filesystem (s3://, gs://, file://) or on an NFS mount.
`prepare_to` writes one there: it builds locally, then uploads the shards and the manifest last
(a folder with a manifest is complete). `local_shards` gives a training worker a folder it can
memory-map: a local or NFS folder as it is; for a URI, this node's copy in its cache, fetched once
per node (the workers of a node take turns through a file lock), verified against the manifest
(size and sha256 of every shard) and reused while the manifest is unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

from raygpt import storage
from raygpt.data import shards
from raygpt.data.prepare import prepare_local
from raygpt.data.shards import MANIFEST
from raygpt.errors import UserError

CACHE_ENV = "RAYGPT_DATA_CACHE"


def cache_root() -> Path:
    """Where a node keeps its copies of shards: $RAYGPT_DATA_CACHE, else ~/.cache/raygpt/data."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/raygpt/data").expanduser()


def local_shards(folder: str, log: Callable[[str], None] = print) -> str:
    """A local folder holding `folder`'s shards, copied to this node's cache when it is a URI."""
    if not storage.is_uri(folder):
        return folder
    manifest_text = storage.read_text(storage.join(folder, MANIFEST))
    manifest = json.loads(manifest_text)
    shards.check_manifest_layout(manifest, folder)  # shard names are plain names: copies stay in the cache
    key = hashlib.sha256(folder.rstrip("/").encode()).hexdigest()[:12]
    target = cache_root() / f"{key}-{manifest['fingerprint'][:12]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node; the other workers wait, then reuse it
        cached = target / MANIFEST
        if (cached.is_file() and cached.read_text() == manifest_text
                and shards.shard_problem(target, manifest, full=False) is None):
            return str(target)
        start = time.perf_counter()
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            fs, path = storage.filesystem(folder)
            for entry in shards.shard_entries(manifest):
                pafs.copy_files(f"{path.rstrip('/')}/{entry['file']}", str(tmp / entry["file"]),
                                source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            problem = shards.shard_problem(tmp, manifest)
            if problem:
                raise UserError(f"the shards at {folder} do not match their manifest: {problem}; "
                                "run `raygpt prepare` again")
            (tmp / MANIFEST).write_text(manifest_text)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Copies of older versions of the same folder only take disk space now.
        for old in target.parent.glob(f"{key}-*"):
            if old.is_dir() and old != target and ".tmp-" not in old.name:
                shutil.rmtree(old, ignore_errors=True)
        size = sum(e.get("bytes", 0) for e in shards.shard_entries(manifest))
        log(f"copied {len(shards.shard_entries(manifest))} shards ({size / 2**20:.1f} MiB) from {folder} "
            f"to {target} in {time.perf_counter() - start:.1f} s")
    return str(target)


def prepare_to(out: str, log: Callable[[str], None] = print, **options: Any) -> dict[str, Any]:
    """`raygpt prepare`: `prepare_local` into `out`, a local folder or a storage URI (built locally, then uploaded:
    shards first, the manifest last; a no-op when the manifest there matches the inputs)."""
    if not storage.is_uri(out):
        return prepare_local(out=out, log=log, **options)
    fs, path = storage.filesystem(out)
    path = path.rstrip("/")
    try:
        kind = fs.get_file_info(path).type
        if kind not in (pafs.FileType.Directory, pafs.FileType.NotFound):
            raise UserError(f"output {out} is a file, not a folder; choose another --out")
        remote = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
    except OSError as exc:  # no permission, storage unreachable
        raise UserError(f"cannot read --out {out}: {str(exc).splitlines()[0]}") from None
    old = storage.read_text(storage.join(out, MANIFEST)) if MANIFEST in remote else None
    old_manifest = None
    if old is not None:
        try:
            old_manifest = json.loads(old)
        except ValueError:
            raise UserError(f"{out}/{MANIFEST} is not a raygpt manifest (not JSON)") from None
        shards.check_manifest_layout(old_manifest, out)
    own = shards.own_files(old_manifest)
    foreign = shards.foreign_files(remote, old_manifest)
    if foreign and not options.get("force"):
        raise UserError(f"output {out} holds files raygpt did not write ({', '.join(foreign[:3])}); "
                        f"choose another --out, or pass --force to write raygpt's files beside them")
    with storage.temporary_dir() as tmp:
        local = Path(tmp) / "data"
        local.mkdir()
        if old is not None:
            (local / MANIFEST).write_text(old)  # lets prepare see an up-to-date output
        manifest = prepare_local(out=local, log=lambda line: log(line.replace(str(local), out)), **options)
        if old is not None and json.loads(old) == manifest:
            return manifest
        names = {e["file"] for e in shards.shard_entries(manifest)}
        clash = sorted(n for n in names & set(foreign))
        if clash:
            raise UserError(f"output {out} holds files named like raygpt's shards ({', '.join(clash[:3])}); "
                            f"choose another --out")
        try:
            fs.create_dir(path, recursive=True)
        except OSError as exc:  # a file on the way to it (file:///a/file/sub), no permission
            raise UserError(f"cannot write --out {out}: {str(exc).splitlines()[0]}") from None
        if old is not None:
            fs.delete_file(f"{path}/{MANIFEST}")  # until the new shards are all there
        for name in sorted(names):
            pafs.copy_files(str(local / name), f"{path}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
        for stale in own - names - {MANIFEST}:  # only files the old manifest listed
            fs.delete_file(f"{path}/{stale}")
        storage.write_text(storage.join(out, MANIFEST), (local / MANIFEST).read_text())
        log(f"uploaded {len(names)} shards and {MANIFEST} to {out}")
    return manifest
