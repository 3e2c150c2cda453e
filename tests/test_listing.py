"""`raygpt runs`: runs and searches found in a storage folder, from folders real training wrote."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import torch
import yaml
from helpers import make_corpus, one_line_error, tiny_config

from raygpt import runs
from raygpt.listing import list_runs
from raygpt.runs import SEARCH_FILE
from raygpt.training.local import run_without_ray
from raygpt.training.recovery import InjectedFault


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A storage folder holding a finished run (4 of 4 steps) and an interrupted one (a fault
    after step 4 of 8, checkpoint and log at step 4), trained for real without Ray."""
    root = tmp_path_factory.mktemp("listing")
    data_dir, storage = make_corpus(root), root / "runs"
    torch.set_num_threads(1)
    run_without_ray(tiny_config(data_dir, storage, "train.max_steps=4"), str(data_dir), str(storage / "finished"))
    with pytest.raises(InjectedFault):
        run_without_ray(tiny_config(data_dir, storage, "train.max_steps=8", "fault.crash_at_step=4"),
                        str(data_dir), str(storage / "interrupted"))
    return storage


@pytest.fixture
def storage(trained, tmp_path):
    """A copy of the trained runs for one test to change."""
    return shutil.copytree(trained, tmp_path / "runs")


def add_search(storage, name, trial_runs, planned):
    """An experiment folder as tune.py lays it out: search.yaml, one `train-<trial id>` run
    folder per trial (copies of `trial_runs`), and a folder of Tune's own per trial."""
    experiment = storage / name
    experiment.mkdir()
    (experiment / SEARCH_FILE).write_text(yaml.safe_dump({"search": {"optim.peak_lr": {"grid": [0.01, 0.02]}},
                                                          "launch": {"trials": planned}}))
    for i, run in enumerate(trial_runs):
        shutil.copytree(storage / run, experiment / f"train-{i:05d}")
        (experiment / f"tune_trial_{i:05d}_0").mkdir()
        (experiment / f"tune_trial_{i:05d}_0" / "result.json").write_text("{}\n")
    return experiment


def by_name(storage):
    return {entry["name"]: entry for entry in list_runs(str(storage))}


def best_of(run_dir):
    return min(r["val_loss"] for r in runs.read_metrics(str(run_dir)))


def test_finished_and_interrupted_runs(storage):
    found = by_name(storage)
    assert set(found) == {"finished", "interrupted"}
    finished, interrupted = found["finished"], found["interrupted"]
    assert (finished["kind"], finished["status"]) == ("train", "finished")
    assert (finished["steps"], finished["total_steps"]) == (4, 4)
    assert (interrupted["status"], interrupted["steps"], interrupted["total_steps"]) == ("interrupted", 4, 8)
    assert finished["best_val_loss"] == best_of(storage / "finished")
    assert interrupted["best_val_loss"] == best_of(storage / "interrupted")
    assert finished["holder"] is None and finished["path"] == str(storage / "finished")


def test_best_val_loss_is_the_lowest_logged_not_the_last(storage):
    run_dir = str(storage / "interrupted")
    rows = runs.read_log(run_dir)
    worse = {**rows[-1], "step": 6, "val_loss": rows[-1]["val_loss"] + 1.0}  # the run got worse, then stopped
    runs.write_log(run_dir, rows + [worse])
    entry = by_name(storage)["interrupted"]
    assert entry["best_val_loss"] == best_of(run_dir) < worse["val_loss"]
    assert (entry["steps"], entry["status"]) == (6, "interrupted")


def test_a_storage_uri_lists_the_same(storage):
    assert list_runs(f"file://{storage}") == [{**e, "path": f"file://{e['path']}"} for e in list_runs(str(storage))]


