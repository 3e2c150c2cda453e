"""Checkpoints: what one holds, and how it is saved and loaded.

A checkpoint is a folder `checkpoint_<step>` holding the weights and optimizer state and
`state.json` (step, epoch, data position, tokens seen, the run's config, the format version),
written last. The weights come in one of two layouts:

- whole (run.strategy ddp): `model.pt` and `optimizer.pt`, plain state dicts written by rank 0,
  loaded with `torch.load(weights_only=True)` (no arbitrary unpickling);
- sharded (run.strategy fsdp): torch.distributed.checkpoint (DCP) files, one `__<rank>_0.distcp`
  per worker holding its shards of the model and optimizer, and the `.metadata` index of where
  each slice of each tensor lives. DCP writes that index as a pickle and reads it unrestricted;
  raygpt reads it allowing only DCP's own classes, so a crafted index runs nothing.

Either layout loads into either strategy at any worker count: a sharded checkpoint is read back
whole (`load_checkpoint`) and handed out again (`raygpt.training.sharding`). Runs live in
`<storage_path>/<run name>/` (`raygpt.runs` names, orders and prunes them).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from raygpt import storage
from raygpt.errors import UserError
from raygpt.storage import STATE_FILE

CHECKPOINT_FORMAT_VERSION = 1
SHARDED_INDEX = ".metadata"  # DCP's index: its presence makes a checkpoint folder a sharded one
_PREFIXES = ("module.", "_orig_mod.")  # added by DDP and torch.compile


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
    save_snapshot(folder, {"model": unwrapped_state_dict(model),
                           "optimizer": optimizer.state_dict() if optimizer is not None else None}, state)


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and optimizer's state copied to host memory, so training can go on while it is
    written (`save_snapshot`). Tensors that share storage (a tied head) stay shared in the copy."""
    copies: dict[tuple[int, int], torch.Tensor] = {}

    def host(value: Any) -> Any:
        if not torch.is_tensor(value):
            return value
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        if key not in copies:
            copies[key] = value.detach().to("cpu", copy=True)
        return copies[key]

    optimizer_state = optimizer.state_dict()
    return {"model": {k: host(v) for k, v in unwrapped_state_dict(model).items()},
            "optimizer": {"state": {i: {k: host(v) for k, v in s.items()} for i, s in optimizer_state["state"].items()},
                          "param_groups": copy.deepcopy(optimizer_state["param_groups"])}}


def save_snapshot(folder: str | Path, state_dicts: dict[str, Any], state: dict[str, Any]) -> None:
    """A whole checkpoint from state dicts ({"model", "optimizer" or None}) into a local folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dicts["model"], folder / "model.pt")
    if state_dicts.get("optimizer") is not None:
        torch.save(state_dicts["optimizer"], folder / "optimizer.pt")
    write_state(folder, state)  # last: a folder with it is complete


def write_state(folder: str | Path, state: dict[str, Any]) -> None:
    """A checkpoint's state.json, with this raygpt's format version."""
    (Path(folder) / STATE_FILE).write_text(json.dumps({"format_version": CHECKPOINT_FORMAT_VERSION, **state},
                                                      indent=1))


def save_sharded(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank together (DCP's save is a collective): this rank's shards of the model and the
    optimizer into its local `folder` (`__<rank>_0.distcp`; rank 0 also writes the `.metadata`
    index, once every rank has written). state.json is the caller's, after every shard is stored."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def save_sharded_async(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       group: Any) -> Any:
    """`save_sharded` that returns once this rank's shards are copied to host memory: DCP writes
    them on a thread, planning over `group` (a gloo group of its own: the training group's
    collectives carry on meanwhile). Returns the future of the write."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder),
                          process_group=group)


# What a DCP index may hold (it is a pickle): anything else is refused before it is built, so an
# index crafted to run code on load runs nothing.
_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("collections", "OrderedDict")}


