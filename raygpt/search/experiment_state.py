"""Tune's record of a search's trials, read as plain JSON: nothing in it is unpickled.

Ray Tune's `ExperimentAnalysis` decodes `experiment_state-*.json` with cloudpickle (values Tune
could not write as JSON are stored as pickles, hex-encoded): anyone who can write to the
experiment folder (a shared bucket) could make it run code on the analyst's machine. raygpt reads
only the plain-JSON fields it needs (trial id, status, the searched values, where the error text
is) and leaves every pickled value as the inert string it is in the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raygpt import storage
from raygpt.errors import UserError

STATE_FILE = re.compile(r"experiment_state-[0-9_-]+\.json")
PLAIN_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9_.=,\-]+")  # a trial id or folder name: no path, not . or ..
MAX_ERROR_BYTES = 1 << 20


@dataclass
class TrialRecord:
    trial_id: str
    status: str  # Tune's: PENDING, RUNNING, PAUSED, TERMINATED, ERROR
    hp: dict[str, Any]  # the searched values (dotted keys)
    run: str  # the trial's run folder in the experiment folder
    error_file: str | None  # where Tune wrote the trial's error text, if it failed


def read_trials(experiment_dir: str) -> list[TrialRecord]:
    """Every trial of the search, one per run folder: a resumed search adds an experiment state
    per resume (a Tuner each), and a run folder's newest record wins. A damaged state is one line."""
    files = state_files(experiment_dir)
    if not files:
        raise UserError(f"no Tune experiment state in {experiment_dir}; the search never started")
    trials: dict[str, TrialRecord] = {}
    for uri in files:  # oldest first
        for trial in _read_state(uri, experiment_dir):
            trials.pop(trial.run, None)
            trials[trial.run] = trial
    return list(trials.values())


def _read_state(uri: str, experiment_dir: str) -> list[TrialRecord]:
    where = uri.rsplit("/", 1)[-1]
    try:
        state = json.loads(storage.read_text(uri))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{experiment_dir}: {where} is damaged (not JSON)") from None
    entries = state.get("trial_data") if isinstance(state, dict) else None
    if not isinstance(entries, list):
        raise UserError(f"{experiment_dir}: {where} is damaged (no trial_data list)")
    return [_trial(entry, experiment_dir, f"{where} trial_data[{i}]") for i, entry in enumerate(entries)]


def state_files(experiment_dir: str) -> list[str]:
    """The experiment states in `experiment_dir`, oldest first (their names carry their time)."""
    fs, path = storage.filesystem(experiment_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
             if i.type == pafs.FileType.File and STATE_FILE.fullmatch(i.base_name)]
    return [storage.join(experiment_dir, name) for name in sorted(names)]


def newest_state_file(experiment_dir: str) -> str | None:
    files = state_files(experiment_dir)
    return files[-1] if files else None


def _trial(entry: Any, experiment_dir: str, where: str) -> TrialRecord:
    try:
        trial_json, metadata_json = entry
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        trial_id, status, config = trial["trial_id"], trial["status"], trial["config"]
        # A grid point carries its values and run folder; an Optuna trial (and a search from
        # before run folders were named by launch order) only its values.
        point = config["trial"] if "trial" in config else {"hp": config["hp"], "run": f"train-{trial_id}"}
        hp, run = point["hp"], point["run"]
        logdir, error_name = trial.get("relative_logdir"), metadata.get("error_filename")
    except (TypeError, ValueError, KeyError):
        raise UserError(f"{experiment_dir}: {where} is damaged (not a Tune trial record)") from None
    if not (isinstance(trial_id, str) and PLAIN_NAME.fullmatch(trial_id)) or not isinstance(status, str) \
            or not isinstance(hp, dict) or not (isinstance(run, str) and PLAIN_NAME.fullmatch(run)):
        raise UserError(f"{experiment_dir}: {where} is damaged (trial_id {trial_id!r}, status {status!r}, "
                        f"run {run!r})")
    error_file = None
    if isinstance(logdir, str) and isinstance(error_name, str) and PLAIN_NAME.fullmatch(logdir) \
            and PLAIN_NAME.fullmatch(error_name):
        error_file = storage.join(experiment_dir, logdir, error_name)
    return TrialRecord(trial_id, status, hp, run, error_file)


def error_text(trial: TrialRecord) -> str:
    """The trial's error text as Tune wrote it (its first MB), or "" when there is none to read."""
    if trial.error_file is None:
        return ""
    try:
        fs, path = storage.filesystem(trial.error_file)
        if fs.get_file_info(path).type != pafs.FileType.File:  # a FIFO or a device is not read
            return ""
        with fs.open_input_stream(path) as f:
            return f.read(MAX_ERROR_BYTES).decode(errors="replace")
    except (OSError, UserError):
        return ""
