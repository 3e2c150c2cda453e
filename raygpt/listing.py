"""What `raygpt runs` shows: the training runs and search experiments in a storage folder, with
how far each got, its best val loss, when it last changed, and whether someone is writing it.

A train run is a folder holding raygpt's run files (`raygpt.runs`: config, metrics log, lease,
checkpoints); an experiment is a folder holding `search.yaml`, whose trials are the run folders
`train-<launch index>` (an Optuna trial: `train-<trial id>`) inside it (`raygpt.search.tune`).
Local folders and storage URIs read the same; only one level under the storage folder is looked
at. No Ray: this reads files.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs

from raygpt import runs, storage
from raygpt.config import read_stored_yaml
from raygpt.errors import UserError

# tune.tune_trial trains each trial into <experiment>/train-<launch index>; Tune's own trial folders
# beside them hold no raygpt files.
TRIAL_RUN_PREFIX = "train-"
_RUN_FILES = {runs.CONFIG_FILE, runs.METRICS_FILE, runs.PROGRESS_FILE, runs.LEASE_FILE}
# What the listing opens in a run folder and in an experiment folder.
_RUN_READS = (runs.METRICS_FILE, runs.LEASE_FILE)
_SEARCH_READS = (runs.SEARCH_FILE, runs.TRIALS_CSV)


def list_runs(storage_path: str) -> list[dict[str, Any]]:
    """One entry per run and per experiment directly under `storage_path`, oldest change first."""
    root = storage.resolve_storage(storage_path).rstrip("/")
    fs, path = storage.filesystem(root)
    try:
        kind = fs.get_file_info(path).type
        folders = [] if kind != pafs.FileType.Directory else fs.get_file_info(pafs.FileSelector(path))
    except OSError as exc:  # storage unreachable, no credentials, no permission
        raise UserError(f"cannot list storage {root}: {str(exc).splitlines()[0]}") from None
    if kind == pafs.FileType.NotFound:
        raise UserError(f"no storage folder {root}")
    if kind != pafs.FileType.Directory:
        raise UserError(f"{root} is a file, not a storage folder")
    entries = []
    for info in folders:
        if info.type != pafs.FileType.Directory or info.base_name.startswith("."):  # hidden: temporaries
            continue
        try:
            children = {c.base_name: c.type for c in fs.get_file_info(pafs.FileSelector(info.path))}
        except OSError:  # a folder this user may not read holds none of their runs
            continue
        if runs.SEARCH_FILE not in children and not _is_run(children):
            continue
        uri = storage.join(root, info.base_name)
        files = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))  # for the newest change
        entries.append(_search_entry(uri, info.path, children, files) if runs.SEARCH_FILE in children
                       else _run_entry(uri, info.path, files))
    return sorted(entries, key=lambda e: e["last_change"] or "")


def _is_run(children: dict[str, pafs.FileType]) -> bool:
    return bool(_RUN_FILES & children.keys()) or any(
        t == pafs.FileType.Directory and runs.checkpoint_order(name) for name, t in children.items())


def _entry(uri: str, kind: str, status: str, best: float | None, last_change: str | None) -> dict[str, Any]:
    """The keys every entry has (None where they do not apply), so scripts read one shape."""
    return {"name": uri.rsplit("/", 1)[-1], "kind": kind, "status": status, "steps": None, "total_steps": None,
            "trials": None, "trials_finished": None, "best_val_loss": best, "last_change": last_change,
            "holder": None, "path": uri}


def _not_plain_files(path: str, files: list[pafs.FileInfo], names: tuple[str, ...]) -> bool:
    """Whether one of `names` in the folder at `path` is there but not a regular file: a FIFO
    would block its reader forever and a device (a link to /dev/zero) never ends; neither is opened."""
    wanted = {f"{path}/{name}" for name in names}
    return any(f.path in wanted and f.type != pafs.FileType.File for f in files)


def _run_entry(uri: str, path: str, files: list[pafs.FileInfo]) -> dict[str, Any]:
    if _not_plain_files(path, files, _RUN_READS):
        return _entry(uri, "train", "unreadable", None, _last_change(files, []))
    try:
        metrics = runs.read_metrics(uri)
    except (OSError, ValueError, UserError):  # a log raygpt did not write whole: say so, list the others
        return _entry(uri, "train", "unreadable", None, _last_change(files, []))
    last = metrics[-1] if metrics else {}
    holder = live_lease_holder(uri)
    if holder is not None:
        status = "running"
    elif not metrics:
        status = "empty"
    elif last.get("step") == last.get("total_steps"):
        status = "finished"
    else:  # nothing records a failure (a failed run leaves no mark): stopped early, nobody writing
        status = "interrupted"
    losses = [r["val_loss"] for r in metrics if isinstance(r.get("val_loss"), (int, float))]
    entry = _entry(uri, "train", status, min(losses, default=None), _last_change(files, metrics))
    entry.update(steps=last.get("step"), total_steps=last.get("total_steps"),
                 holder={"host": holder.get("host"), "pid": holder.get("pid")} if holder else None)
    return entry


def live_lease_holder(run_uri: str) -> dict[str, Any] | None:
    """The lease of a run whose owner is alive, else None (read-only)."""
    return runs.Lease(run_uri).live_holder()


def _search_entry(uri: str, path: str, children: dict[str, pafs.FileType],
                  files: list[pafs.FileInfo]) -> dict[str, Any]:
    if _not_plain_files(path, files, _SEARCH_READS):
        return _entry(uri, "search", "unreadable", None, _last_change(files, []))
    trials = [_run_entry(storage.join(uri, name), f"{path}/{name}",
                         [f for f in files if f.path.startswith(f"{path}/{name}/")])
              for name, t in sorted(children.items())
              if t == pafs.FileType.Directory and name.startswith(TRIAL_RUN_PREFIX)]
    statuses = [t["status"] for t in trials]
    planned = _planned_trials(uri)
    finished = statuses.count("finished")
    ended = _ended_trials(uri)  # the analysis written when `raygpt tune` ended: Tune's own statuses
    if ended is not None:
        status = "failed" if "ERROR" in ended else "finished"
        finished = ended.count("TERMINATED")  # trials ASHA stopped early finished too
    elif "running" in statuses:
        status = "running"
    elif trials and finished >= max(planned, len(trials)):
        status = "finished"
    else:
        status = "interrupted"
    losses = [t["best_val_loss"] for t in trials if t["best_val_loss"] is not None]
    entry = _entry(uri, "search", status, min(losses, default=None), _last_change(files, []))
    entry.update(trials=max(planned, len(trials)), trials_finished=finished)
    return entry


def _ended_trials(experiment_uri: str) -> list[str] | None:
    """Each trial's Tune status from trials.csv (raygpt.search.analysis writes it when a search ends),
    or None while there is none."""
    import pyarrow.csv as pacsv

    uri = storage.join(experiment_uri, runs.TRIALS_CSV)
    if not storage.exists(uri):
        return None
    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as f:
            return [str(s) for s in pacsv.read_csv(f).column("status").to_pylist()]
    except (OSError, KeyError, ValueError):
        return None


def _planned_trials(experiment_uri: str) -> int:
    """How many trials the search launches, as search.yaml's `launch` section says (0 if unsaid)."""
    try:
        return int(read_stored_yaml(storage.join(experiment_uri, runs.SEARCH_FILE), "search file")["launch"]["trials"])
    except (UserError, OSError, ValueError, TypeError, KeyError, OverflowError):
        return 0