def _read_index(stream: Any, where: str) -> Any:
    """A DCP `.metadata` unpickled with only DCP's own classes, torch dtypes and sizes allowed."""
    import pickle

    class IndexUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in _INDEX_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
                return super().find_class(module, name)
            raise UserError(f"checkpoint {where} is damaged: its {SHARDED_INDEX} holds {module}.{name}, "
                            "which is not part of a checkpoint index (nothing of it was run)")

    return IndexUnpickler(stream).load()


def _safe_reader(folder: Path) -> Any:
    """torch.distributed.checkpoint's FileSystemReader, but its index read by `_read_index`
    (DCP itself unpickles it with no restriction)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class IndexCheckingReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(folder / SHARDED_INDEX, "rb") as stream:
                metadata = _read_index(stream, str(folder))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return IndexCheckingReader(str(folder))


def _load_sharded(folder: Path, with_optimizer: bool) -> dict[str, Any]:
    """A sharded checkpoint read back whole, on the CPU of this process alone (no collective):
    {"model": {name: tensor}, "optimizer": {"state": {name: ...}, "param_groups": [...]}} (the
    optimizer keyed by parameter name, as torch.distributed.checkpoint.state_dict writes it)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    with open(folder / SHARDED_INDEX, "rb") as stream:  # checked here: DCP would wrap the error in its own
        _read_index(stream, str(folder))
    out: dict[str, Any] = {}
    keys = {"model", "optimizer"} if with_optimizer else {"model"}
    _load_state_dict(out, storage_reader=_safe_reader(folder), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return out


def load_state(folder: str | Path) -> dict[str, Any]:
    """The state.json of a checkpoint folder on local disk, checked (`check_state`): a missing or
    damaged one is a UserError."""
    path = Path(folder) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} is not a raygpt checkpoint (no state.json)") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"checkpoint {folder} is damaged: state.json is not valid JSON") from None
    check_state(state, str(folder))
    return state


def check_state(state: Any, where: str) -> None:
    """A state.json this raygpt can use: a mapping of a known format version with the run's
    config (model section included)."""
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {where} is damaged: state.json is not a mapping")
    version = state.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"checkpoint {where} is damaged: format_version {version!r} is not an integer")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise UserError(f"checkpoint {where} has format {version}, newer than this raygpt reads "
                        f"({CHECKPOINT_FORMAT_VERSION}); upgrade raygpt")
    config = state.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"checkpoint {where} is damaged: state.json has no model config")


RESUME_COUNTS = ("step", "epoch", "batch_in_epoch", "tokens_seen")


