"""Checkpoints and the shared storage they live on.

A checkpoint is a folder `checkpoint_<step>` holding `model.pt` and `optimizer.pt` (plain state
dicts, loaded with `torch.load(weights_only=True)`: no arbitrary unpickling) and `state.json`
(step, epoch, data position, tokens seen, the run's config, the format version). Runs live in
`<storage_path>/<run name>/`; storage is a local folder or any pyarrow filesystem URI.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from raygpt.errors import UserError

FORMAT_VERSION = 1
STATE_FILE = "state.json"  # written last: a checkpoint folder with it is complete
_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile


# ----------------------------------------------------------------------------- storage


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
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a small file whole (object stores have no append); local writes are atomic."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = path + ".tmp" if isinstance(fs, pafs.LocalFileSystem) else path
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    if tmp != path:
        fs.move(tmp, path)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:07d}"


_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)(?:-(\d+))?")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(step, rewrite) of `checkpoint_<step>[-<rewrite>]`, compared as numbers (as text,
    checkpoint_9999999 would sort after checkpoint_10000000 and -10 before -2); None for any
    other name."""
    match = _CHECKPOINT_NAME.fullmatch(name)
    return (int(match[1]), int(match[2] or 0)) if match else None


def list_checkpoints(run_uri: str) -> list[str]:
    """URIs of the run's checkpoint folders, oldest first (by step, then by rewrite)."""
    fs, path = filesystem(run_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_order(i.base_name)]
    return [join(run_uri, n) for n in sorted(names, key=checkpoint_order)]


def prune_checkpoints(run_uri: str, keep: int) -> list[str]:
    """Keep the `keep` checkpoints of lowest val_loss (as their state.json says) and the newest,
    as Ray Train's CheckpointConfig(num_to_keep) does; delete the others. Returns the deleted."""
    uris = list_checkpoints(run_uri)
    if len(uris) <= keep:
        return []

    def val_loss(uri: str) -> float:
        try:
            loss = json.loads(read_text(join(uri, "state.json"))).get("val_loss")
        except (OSError, ValueError):
            return math.inf
        return loss if isinstance(loss, (int, float)) else math.inf

    kept = set(sorted(uris, key=val_loss)[:keep]) | {uris[-1]}
    deleted = [uri for uri in uris if uri not in kept]
    for uri in deleted:
        fs, path = filesystem(uri)
        fs.delete_dir(path)
    return deleted


def upload(local_dir: str, uri: str) -> None:
    """Copy a local checkpoint folder to `uri` on storage, visible only when complete: on local
    disk it is copied under a temporary name and renamed into place; on an object store (no
    rename) `state.json`, the marker every reader trusts, is written strictly after the rest."""
    fs, path = filesystem(uri)
    local = pafs.LocalFileSystem()
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = os.path.split(path.rstrip("/"))
        fs.create_dir(parent, recursive=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=parent)
        try:
            pafs.copy_files(local_dir, tmp, source_filesystem=local, destination_filesystem=local)
            os.rename(tmp, path)
        except BaseException:
            fs.delete_dir(tmp)
            raise
        return
    fs.create_dir(path, recursive=True)
    names = sorted(os.listdir(local_dir), key=lambda n: n == STATE_FILE)  # state.json last
    for name in names:
        pafs.copy_files(os.path.join(local_dir, name), f"{path}/{name}", source_filesystem=local, destination_filesystem=fs)


def download(uri: str, local_dir: str) -> str:
    """Copy a checkpoint folder from storage to `local_dir` (a no-op for a local folder)."""
    if not is_uri(uri):
        return uri
    fs, path = filesystem(uri)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


# ----------------------------------------------------------------------------- save / load


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without DDP's `module.` or torch.compile's `_orig_mod.` prefixes (in any nesting), so
    plain, compiled and DDP checkpoints load into each other."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def unwrapped_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return strip_wrapper_prefixes(model.state_dict())


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(unwrapped_state_dict(model), folder / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    # state.json last: a folder with it is complete.
    (folder / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **state}, indent=1))


def read_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a raygpt checkpoint (no state.json)") from None
    except json.JSONDecodeError:
        raise UserError(f"checkpoint {folder} is damaged: state.json is not valid JSON") from None
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"checkpoint {folder} has format {state['format_version']}, newer than this raygpt reads")
    return state


def load_checkpoint(folder: str | Path, with_optimizer: bool = True) -> dict[str, Any]:
    """{"state": ..., "model": state dict, "optimizer": state dict or None} from a local folder."""
    folder = Path(folder)
    state = read_state(folder)
    out: dict[str, Any] = {"state": state, "optimizer": None}
    files = ["model.pt"] + (["optimizer.pt"] if with_optimizer else [])
    for name in files:
        try:
            out[name[:-3]] = torch.load(folder / name, map_location="cpu", weights_only=True)
            if name == "model.pt":  # a state dict saved by hand from a compiled or DDP model loads too
                out["model"] = strip_wrapper_prefixes(out["model"])
        except FileNotFoundError:
            raise UserError(f"checkpoint {folder} is incomplete: {name} is missing") from None
        except Exception as exc:  # torch raises several types for a truncated or foreign file
            raise UserError(f"checkpoint {folder} is damaged: {name} does not load ({type(exc).__name__})") from None
    return out


SHAPE_KEYS = ("embedding_dim", "num_layers", "num_heads", "context_len", "vocabulary_size", "qkv_bias",
              "tie_embeddings")


def check_same_shape(checkpoint_model: dict[str, Any], model_cfg: Any, where: str) -> None:
    """Refuse a checkpoint of a different architecture with one line naming what differs."""
    diffs = [f"{k} {checkpoint_model.get(k)} vs {getattr(model_cfg, k)}" for k in SHAPE_KEYS
             if checkpoint_model.get(k) != getattr(model_cfg, k)]
    if diffs:
        raise UserError(f"checkpoint {where} is for a different model shape (checkpoint vs config: {', '.join(diffs)})")


def temporary_dir(prefix: str = "raygpt-") -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