def test_a_live_lease_makes_a_run_running_and_a_dead_one_does_not(storage):
    run_dir = str(storage / "interrupted")
    with runs.Lease(run_dir):
        entry = by_name(storage)["interrupted"]
        assert entry["status"] == "running"
        assert entry["holder"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert by_name(storage)["interrupted"]["status"] == "interrupted"
    # A lease left behind by a process of this host that is gone: not running.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {**runs.Lease(run_dir).owner, "pid": int(dead.stdout), "heartbeat": time.time()}
    (storage / "interrupted" / runs.LEASE_FILE).write_text(json.dumps(owner))
    entry = by_name(storage)["interrupted"]
    assert (entry["status"], entry["holder"]) == ("interrupted", None)


def test_a_run_with_no_metrics_yet_is_empty_and_a_damaged_log_unreadable(storage):
    (storage / "new").mkdir()
    (storage / "new" / runs.CONFIG_FILE).write_text("model: {}\n")
    (storage / "notes").mkdir()  # no run files: not listed
    (storage / "interrupted" / runs.METRICS_FILE).write_text('{"step": 0, "val_')  # not what raygpt writes
    found = by_name(storage)
    assert found["interrupted"]["status"] == "unreadable"  # said, and the others still listed
    assert (found["new"]["status"], found["new"]["steps"], found["new"]["best_val_loss"]) == ("empty", None, None)
    assert "notes" not in found


def test_a_search_is_finished_running_or_interrupted_by_its_trials(storage):
    add_search(storage, "tune-done", ["finished", "finished"], planned=2)
    add_search(storage, "tune-cut", ["finished", "interrupted"], planned=2)
    add_search(storage, "tune-short", ["finished", "finished"], planned=3)  # a trial never started
    live = add_search(storage, "tune-live", ["finished", "interrupted"], planned=2)
    found = by_name(storage)
    done = found["tune-done"]
    assert (done["kind"], done["status"], done["trials"], done["trials_finished"]) == ("search", "finished", 2, 2)
    assert done["best_val_loss"] == best_of(storage / "finished")
    assert (found["tune-cut"]["status"], found["tune-cut"]["trials_finished"]) == ("interrupted", 1)
    assert found["tune-cut"]["best_val_loss"] == min(best_of(storage / "finished"), best_of(storage / "interrupted"))
    assert (found["tune-short"]["status"], found["tune-short"]["trials"]) == ("interrupted", 3)
    with runs.Lease(str(live / "train-00001")):
        assert by_name(storage)["tune-live"]["status"] == "running"


def test_an_ended_search_reads_its_trials_from_the_analysis(storage):
    from raygpt.runs import TRIALS_CSV as TRIALS_TABLE
    # ASHA stopped one trial early (its run folder is short of total_steps): still a finished search.
    stopped = add_search(storage, "tune-asha", ["finished", "interrupted"], planned=2)
    (stopped / TRIALS_TABLE).write_text("trial_id,status,stopped_early\na,TERMINATED,False\nb,TERMINATED,True\n")
    failed = add_search(storage, "tune-error", ["finished", "interrupted"], planned=2)
    (failed / TRIALS_TABLE).write_text("trial_id,status,stopped_early\na,TERMINATED,False\nb,ERROR,False\n")
    found = by_name(storage)
    assert (found["tune-asha"]["status"], found["tune-asha"]["trials_finished"]) == ("finished", 2)
    assert (found["tune-error"]["status"], found["tune-error"]["trials_finished"]) == ("failed", 1)


def test_last_change_is_the_newest_file_and_the_table_puts_it_last(storage, run_cli):
    later = time.time() + 3600  # the finished run (trained first) becomes the newest
    for folder, _, files in os.walk(storage / "finished"):
        for name in files:
            os.utime(os.path.join(folder, name), (later, later))
    found = by_name(storage)
    assert found["finished"]["last_change"] == datetime.fromtimestamp(later, timezone.utc).isoformat(timespec="seconds")
    assert found["interrupted"]["last_change"] < found["finished"]["last_change"]
    code, out, err = run_cli("runs", str(storage))
    assert (code, err) == (0, "")
    header, *lines = out.splitlines()
    assert header.split() == ["name", "kind", "status", "steps", "best", "val", "last", "change"]
    assert [line.split()[0] for line in lines] == ["interrupted", "finished"]
    assert lines[0].split()[1:4] == ["train", "interrupted", "4/8"]
    assert lines[1].split()[3:5] == ["4/4", f"{best_of(storage / 'finished'):.4f}"]
    assert header.index("status") == lines[0].index("interrupted", len("interrupted"))  # columns aligned


def test_json_output_for_scripts(storage, run_cli):
    code, out, _ = run_cli("runs", str(storage), "--json")
    entries = json.loads(out)
    assert code == 0 and [e["name"] for e in entries] == [e["name"] for e in list_runs(str(storage))]
    assert {e["name"]: e["status"] for e in entries} == {"finished": "finished", "interrupted": "interrupted"}


def test_the_default_storage_is_runs(storage, run_cli, monkeypatch):
    monkeypatch.chdir(storage.parent)
    code, out, _ = run_cli("runs", "--json")
    assert code == 0 and {e["name"] for e in json.loads(out)} == {"finished", "interrupted"}


def test_a_missing_storage_is_one_line_and_an_empty_one_says_so(tmp_path, run_cli):
    err = one_line_error(run_cli, "runs", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in err
    (tmp_path / "empty").mkdir()
    assert run_cli("runs", str(tmp_path / "empty")) == (0, f"no runs in {tmp_path / 'empty'}\n", "")




@pytest.mark.parametrize("line, status", [
    ("[1, 2, 3]", "unreadable"),
    ('{"step": 12, "total_steps": 12, "val_loss": 1.0, "wall_time": 1e300}', "unreadable"),
    ('{"step": 12, "total_steps": 12, "val_loss": NaN}', "unreadable"),
    ('{"step": "12", "val_loss": 1.0}', "unreadable"),
    ('{"step": 12, "val_lo', "unreadable"),
])
def test_one_odd_run_is_marked_and_the_others_listed(storage, run_cli, line, status):
    """A metrics line raygpt would not write marks that run unreadable; the listing (table and
    strict JSON) goes on."""
    import json

    shutil.copytree(storage / "finished", storage / "odd")
    with open(storage / "odd" / runs.METRICS_FILE, "a") as f:
        f.write(line + "\n")
    found = by_name(storage)
    assert found["odd"]["status"] == status and found["finished"]["status"] == "finished"
    code, out, err = run_cli("runs", str(storage), "--json")
    assert code == 0 and {e["name"] for e in json.loads(out)} >= {"odd", "finished"}


def test_a_lease_whose_heartbeat_does_not_read_is_stale(storage):
    shutil.copytree(storage / "finished", storage / "leased")
    (storage / "leased" / runs.LEASE_FILE).write_text('{"host": "h", "pid": "x", "heartbeat": "soon"}')
    assert by_name(storage)["leased"]["status"] == "finished"
    assert runs.Lease(str(storage / "leased")).live_holder() is None


class _OpensOnlyRegularFiles:
    """A local filesystem that fails at once, instead of blocking forever on a FIFO or reading
    /dev/zero without end, when asked to open what is not a regular file."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def _check(self, path):
        import stat

        assert stat.S_ISREG(os.stat(path).st_mode), f"the listing opened {path}, not a regular file"

    def open_input_stream(self, path, *args, **kw):
        self._check(path)
        return self._fs.open_input_stream(path, *args, **kw)

    def open_input_file(self, path, *args, **kw):
        self._check(path)
        return self._fs.open_input_file(path, *args, **kw)


def test_a_fifo_or_device_in_a_run_or_search_is_marked_unreadable_not_opened(storage, monkeypatch, run_cli):
    from raygpt import storage as storage_module

    real = storage_module.filesystem
    monkeypatch.setattr(storage_module, "filesystem", lambda uri: (_OpensOnlyRegularFiles(real(uri)[0]), real(uri)[1]))
    (storage / "interrupted" / runs.METRICS_FILE).unlink()
    os.mkfifo(storage / "interrupted" / runs.METRICS_FILE)  # a reader's open would wait for a writer forever
    (storage / "zero").mkdir()
    (storage / "zero" / runs.CONFIG_FILE).write_text("model: {}\n")
    (storage / "zero" / runs.METRICS_FILE).symlink_to("/dev/zero")  # a read would never end
    (storage / "leased").mkdir()
    (storage / "leased" / runs.CONFIG_FILE).write_text("model: {}\n")
    os.mkfifo(storage / "leased" / runs.LEASE_FILE)
    piped = add_search(storage, "tune-piped", ["finished", "finished"], planned=2)
    (piped / SEARCH_FILE).unlink()
    os.mkfifo(piped / SEARCH_FILE)
    ended = add_search(storage, "tune-ended", ["finished", "finished"], planned=2)
    os.mkfifo(ended / runs.TRIALS_CSV)
    trial = add_search(storage, "tune-trial", ["finished", "finished"], planned=2)
    (trial / "train-00001" / runs.METRICS_FILE).unlink()
    os.mkfifo(trial / "train-00001" / runs.METRICS_FILE)
    os.mkfifo(storage / "a-fifo")  # not a folder: not a run
    found = by_name(storage)
    assert {name: e["status"] for name, e in found.items()} == {
        "finished": "finished", "interrupted": "unreadable", "zero": "unreadable", "leased": "unreadable",
        "tune-piped": "unreadable", "tune-ended": "unreadable", "tune-trial": "interrupted"}
    assert (found["tune-trial"]["trials"], found["tune-trial"]["trials_finished"]) == (2, 1)
    assert found["tune-piped"]["kind"] == "search" and found["interrupted"]["last_change"] is not None
    code, out, err = run_cli("runs", str(storage))
    assert (code, err) == (0, "")
    assert [line.split()[:4] for line in out.splitlines() if line.startswith("tune-piped")] == [
        ["tune-piped", "search", "unreadable", "-"]]
