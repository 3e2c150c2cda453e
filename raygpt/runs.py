"""A run folder: what raygpt keeps in it, in what order, and who may write it.

    <storage_path>/<run name>/
        config.yaml                the run's config, written at launch
        metrics.jsonl              one row per report, a light row every train.log_freq steps
                                   ("kind": "step"), and event rows (restarts, resumes)
        progress.json              the step the run has reached (refreshed while it trains)
        lease.json                 the process writing the run now: owner and heartbeat
        trackers.json              the run's MLflow / W&B run ids (run.loggers): a resume continues them
        events.out.tfevents.*      TensorBoard's events (run.loggers); wandb/: W&B's local files
        loss.png                   the loss curves and lr schedule, drawn when the run ends
        checkpoint_<step>[-<n>]/   model.pt, optimizer.pt, state.json (written last)

Every other module asks this one for "the newest complete checkpoint", "the best", the metrics
log, or the lease; none of them lists the folder itself. The folder may be local or on any
storage URI (`raygpt.storage`).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs

from raygpt import storage
from raygpt.errors import UserError
from raygpt.storage import STATE_FILE

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
PROGRESS_FILE = "progress.json"
LEASE_FILE = "lease.json"
TRACKERS_FILE = "trackers.json"  # raygpt.training.trackers
PLOT_FILE = "loss.png"  # drawn when a run ends (raygpt.training.plots)
# An experiment folder (a search): its saved search, and the trial table written when it ends.
SEARCH_FILE = "search.yaml"
TRIALS_CSV = "trials.csv"  # the trial table, also as TRIALS_PARQUET (raygpt.search.analysis)
TRIALS_PARQUET = "trials.parquet"

# ----------------------------------------------------------------------------- checkpoints


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
    """URIs of the run's checkpoint folders, complete or not, oldest first (by step, then rewrite)."""
    fs, path = storage.filesystem(run_uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory and checkpoint_order(i.base_name)]
    return [storage.join(run_uri, n) for n in sorted(names, key=checkpoint_order)]


def unique_checkpoint_name(run_dir: str | None, step: int) -> str:
    """checkpoint_<step>, or checkpoint_<step>-N when a run re-trains a step whose (damaged)
    folder is still there: a checkpoint folder is never written twice."""
    name = checkpoint_name(step)
    n = 0
    while run_dir and storage.exists(storage.join(run_dir, name if n == 0 else f"{name}-{n}")):
        n += 1
    return name if n == 0 else f"{name}-{n}"


def peek_state(checkpoint_uri: str) -> dict[str, Any] | None:
    """A checkpoint's state.json as stored (any storage URI), or None when it is missing or not a JSON
    object: for listing and ordering, never for loading (`checkpoint.load_state` checks it)."""
    uri = storage.join(checkpoint_uri, STATE_FILE)
    try:
        state = json.loads(storage.read_text(uri))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    return state if isinstance(state, dict) else None


def complete_checkpoints(run_uri: str) -> list[str]:
    """The checkpoints that have their state.json (written last), oldest first."""
    return [uri for uri in list_checkpoints(run_uri) if storage.exists(storage.join(uri, STATE_FILE))]


def newest_complete(run_uri: str) -> str | None:
    found = complete_checkpoints(run_uri)
    return found[-1] if found else None


def best_checkpoint(run_uri: str) -> tuple[str | None, float]:
    """The kept checkpoint with the lowest val_loss its state.json records."""
    best, best_loss = None, math.inf
    for uri in complete_checkpoints(run_uri):
        loss = (peek_state(uri) or {}).get("val_loss")
        if isinstance(loss, (int, float)) and loss < best_loss:
            best, best_loss = uri, loss
    return best, best_loss


def prune_checkpoints(run_uri: str, keep: int) -> list[str]:
    """Keep the `keep` checkpoints of lowest val_loss (as their state.json says) and the newest,
    as Ray Train's CheckpointConfig(num_to_keep) does; delete the others. Returns the deleted."""
    uris = list_checkpoints(run_uri)
    if len(uris) <= keep:
        return []

    def val_loss(uri: str) -> float:
        loss = (peek_state(uri) or {}).get("val_loss")
        return loss if isinstance(loss, (int, float)) else math.inf

    kept = set(sorted(uris, key=val_loss)[:keep]) | {uris[-1]}
    deleted = [uri for uri in uris if uri not in kept]
    for uri in deleted:
        fs, path = storage.filesystem(uri)
        fs.delete_dir(path)
    return deleted


