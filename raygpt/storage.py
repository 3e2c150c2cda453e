"""Storage: a local folder or any pyarrow filesystem URI (s3://, gs://, ...), read and written
whole. Runs, checkpoints, metrics logs and search folders all go through these few calls.

Nothing half-written is ever visible under its final name: small files and local checkpoint
folders are written under a temporary name (carrying the writer's PID) and renamed; on object
stores, which have no rename, a checkpoint's `state.json` is written strictly after its other
files. Temporaries left by a killed writer are removed by the next writer once that PID is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raygpt.errors import UserError

STATE_FILE = "state.json"  # a checkpoint's completeness marker: written last



def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve_storage(path: str) -> str:
    """Absolute local path, or the URI unchanged."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise UserError(f"cannot open storage {uri}: {exc}") from None


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_text(uri: str, text: str) -> None:
    """Write a small file whole (object stores have no append); local writes are atomic, under a
    temporary name of this process (two writers never share one)."""
    write_bytes(uri, text.encode())


def write_bytes(uri: str, data: bytes) -> None:
    """`write_text` for bytes."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    parent, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- temporaries


def temp_prefix(name: str) -> str:
    """`.<name>.tmp-<host>-<pid>-`: hidden, and naming its writer, so a later writer can tell an
    abandoned temporary (its process gone) from one being written (on shared storage, only this
    host's own temporaries are judged)."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_abandoned(parent: str | Path, name: str) -> list[str]:
    """Delete temporaries of `name` in the local folder `parent` whose writing process (on this
    host) is gone; return their paths."""
    pattern = re.compile(rf"\.{re.escape(name)}\.tmp-{re.escape(socket.gethostname())}-(\d+)-.*")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and int(match[1]) != os.getpid() and not pid_alive(int(match[1])):
            path = os.path.join(parent, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
            removed.append(path)
    return removed


def upload(local_dir: str, uri: str) -> None:
    """Copy a local checkpoint folder to `uri` on storage, visible only when complete: on local
    disk it is copied under a temporary name and renamed into place; on an object store (no
    rename) `state.json`, the marker every reader trusts, is written strictly after the rest."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem) and not os.path.isdir(path):
        parent, name = os.path.split(path.rstrip("/"))
        fs.create_dir(parent, recursive=True)
        remove_abandoned(parent, name)
        tmp = tempfile.mkdtemp(prefix=temp_prefix(name), dir=parent)
        try:
            local = pafs.LocalFileSystem()
            pafs.copy_files(local_dir, tmp, source_filesystem=local, destination_filesystem=local)
            os.rename(tmp, path)
        except BaseException:
            fs.delete_dir(tmp)
            raise
        return
    # An object store, or a folder other workers' shards are in already: file by file.
    upload_files(local_dir, uri)


def upload_files(local_dir: str, uri: str, names: list[str] | None = None) -> None:
    """Copy the files `names` (default: all) of a local folder into the folder `uri`, which other
    writers may be filling too (each worker's shards of one checkpoint): each file appears whole
    under its name (local: written under a temporary name, then renamed; an object store's put is
    whole), state.json last."""
    fs, path = filesystem(uri)
    local = pafs.LocalFileSystem()
    fs.create_dir(path, recursive=True)
    names = sorted(os.listdir(local_dir) if names is None else names, key=lambda n: n == STATE_FILE)
    for name in names:
        source = os.path.join(local_dir, name)
        if not isinstance(fs, pafs.LocalFileSystem):
            pafs.copy_files(source, f"{path}/{name}", source_filesystem=local, destination_filesystem=fs)
            continue
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), dir=path)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, os.path.join(path, name))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def download(uri: str, local_dir: str) -> str:
    """Copy a checkpoint folder from storage to `local_dir` (a no-op for a local folder)."""
    if not is_uri(uri):
        return uri
    fs, path = filesystem(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def temporary_dir(prefix: str = "raygpt-") -> tempfile.TemporaryDirectory:
    """A local scratch folder (downloads of checkpoints, uploads in the making)."""
    return tempfile.TemporaryDirectory(prefix=prefix)


def check_output_folder(out: str | Path, own: tuple[str, ...], marker: str, writer: str) -> Path:
    """A local output folder as a raygpt command may write it (`writer` names the command): new or
    empty, or one it wrote before (holding its `marker` file, and besides only files named in
    `own`). Never a file, the current folder by omission (an empty value), or a folder holding
    anything else (a run folder, the user's own files of the same names)."""
    if not str(out).strip():
        raise UserError(f"--out is empty: name the folder {writer} writes into (it is created)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / marker).is_file()
        foreign = sorted(p.name for p in out.iterdir() if not ours or p.name not in own or not p.is_file())
        if foreign:
            raise UserError(f"--out {out} holds files {writer} did not write ({', '.join(foreign[:3])}"
                            f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder")
    return out