def check_resumable(state: dict[str, Any], where: str) -> None:
    """A state.json a run can continue from: whole-number positions, seconds as a number and the
    data fingerprint as text (a step written as a string would fail deep in the loop)."""
    for key in RESUME_COUNTS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise UserError(f"checkpoint {where} is damaged: {key} {value!r} in state.json is not a whole number >= 0")
    elapsed = state.get("elapsed", 0.0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not math.isfinite(elapsed) or elapsed < 0:
        raise UserError(f"checkpoint {where} is damaged: elapsed {elapsed!r} in state.json is not seconds >= 0")
    if not isinstance(state.get("data_fingerprint"), (str, type(None))):
        raise UserError(f"checkpoint {where} is damaged: data_fingerprint {state['data_fingerprint']!r} in "
                        "state.json is not text")


def weight_files(checkpoint_uri: str) -> bool:
    """Whether a checkpoint folder (any storage) holds weights beside its state.json: model.pt, or
    a sharded checkpoint's index."""
    return storage.exists(storage.join(checkpoint_uri, "model.pt")) or \
        storage.exists(storage.join(checkpoint_uri, SHARDED_INDEX))


def load_checkpoint(folder: str | Path, with_optimizer: bool = True) -> dict[str, Any]:
    """{"state": ..., "model": state dict, "optimizer": state dict or None, "sharded": bool} from a
    local folder; a sharded checkpoint's optimizer state is keyed by parameter name, a whole one's
    by index (torch's own format)."""
    folder = Path(folder)
    state = load_state(folder)
    out: dict[str, Any] = {"state": state, "optimizer": None, "sharded": (folder / SHARDED_INDEX).exists()}
    if out["sharded"]:
        try:
            out.update(_load_sharded(folder, with_optimizer))
        except UserError:
            raise
        except Exception as exc:  # a missing or truncated shard, a foreign index
            raise UserError(f"checkpoint {folder} is damaged: its shards do not load ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
        if "model" not in out or (with_optimizer and "optimizer" not in out):
            raise UserError(f"checkpoint {folder} is incomplete: its shards hold no model or optimizer state")
        return out
    files = ["model.pt"] + (["optimizer.pt"] if with_optimizer else [])
    for name in files:
        try:
            out[name[:-3]] = torch.load(folder / name, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"checkpoint {folder} is incomplete: {name} is missing") from None
        except Exception as exc:  # torch raises several types for a truncated or foreign file
            raise UserError(f"checkpoint {folder} is damaged: {name} does not load ({type(exc).__name__})") from None
    weights = out["model"]  # weights_only still loads any dict, list, str or number
    bad = (f"it holds a {type(weights).__name__}, not a state dict" if not isinstance(weights, dict) else
           next((f"{k!r} is a {type(v).__name__}, not a tensor" if isinstance(k, str) else f"key {k!r} is not a name"
                 for k, v in weights.items() if not (isinstance(k, str) and torch.is_tensor(v))), None))
    if bad:
        raise UserError(f"checkpoint {folder} is damaged: model.pt is not a state dict of tensors ({bad})")
    out["model"] = strip_wrapper_prefixes(weights)  # a state dict saved by hand from a compiled or DDP model loads too
    return out


MODEL_DEFAULTS = {"parametrization": "standard", "mup_base_width": 128}
SHAPE_KEYS = ("embedding_dim", "num_layers", "num_heads", "context_len", "vocabulary_size", "qkv_bias",
              "tie_embeddings")


def check_same_shape(checkpoint_model: dict[str, Any], model_cfg: Any, where: str) -> None:
    """Refuse a checkpoint of a different architecture (or parametrization: a µP run resumed as a
    standard one would step at other learning rates) with one line naming what differs."""
    keys = SHAPE_KEYS + ("parametrization",) + (("mup_base_width",) if model_cfg.parametrization == "mup" else ())
    saved = {**MODEL_DEFAULTS, **checkpoint_model}  # checkpoints from before a key existed had its default
    diffs = [f"{k} {saved.get(k)} vs {getattr(model_cfg, k)}" for k in keys if saved.get(k) != getattr(model_cfg, k)]
    if diffs:
        raise UserError(f"checkpoint {where} is for a different model shape (checkpoint vs config: {', '.join(diffs)})")


def check_same_data(state: dict[str, Any], fingerprint: str | None, where: str) -> None:
    """Refuse to resume on other data than the run trained on: the data position in a checkpoint
    (epoch, batches consumed) means nothing over a re-prepared corpus. Checkpoints written before
    the fingerprint was recorded pass."""
    trained_on = state.get("data_fingerprint")
    if trained_on is not None and fingerprint is not None and trained_on != fingerprint:
        raise UserError(f"checkpoint {where} was trained on data {trained_on[:12]}, but data.dir now holds "
                        f"{fingerprint[:12]} (prepared again from other inputs or options?); resume with the "
                        f"data it trained on, or start a new run")


def load_newest_valid(candidates: list[str], warn: Callable[[str], None],
                      with_optimizer: bool = True) -> tuple[dict[str, Any], str] | None:
    """Load the first candidate that loads; a damaged or partial one is skipped with a warning.
    None when there are no candidates; an error when every one is damaged (never silently
    start over)."""
    for uri in candidates:
        try:
            with storage.temporary_dir() as tmp:
                return load_checkpoint(storage.download(uri, tmp), with_optimizer), uri
        except UserError as exc:
            warn(f"warning: skipping checkpoint {uri}: {exc}")
    if candidates:
        run = candidates[0].rstrip("/").rsplit("/", 1)[0]
        raise UserError(f"none of the {len(candidates)} checkpoints in {run} loads (see the warnings above); "
                        "move them aside to start the run over, or train under a new run.name")
    return None