# ----------------------------------------------------------------------------- the metrics log


def read_log(run_dir: str | None) -> list[dict[str, Any]]:
    """Every row of a run's metrics log: metrics, and events (rows with an "event" key), each
    checked (`check_row`): a log raygpt did not write whole is a UserError naming the line."""
    uri = storage.join(run_dir, METRICS_FILE) if run_dir else None
    if uri is None or not storage.exists(uri):
        return []
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"metrics log {uri} is damaged: not UTF-8 text") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"metrics log {uri} is damaged: line {number} is not JSON") from None
            problem = check_row(row)
            if problem:
                raise UserError(f"metrics log {uri} is damaged: line {number} {problem}")
            rows.append(row)
    return rows


# What a row's values must be where present: finite numbers (raygpt never logs a non-finite loss:
# the run stops first), a step and counts as whole numbers, a wall time a datetime can show.
_WHOLE = ("step", "epoch", "tokens_seen", "total_steps", "eval_tokens", "train_eval_tokens")
_FINITE = ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "step_time",
           "elapsed", "eval_time", "wall_time")
_LATEST_WALL_TIME = 32503680000.0  # the year 3000


def check_row(row: Any) -> str | None:
    """What is wrong with a metrics log row, or None."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    if "event" in row:
        return None if isinstance(row["event"], str) else f"has event {row['event']!r}, not a name"
    if "step" not in row:
        return "has no step"
    for key in _WHOLE:
        value = row.get(key)
        if key in row and value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return f"has {key} {value!r}, not a whole number >= 0"
    for key in _FINITE:
        value = row.get(key)
        if key in row and value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                                  or not math.isfinite(value)):
            return f"has {key} {value!r}, not a finite number"
    if not 0 <= row.get("wall_time", 0) < _LATEST_WALL_TIME:
        return f"has wall_time {row['wall_time']!r}, not a time"
    return None


def write_log(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """The whole log, rewritten (object stores have no append; a local write is atomic)."""
    storage.write_text(storage.join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows))


def is_step_row(row: dict[str, Any]) -> bool:
    """A light per-step row (train.log_freq), as opposed to a report row or an event."""
    return row.get("kind") == "step"


def is_report_row(row: dict[str, Any]) -> bool:
    """A report's row (one per eval), as opposed to a per-step row or an event."""
    return "event" not in row and not is_step_row(row)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The report rows of a run's log, one per eval, in step order."""
    return [r for r in read_log(run_dir) if is_report_row(r)]


def read_steps(run_dir: str) -> list[dict[str, Any]]:
    """The per-step rows of a run's log (train loss, grad norm, lr, step time), in step order."""
    return [r for r in read_log(run_dir) if is_step_row(r)]


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """The restart / resume rows of a run's log."""
    return [r for r in read_log(run_dir) if "event" in r]


# ----------------------------------------------------------------------------- the lease


