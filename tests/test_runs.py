"""The run folder: checkpoint order, newest complete / readable, best, the metrics log, the lease."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from raygpt import runs
from raygpt.errors import UserError


def make_checkpoint(run, step, val_loss):
    folder = run / runs.checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss}))


def test_prune_keeps_the_best_by_val_loss_and_the_newest(tmp_path):
    for step, loss in [(2, 5.0), (4, 3.0), (6, 4.0), (8, None), (10, 4.5)]:
        make_checkpoint(tmp_path, step, loss)
    (tmp_path / "checkpoint_0000012").mkdir()  # no state.json: scored last, and the newest: kept
    deleted = runs.prune_checkpoints(str(tmp_path), keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint_0000004", "checkpoint_0000006", "checkpoint_0000012"]
    assert len(deleted) == 3
    assert runs.prune_checkpoints(str(tmp_path), keep=5) == []


def test_checkpoints_are_ordered_by_step_as_a_number(tmp_path):
    for name in ["checkpoint_10000000", "checkpoint_9999999", "checkpoint_0000005-10", "checkpoint_0000005-2",
                 "checkpoint_0000005", "checkpoint_notes", "other"]:
        (tmp_path / name).mkdir()
    names = [uri.rsplit("/", 1)[1] for uri in runs.list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint_0000005", "checkpoint_0000005-2", "checkpoint_0000005-10",
                     "checkpoint_9999999", "checkpoint_10000000"]


def test_the_newest_complete_checkpoint_has_a_state_json(tmp_path):
    make_checkpoint(tmp_path, 4, 3.0)
    make_checkpoint(tmp_path, 8, 2.0)
    (tmp_path / "checkpoint_0000008" / "state.json").write_text("{not json")
    (tmp_path / "checkpoint_0000012").mkdir()  # incomplete: no state.json
    assert runs.peek_state(str(tmp_path / "checkpoint_0000008")) is None
    assert runs.newest_complete(str(tmp_path)).endswith("checkpoint_0000008")
    assert runs.best_checkpoint(str(tmp_path))[0].endswith("checkpoint_0000004")


def test_the_metrics_log_round_trips(tmp_path):
    rows = [{"step": 0, "val_loss": 10.0}, {"event": "resume", "restored_step": 0}, {"step": 5, "val_loss": 9.0}]
    runs.write_log(str(tmp_path), rows)
    assert runs.read_log(str(tmp_path)) == rows
    assert [r["step"] for r in runs.read_metrics(str(tmp_path))] == [0, 5]
    assert runs.read_events(str(tmp_path)) == [rows[1]]


HOLD = """
import sys, time
from raygpt import runs
lease = runs.Lease(sys.argv[1], heartbeat_s=0.2).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_while_the_first_lives_and_takes_over_when_it_is_gone(tmp_path):
    run = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"run {run} is being written by .*:{holder.pid} \(heartbeat"):
            runs.Lease(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    said = []
    lease = runs.Lease(run, log=said.append).acquire()
    assert said == [f"taking over the lease of run {run} from {os.uname().nodename}:{holder.pid}: "
                    f"its process {holder.pid} is gone"]
    lease.release()
    assert not os.path.exists(os.path.join(run, runs.LEASE_FILE))


def test_a_lease_without_heartbeat_goes_stale(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.LEASE_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t",
                                                   "heartbeat": time.time() - 120}))
    said = []
    with runs.Lease(str(run), log=said.append):
        assert json.loads((run / runs.LEASE_FILE).read_text())["pid"] == os.getpid()
    assert said and "no heartbeat for 120 s" in said[0]


def test_a_checkpoint_name_is_never_written_twice(tmp_path):
    assert runs.unique_checkpoint_name(str(tmp_path), 12) == "checkpoint_0000012"
    (tmp_path / "checkpoint_0000012").mkdir()
    (tmp_path / "checkpoint_0000012-1").mkdir()
    assert runs.unique_checkpoint_name(str(tmp_path), 12) == "checkpoint_0000012-2"
    assert runs.list_checkpoints(str(tmp_path))[-1].endswith("checkpoint_0000012-1")


@pytest.mark.parametrize("content, says", [
    (None, "no raygpt experiment in"),
    (b"tune: [", "is not valid YAML"),
    (b"- a\n", "must hold a mapping, got list"),
    (b"search: {}\n", "its 'tune' section is missing or not a mapping"),
    (b"tune: {}\nsearch: 3\n", "its 'search' section is missing or not a mapping"),
    (b"\x80tune: {}", "is not UTF-8 text"),
])
def test_a_damaged_search_file_is_one_line(tmp_path, content, says):
    if content is not None:
        (tmp_path / runs.SEARCH_FILE).write_bytes(content)
    with pytest.raises(UserError, match=says) as info:
        runs.read_search_file(str(tmp_path))
    assert "\n" not in str(info.value)


def test_a_storage_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="run.storage_path .*afile is a file, not a folder"):
        runs.check_storage_root(str(tmp_path / "afile"))
    with pytest.raises(UserError, match="is a file, not a folder"):
        runs.check_storage_root(f"file://{tmp_path / 'afile'}")
    assert runs.check_storage_root(str(tmp_path / "new")) == str(tmp_path / "new")


@pytest.mark.parametrize("line, says", [
    ('{"step": 3, "val_lo', "line 2 is not JSON"),
    ("[1, 2, 3]", "line 2 is a list, not a JSON object"),
    ('{"step": 3, "val_loss": "low"}', "line 2 has val_loss 'low', not a finite number"),
    ('{"step": 3, "train_loss": [1]}', "line 2 has train_loss [1], not a finite number"),
    ('{"val_loss": 1.0}', "line 2 has no step"),
    ('{"step": 3, "wall_time": 1e300}', "line 2 has wall_time 1e+300, not a time"),
    ('{"event": 7}', "line 2 has event 7, not a name"),
])
def test_a_metrics_log_raygpt_did_not_write_is_one_line_naming_the_line(tmp_path, line, says):
    (tmp_path / runs.METRICS_FILE).write_text('{"step": 0, "val_loss": 10.0}\n' + line + "\n")
    with pytest.raises(UserError, match=re.escape(says)) as info:
        runs.read_log(str(tmp_path))
    assert "\n" not in str(info.value)