def _last_change(files: list[pafs.FileInfo], metrics: list[dict[str, Any]]) -> str | None:
    """The newest modification time of the folder's files (or, where storage gives none, the
    newest wall_time logged), ISO 8601 in UTC: as text it sorts in time order."""
    times = [f.mtime.timestamp() for f in files if f.type == pafs.FileType.File and f.mtime is not None]
    times += [r["wall_time"] for r in metrics if isinstance(r.get("wall_time"), (int, float))]
    if not times:
        return None
    return datetime.fromtimestamp(max(times), timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the table


def format_runs_table(entries: list[dict[str, Any]]) -> str:
    """Aligned columns: name, kind, status, steps (trials for a search), best val, last change."""
    header = ["name", "kind", "status", "steps", "best val", "last change"]
    rows = [[e["name"], e["kind"], _status(e), _progress(e),
             "-" if e["best_val_loss"] is None else f"{e['best_val_loss']:.4f}",
             _local_time(e["last_change"])] for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _status(e: dict[str, Any]) -> str:
    holder = e["holder"]
    return f"{e['status']} ({holder['host']}:{holder['pid']})" if holder else e["status"]


def _progress(e: dict[str, Any]) -> str:
    if e["kind"] == "search":
        return "-" if e["trials"] is None else f"{e['trials_finished']}/{e['trials']} trials"
    return "-" if e["steps"] is None else f"{e['steps']}/{e['total_steps']}"


def _local_time(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
