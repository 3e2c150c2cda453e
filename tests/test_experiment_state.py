"""Tune's trial records read as plain JSON (fast, no Ray): what analyze needs, and nothing run."""

import json

import pytest
from helpers import plant_pickles

from raygpt.errors import UserError
from raygpt.search.experiment_state import error_text, read_trials

PICKLED = {"_type": "CLOUDPICKLE_FALLBACK", "value": "80054e2e"}  # what Tune writes for non-JSON values


def trial_record(trial_id, status="TERMINATED", hp=None, logdir="tune_trial_x", error=None, config_trial=None):
    config = {"experiment_dir": "/e", **({"trial": config_trial} if config_trial else
                                         {"hp": hp or {"optim.peak_lr": 0.01}})}
    trial = {"trial_id": trial_id, "status": status, "relative_logdir": logdir, "storage": PICKLED,
             "config": config, "results": PICKLED}
    return [json.dumps(trial), json.dumps({"error_filename": error, "last_result": {}})]


def write_state(folder, entries, name="experiment_state-2026-11-30_12-00-00.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"trial_data": entries, "runner_data": PICKLED}))


def test_each_run_folder_has_its_newest_trial_record_across_resumes(tmp_path):
    """A resumed search adds an experiment state (a Tuner each): a run folder's newest record wins."""
    point = lambda i: {"hp": {"optim.peak_lr": 0.01 * (i + 1)}, "run": f"train-{i:05d}"}  # noqa: E731
    first = [trial_record("a_00000", config_trial=point(0)), trial_record("a_00001", "ERROR", config_trial=point(1))]
    write_state(tmp_path, first, "experiment_state-2026-11-30_11-00-00.json")
    write_state(tmp_path, [trial_record("b_00000", "ERROR", logdir="t1", error="error.txt", config_trial=point(1))])
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "error.txt").write_text("Traceback...\nValueError: boom\n")
    trials = read_trials(str(tmp_path))
    assert [(t.run, t.trial_id, t.status) for t in trials] == [("train-00000", "a_00000", "TERMINATED"),
                                                               ("train-00001", "b_00000", "ERROR")]
    assert trials[1].hp == {"optim.peak_lr": 0.02}
    assert "ValueError: boom" in error_text(trials[1]) and error_text(trials[0]) == ""


def test_a_search_from_before_launch_order_run_folders_reads_its_trial_id_folders(tmp_path):
    write_state(tmp_path, [trial_record("c_00000")])
    (trial,) = read_trials(str(tmp_path))
    assert trial.run == "train-c_00000" and trial.hp == {"optim.peak_lr": 0.01}


def test_planted_pickles_run_nothing(tmp_path):
    write_state(tmp_path / "exp", [trial_record("b_00000")])
    (tmp_path / "exp" / "tuner.pkl").write_bytes(b"")
    marker = plant_pickles(tmp_path / "exp", tmp_path / "pwned")
    assert "CLOUDPICKLE_FALLBACK" in next((tmp_path / "exp").glob("experiment_state-*.json")).read_text()
    (trial,) = read_trials(str(tmp_path / "exp"))
    assert trial.trial_id == "b_00000" and not marker.exists()


def test_an_error_file_outside_the_trial_folder_is_not_read(tmp_path):
    (tmp_path / "secret.txt").write_text("do not show")
    write_state(tmp_path / "exp", [trial_record("b_00000", "ERROR", logdir="..", error="secret.txt")])
    (trial,) = read_trials(str(tmp_path / "exp"))
    assert trial.error_file is None and error_text(trial) == ""


@pytest.mark.parametrize("content, says", [
    (None, "no Tune experiment state"),
    ("{not json", "is damaged (not JSON)"),
    ("[1, 2]", "is damaged (no trial_data list)"),
    ('{"trial_data": [[1, 2]]}', "trial_data[0] is damaged (not a Tune trial record)"),
    (json.dumps({"trial_data": [trial_record("../x")]}), "trial_data[0] is damaged (trial_id '../x'"),
    (json.dumps({"trial_data": [trial_record("d", config_trial={"hp": {}, "run": "../up"})]}), "run '../up'"),
])
def test_a_damaged_state_is_one_line_naming_it(tmp_path, content, says):
    if content is not None:
        (tmp_path / "experiment_state-2026-11-30_12-00-00.json").write_text(content)
    with pytest.raises(UserError) as info:
        read_trials(str(tmp_path))
    assert says in str(info.value) and str(tmp_path) in str(info.value) and "\n" not in str(info.value)