class Lease:
    """One writer per run folder. `lease.json` names the owner (host, PID, command) and a
    heartbeat it refreshes every `heartbeat_s`. Another process finding a live lease is refused
    with one line; a lease whose owner is gone (its PID dead on this host, or no heartbeat for
    `stale_s`) is taken over, saying so. On object stores (no exclusive create) two processes
    starting within the same second can both write a lease; the later write wins and the earlier
    process sees it at its first heartbeat and stops."""

    def __init__(self, run_uri: str, *, heartbeat_s: float = 10.0, stale_s: float = 60.0,
                 log: Callable[[str], None] = print):
        self.uri = storage.join(run_uri, LEASE_FILE)
        self.run_uri, self.heartbeat_s, self.stale_s, self.log = run_uri, heartbeat_s, stale_s, log
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def holder(self) -> dict[str, Any] | None:
        try:
            lease = json.loads(storage.read_text(self.uri))
        except (OSError, ValueError):
            return None
        if not isinstance(lease, dict):
            return None
        heartbeat = lease.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or isinstance(heartbeat, bool) or not math.isfinite(heartbeat):
            lease = {**lease, "heartbeat": 0.0}  # no heartbeat that reads: as stale as can be (taken over, said so)
        if not isinstance(lease.get("pid"), int) or isinstance(lease.get("pid"), bool):
            lease = {**lease, "pid": None}
        return lease

    def live_holder(self) -> dict[str, Any] | None:
        """The lease if its owner looks alive (the test `acquire` makes before refusing), else None."""
        held = self.holder()
        return held if held is not None and self._gone(held) is None else None

    def _gone(self, lease: dict[str, Any]) -> str | None:
        """Why the lease's owner is gone, or None while it looks alive."""
        age = time.time() - float(lease.get("heartbeat", 0) or 0)
        if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int) \
                and not storage.pid_alive(lease["pid"]):
            return f"its process {lease['pid']} is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _text(self) -> str:
        return json.dumps({**self.owner, "command": " ".join(sys.argv[:3]), "heartbeat": time.time()})

    def _write(self) -> None:
        storage.write_text(self.uri, self._text())

    def _create(self) -> bool:
        """Create the lease where none is, exclusively on local disk (of two processes starting
        at once, one wins); False when one exists (or, on an object store, always)."""
        if storage.is_uri(self.uri):
            return False
        os.makedirs(os.path.dirname(self.uri), exist_ok=True)
        try:
            fd = os.open(self.uri, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._text())
        return True

    def acquire(self) -> "Lease":
        held = self.holder()
        if held is None and self._create():
            self._start_heartbeat()
            return self
        held = held or self.holder()
        if held is None:
            self.log(f"taking over the lease of run {self.run_uri}: {LEASE_FILE} is damaged")
        elif held.get("token") != self.owner["token"]:
            why = self._gone(held)
            who = f"{held.get('host')}:{held.get('pid')}"
            if why is None:
                age = time.time() - float(held.get("heartbeat", 0) or 0)
                raise UserError(f"run {self.run_uri} is being written by {who} (heartbeat {age:.0f} s ago); "
                                f"wait for it to end, or, if it is gone, retry after {self.stale_s:.0f} s without "
                                f"a heartbeat")
            self.log(f"taking over the lease of run {self.run_uri} from {who}: {why}")
        self._write()
        held = self.holder()
        if held is None or held.get("token") != self.owner["token"]:
            raise UserError(f"run {self.run_uri} was taken by {held and held.get('host')}:{held and held.get('pid')} "
                            f"while starting; try again")
        self._start_heartbeat()
        return self

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="raygpt-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = self.holder()
            if held is not None and held.get("token") != self.owner["token"]:
                self.lost = True
                self.log(f"warning: the lease of run {self.run_uri} was taken by {held.get('host')}:{held.get('pid')}")
                return
            try:
                self._write()
            except OSError:  # storage hiccup: the next beat tries again
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self.holder()
        if held is not None and held.get("token") == self.owner["token"]:
            fs, path = storage.filesystem(self.uri)
            fs.delete_file(path)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class RunPaths:
    storage: str  # absolute folder or URI
    name: str

    @property
    def uri(self) -> str:
        return storage.join(self.storage, self.name)


def new_run_name() -> str:
    return f"raygpt-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def resume_paths(resume: str, storage_path: str) -> RunPaths:
    """`--resume` takes a run name (under the storage path) or a run folder / URI."""
    if storage.is_uri(resume) or os.sep in resume or os.path.isdir(resume):
        uri = storage.resolve_storage(resume).rstrip("/")
        parent, _, name = uri.rpartition("/")
        return RunPaths(parent, name)
    return RunPaths(storage.resolve_storage(storage_path), resume)


def check_storage_root(storage_path: str) -> str:
    """run.storage_path resolved: a folder (made on first write) or a URI, never an existing file."""
    root = storage.resolve_storage(storage_path)
    fs, path = storage.filesystem(root)
    if fs.get_file_info(path).type == pafs.FileType.File:
        raise UserError(f"run.storage_path {storage_path} is a file, not a folder; runs are written into a folder")
    return root


def read_search_file(experiment_uri: str) -> dict[str, Any]:
    """A search's search.yaml, checked: a YAML mapping with `tune` and `search` mappings (one line
    naming what is wrong, as for every file raygpt reads back)."""
    from raygpt.config import read_stored_yaml

    uri = storage.join(experiment_uri, SEARCH_FILE)
    if not storage.exists(uri):
        raise UserError(f"no raygpt experiment in {experiment_uri} (no {SEARCH_FILE})")
    saved = read_stored_yaml(uri, "search file")
    for key in ("tune", "search"):
        if not isinstance(saved.get(key), dict):
            raise UserError(f"search file {uri} is damaged: its {key!r} section is missing or not a mapping")
    return saved
